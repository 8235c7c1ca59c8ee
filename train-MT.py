"""Mean Teacher (SPEC §B.1.1 on CIFAR-10, §B.2.3 on AFLW).

    python train-MT.py --gpu 0 --n-labeled 250  --out cifar10MT@250
    python train-MT.py --gpu 0 --n-labeled 0.01 --out aflwMT@0.01
"""
from utils.options import common_parser
from utils.steps import consistency_update
from utils.training import run_script

METHOD = "MT"


def parse_args(argv=None):
    return common_parser("Mean Teacher").parse_args(argv)


def train_step(run, batch):
    # 1-4. Consistency update: the mean teacher labels view 2; student on labeled images and view 1;
    #      L_x + w·L_u; optimizer step (utils/steps.py).
    losses = consistency_update(run, batch, labeler=run.mean_teacher.model)
    # 5-6. EMA-E (with the student shrink on CIFAR-10), then the teacher with β_t = min(1-1/(t+1), decay).
    run.ema_eval.update(run.student)
    run.mean_teacher.update(run.student, run.step)
    return losses


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv)


if __name__ == "__main__":
    main()
