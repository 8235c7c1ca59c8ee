"""Mean Teacher (docs/method.md §3.1 on CIFAR-10, §4.3 on AFLW).

    python train-MT.py --gpu 0 --n-labeled 250  --out cifar10MT@250
    python train-MT.py --gpu 0 --n-labeled 0.01 --out aflwMT@0.01

The whole run is in this file: the networks (``build``), one iteration (``train_step``) and the epoch loop
(``main``). To try a variant, copy it (e.g. to train-MYVAR.py) and edit the copy: it is a method of its
own, named after its file, with its own run folders and results (README "Trying a variant").
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "MT"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "MT"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10", "aflw")    # the first is the default


def parse_args(argv=None):
    return common_parser("Mean Teacher", BASED_ON, DATASETS, method=METHOD).parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA, MeanTeacher  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.schedules import unsup_weight  # noqa: E402
from utils.steps import consistency_update, set_lr  # noqa: E402


def build(args, task, device):
    """The student, its evaluation EMA and mean teacher (docs/method.md §2.1), and the optimizer."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           mean_teacher=MeanTeacher(student, args.ema_decay),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model, nets.mean_teacher.model)
    return nets


def train_step(nets, batch, task, args, weight, step):
    """One MT iteration; ``weight`` = λ_u after its ramp-up, ``step`` = the global iteration t."""
    # 1-4. The mean teacher labels view 2; student on the labeled images and view 1; L_x + w·L_u;
    #      optimizer step (utils/steps.py).
    losses = consistency_update(nets.student, nets.optimizer, task, batch, nets.mean_teacher.model, weight)
    # 5-6. EMA-E (with the student shrink on CIFAR-10), then the teacher with β_t = min(1-1/(t+1), decay).
    nets.ema_eval.update(nets.student)
    nets.mean_teacher.update(nets.student, step)
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
