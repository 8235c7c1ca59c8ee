"""Pseudo-labelling (SPEC §B.2.2 on AFLW; our extension on CIFAR-10).

The current student labels view 2 of each unlabeled image (no teacher), and is trained on view 1
against that label. On CIFAR-10 the label is the student's softmax on view 2 with the classification
losses of MT (squared error between probabilities, λ = 50 ramped over 409.6 epochs): the same
"student labels view 2" rule as the authors' regression PL, rather than hard arg-max pseudo-labels.

    python train-PL.py --gpu 0 --n-labeled 0.01 --out aflwPL@0.01
    python train-PL.py --gpu 0 --n-labeled 250  --dataset cifar10
"""
from utils.options import common_parser
from utils.steps import consistency_update
from utils.training import run_script

METHOD = "PL"


def parse_args(argv=None):
    return common_parser("Pseudo-labelling").parse_args(argv)


def train_step(run, batch):
    # 1-4. Consistency update: the current student labels view 2 (pseudo-labels); student on labeled images and view 1;
    #      L_x + w·L_u; optimizer step (utils/steps.py).
    losses = consistency_update(run, batch, labeler=run.student)
    # 5. EMA-E, the evaluated model. PL has no mean teacher.
    run.ema_eval.update(run.student)
    return losses


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=("aflw", "cifar10"))


if __name__ == "__main__":
    main()
