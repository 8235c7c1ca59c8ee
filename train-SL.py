"""Supervised learning on the labeled images only (SPEC §B.2.1 on AFLW; our extension on CIFAR-10,
with MT's optimizer and EMA evaluation).

    python train-SL.py --gpu 0 --n-labeled -1   --out aflwSL@-1
    python train-SL.py --gpu 0 --n-labeled 0.01 --out aflwSL@0.01
    python train-SL.py --gpu 0 --n-labeled 250  --out cifar10SL@250
"""
import torch

from utils.options import common_parser
from utils.training import run_script

METHOD = "SL"


def parse_args(argv=None):
    return common_parser("Supervised only").parse_args(argv)


def train_step(run, batch):
    loss = run.task.supervised_loss(run.student(batch.x_l), batch.y_l)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    # EMA-E: on CIFAR-10 it is the evaluated model (with the student shrink). On AFLW the authors
    # evaluate the student and never step EMA-E; stepping it here changes nothing the student sees
    # (no shrink on AFLW) and makes the logged "other model" meaningful.
    run.ema_eval.update(run.student)
    return {"loss": loss.detach(), "loss_x": loss.detach(), "loss_u": torch.zeros(())}


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=("aflw", "cifar10"), unlabeled_batches=False)


if __name__ == "__main__":
    main()
