"""Mean Teacher (docs/method.md §3.1 on CIFAR-10, §4.3 on AFLW).

    python train-MT.py --gpu 0 --n-labeled 250  --out cifar10MT@250
    python train-MT.py --gpu 0 --n-labeled 0.01 --out aflwMT@0.01

To try a variant, copy this file (e.g. to train-MYVAR.py) and edit ``train_step``: the copy is a method
of its own, named after its file, with its own run folders and results.
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "MT"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "MT"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10", "aflw")    # the first is the default


def parse_args(argv=None):
    return common_parser("Mean Teacher", BASED_ON, DATASETS).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from utils.steps import consistency_update  # noqa: E402  (imports PyTorch)
from utils.training import run_script  # noqa: E402


def train_step(run, batch):
    # 1-4. Consistency update: the mean teacher labels view 2; student on labeled images and view 1;
    #      L_x + w·L_u; optimizer step (utils/steps.py).
    losses = consistency_update(run, batch, labeler=run.mean_teacher.model)
    # 5-6. EMA-E (with the student shrink on CIFAR-10), then the teacher with β_t = min(1-1/(t+1), decay).
    run.ema_eval.update(run.student)
    run.mean_teacher.update(run.student, run.step)
    return losses


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=DATASETS)


if __name__ == "__main__":
    main()
