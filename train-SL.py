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
    return common_parser("Supervised only", BASED_ON, DATASETS, method=METHOD).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.steps import set_lr  # noqa: E402


def build(args, task, device):
    """The student, its evaluation EMA (docs/method.md §2.1) and the optimizer. SL has no mean teacher."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model)
    return nets


def train_step(nets, batch, task, args, weight, step):
    """One SL iteration. ``weight`` and ``step`` are unused (no unsupervised term, no teacher); every script's
    ``train_step`` takes them, so that utils.benchmark times any script alike."""
    # 1. The supervised loss on the labeled images.
    loss = task.supervised_loss(nets.student(batch.x_l), batch.y_l)
    # 2. Optimizer step.
    nets.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nets.optimizer.step()
    # 3. EMA-E: on CIFAR-10 it is the evaluated model (with the student shrink). On AFLW the authors
    # evaluate the student and never step EMA-E; stepping it here changes nothing the student sees
    # (no shrink on AFLW) and makes the logged "other model" meaningful.
    nets.ema_eval.update(nets.student)
    loss = loss.detach()
    return {"loss": loss, "loss_x": loss}  # the supervised loss is the whole loss


def main(argv=None):
    with bookkeeping(METHOD, parse_args, argv, DATASETS, streams=("labeled",)) as book:
        args, task = book.args, book.task
        nets = book.keep(build(args, task, book.device))  # checkpointed under these names
        for epoch in book.epochs():
            lr = task.lr_at(epoch, args)  # constant on CIFAR-10; ×0.1 at epoch 100 on AFLW (docs/defaults.md)
            set_lr(nets.optimizer, lr)
            for iteration, batch in book.iterations():
                with book.autocast():
                    losses = train_step(nets, batch, task, args, 0.0, book.step)
                book.record(**losses, lr=lr)
            # End of epoch (docs/method.md §3.5, §4.6): EMA-E takes the student's BN statistics; the model
            # --eval-model names is evaluated and reported (docs/evaluation.md).
            nets.ema_eval.copy_buffers(nets.student)
            book.evaluate_epoch(nets.student, nets.ema_eval.model)
            book.end_epoch()
        book.finish()


if __name__ == "__main__":
    main()
