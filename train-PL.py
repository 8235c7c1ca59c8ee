"""Pseudo-labelling (docs/method.md §4.2 on AFLW; §3.6 for this repository's CIFAR-10 version).

The current student labels view 2 of each unlabeled image (no teacher), and is trained on view 1
against that label. On CIFAR-10 the label is the student's softmax on view 2 with the classification
losses of MT (squared error between probabilities, λ = 50 ramped over 409.6 epochs): the same
"student labels view 2" rule as the authors' regression PL, rather than hard arg-max pseudo-labels.

    python train-PL.py --gpu 0 --n-labeled 0.01 --out aflwPL@0.01
    python train-PL.py --gpu 0 --n-labeled 250  --dataset cifar10
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "PL"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "PL"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("aflw", "cifar10")    # the first is the default


def parse_args(argv=None):
    return common_parser("Pseudo-labelling", BASED_ON, DATASETS).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from utils.steps import consistency_update  # noqa: E402  (imports PyTorch)
from utils.training import run_script  # noqa: E402


def train_step(run, batch):
    # 1-4. Consistency update: the current student labels view 2 (pseudo-labels); student on labeled images and view 1;
    #      L_x + w·L_u; optimizer step (utils/steps.py).
    losses = consistency_update(run, batch, labeler=run.student)
    # 5. EMA-E, the evaluated model. PL has no mean teacher.
    run.ema_eval.update(run.student)
    return losses


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=DATASETS)


if __name__ == "__main__":
    main()
