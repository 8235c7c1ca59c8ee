"""L2I-O: Mean Teacher + imputed labels as the Output of a network (docs/method.md §3.3 on CIFAR-10, §4.4 on AFLW).

Each iteration first does an ordinary MT update. Then the current student, used as a label generator
on view 2, imputes labels z; a virtual gradient step of the student on the consistency loss V(o, z)
gives weights θ'; the supervised loss of θ' on a labeled meta batch is differentiated back through
the virtual step into z and on into the label generator's parameters, and that gradient is applied to
the student as a second optimizer step. The student learns to impute labels that would help it most.

    python train-L2I-O.py --gpu 0 --n-labeled 250  --out cifar10L2IO@250
    python train-L2I-O.py --gpu 0 --n-labeled 0.01 --out aflwL2IO@0.01
"""
from utils.options import add_meta_options, check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "L2I-O"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "L2I-O"                # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10", "aflw")    # the first is the default


def parse_args(argv=None):
    parser = common_parser("L2I-O: learning to impute, labels as the output of a network", BASED_ON, DATASETS,
                           method=METHOD)
    add_meta_options(parser, label_step=False)
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA, MeanTeacher  # noqa: E402
from utils.meta import imputed_label_gradient, label_generator_output  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.schedules import unsup_weight  # noqa: E402
from utils.steps import UpdateSizes, consistency_update, set_lr  # noqa: E402


def build(args, task, device):
    """MT's networks (docs/method.md §2.1) and optimizer. The label generator φ is the student itself."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           mean_teacher=MeanTeacher(student, args.ema_decay),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model, nets.mean_teacher.model)
    return nets


def train_step(nets, batch, task, args, weight, step):
    """One L2I-O iteration; ``weight`` = λ_u after its ramp-up, ``step`` = the global iteration t."""
    student, optimizer = nets.student, nets.optimizer
    updates = UpdateSizes(student.parameters())  # for the logs: how far each optimizer step moves θ
    # 1-4. MT update: the mean teacher labels view 2; L_x + w·L_u; optimizer step #1 (utils/steps.py).
    losses = consistency_update(student, optimizer, task, batch, nets.mean_teacher.model, weight)
    first_update = updates.since_last()
    if args.ema_updates == 2:  # AFLW: EMA-E after each optimizer step (docs/method.md §4.4 step 4)
        nets.ema_eval.update(student)
    optimizer.zero_grad(set_to_none=True)
    # 5-6. Label generator φ = the current student on view 2 (BN batch statistics, buffers untouched).
    labels = label_generator_output(student, batch.u2)
    # 7. The student on view 1: an extra, non-interleaved forward (docs/faithfulness.md §1.7).
    student_out = student(batch.u1)
    # 8-11. dM(θ')/dz with θ' = θ - η·∇θ V(o, z), η = virtual-step × current lr (utils/meta.py). The view-1
    # graph is not needed afterwards, so it is freed as soon as the virtual step has used it.
    lr = optimizer.param_groups[0]["lr"]
    grad_labels, meta_loss = imputed_label_gradient(student, task, args, lr, batch, student_out, labels, keep_graph=False)
    # 12-13. Into the label generator's parameters (= the student's), then optimizer step #2 (shared state).
    labels.backward(grad_labels)
    optimizer.step()
    second_update = updates.since_last()
    # 14. EMA-E (with the student shrink on CIFAR-10), then the mean teacher.
    nets.ema_eval.update(student)
    nets.mean_teacher.update(student, step)
    # What the meta step did (README "Quick try"): M(θ'), the size of dM/dz, and the second update's size
    # relative to the first.
    return dict(losses, meta_loss=meta_loss, meta_grad_norm=grad_labels.norm(),
                update_ratio=second_update / first_update)


def main(argv=None):
    with bookkeeping(METHOD, parse_args, argv, DATASETS, streams=("labeled", "unlabeled", "meta")) as book:
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
