"""Supervised learning on the labeled images only (docs/method.md §4.1 on AFLW; §3.6 for this repository's
CIFAR-10 version, with MT's optimizer and EMA evaluation).

    python train-SL.py --gpu 0 --n-labeled -1   --out aflwSL@-1
    python train-SL.py --gpu 0 --n-labeled 0.01 --out aflwSL@0.01
    python train-SL.py --gpu 0 --n-labeled 250  --out cifar10SL@250
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "SL"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "SL"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("aflw", "cifar10")    # the first is the default


def parse_args(argv=None):
    return common_parser("Supervised only", BASED_ON, DATASETS).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from utils.training import run_script  # noqa: E402  (imports PyTorch)


def train_step(run, batch):
    loss = run.task.supervised_loss(run.student(batch.x_l), batch.y_l)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    # EMA-E: on CIFAR-10 it is the evaluated model (with the student shrink). On AFLW the authors
    # evaluate the student and never step EMA-E; stepping it here changes nothing the student sees
    # (no shrink on AFLW) and makes the logged "other model" meaningful.
    run.ema_eval.update(run.student)
    loss = loss.detach()
    return {"loss": loss, "loss_x": loss, "loss_u": loss.new_zeros(())}


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=DATASETS, unlabeled_batches=False)


if __name__ == "__main__":
    main()
