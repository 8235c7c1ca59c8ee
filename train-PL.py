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
    return common_parser("Pseudo-labelling", BASED_ON, DATASETS, method=METHOD).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.schedules import unsup_weight  # noqa: E402
from utils.steps import consistency_update, set_lr  # noqa: E402


def build(args, task, device):
    """The student, its evaluation EMA (docs/method.md §2.1) and the optimizer. PL has no mean teacher."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model)
    return nets


def train_step(nets, batch, task, args, weight, step):
    """One PL iteration; ``weight`` = λ_u after its ramp-up (``step`` is unused: PL has no teacher)."""
    # 1-4. Consistency update: the current student labels view 2 (pseudo-labels); student on labeled images
    #      and view 1; L_x + w·L_u; optimizer step (utils/steps.py).
    losses = consistency_update(nets.student, nets.optimizer, task, batch, nets.student, weight)
    # 5. EMA-E, the evaluated model.
    nets.ema_eval.update(nets.student)
    return losses


def main(argv=None):
    with bookkeeping(METHOD, parse_args, argv, DATASETS, streams=("labeled", "unlabeled")) as book:
        args, task = book.args, book.task
        nets = book.keep(build(args, task, book.device))  # checkpointed under these names
        for epoch in book.epochs():
            lr = task.lr_at(epoch, args)  # constant on CIFAR-10; ×0.1 at epoch 100 on AFLW (docs/defaults.md)
            set_lr(nets.optimizer, lr)
            for iteration, batch in book.iterations():
                weight = unsup_weight(task, args, epoch, iteration, book.step)
                with book.autocast():
                    losses = train_step(nets, batch, task, args, weight, book.step)
                book.record(**losses, lr=lr, lambda_u=weight)
            # End of epoch (docs/method.md §3.5, §4.6): EMA-E takes the student's BN statistics; the model
            # --eval-model names is evaluated and reported (docs/evaluation.md).
            nets.ema_eval.copy_buffers(nets.student)
            book.evaluate_epoch(nets.student, nets.ema_eval.model)
            book.end_epoch()
        book.finish()


if __name__ == "__main__":
    main()
