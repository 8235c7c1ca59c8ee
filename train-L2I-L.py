"""L2I-L: Mean Teacher + imputed labels as Learnable tensors (docs/method.md §3.4 on CIFAR-10, §4.5 on AFLW).

Each iteration first does an ordinary MT update. Then the current student's output on view 2 is taken
as a free tensor of imputed labels r; a virtual gradient step of the student on the consistency loss
V(o, r) gives weights θ', and the supervised loss of θ' on a labeled meta batch is differentiated back
through the virtual step into r. One gradient step refines r, and the student takes a second optimizer
step towards the refined labels.

    python train-L2I-L.py --gpu 0 --n-labeled 250  --out cifar10L2IL@250
    python train-L2I-L.py --gpu 0 --n-labeled 0.01 --out aflwL2IL@0.01
"""
from utils.options import add_meta_options, check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "L2I-L"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "L2I-L"                # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10", "aflw")    # the first is the default


def parse_args(argv=None):
    parser = common_parser("L2I-L: learning to impute, labels as learnable tensors", BASED_ON, DATASETS,
                           method=METHOD)
    add_meta_options(parser, label_step=True)
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA, MeanTeacher  # noqa: E402
from utils.meta import imputed_label_gradient, label_generator_output  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.schedules import unsup_weight  # noqa: E402
from utils.steps import UpdateSizes, consistency_update, set_lr  # noqa: E402


def build(args, task, device):
    """MT's networks (docs/method.md §2.1) and optimizer; the imputed labels are a tensor of each iteration."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           mean_teacher=MeanTeacher(student, args.ema_decay),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model, nets.mean_teacher.model)
    return nets


def train_step(nets, batch, task, args, weight, step):
    """One L2I-L iteration; ``weight`` = λ_u after its ramp-up, ``step`` = the global iteration t."""
    student, optimizer = nets.student, nets.optimizer
    updates = UpdateSizes(student.parameters())  # for the logs: how far each optimizer step moves θ
    # 1-4. MT update: the mean teacher labels view 2; L_x + w·L_u; optimizer step #1 (utils/steps.py).
    losses = consistency_update(student, optimizer, task, batch, nets.mean_teacher.model, weight)
    first_update = updates.since_last()
    if args.ema_updates == 2:  # AFLW: EMA-E after each optimizer step (docs/method.md §4.5 step 4)
        nets.ema_eval.update(student)
    optimizer.zero_grad(set_to_none=True)
    # 5. Imputed labels r: the current student's output on view 2, detached (no path back to φ).
    with torch.no_grad():
        labels = label_generator_output(student, batch.u2)
    # 6. The student on view 1: an extra, non-interleaved forward (docs/faithfulness.md §1.7).
    student_out = student(batch.u1)
    # 7-8. dM(θ')/dr with θ' = θ - η·∇θ V(o, r), η = virtual-step × current lr (utils/meta.py). Its view-1
    # graph is kept: the refinement loss (step 10) back-propagates through it again.
    lr = optimizer.param_groups[0]["lr"]
    grad_labels, meta_loss = imputed_label_gradient(student, task, args, lr, batch, student_out, labels, keep_graph=True)
    # 9. One plain gradient step on the labels.
    refined = labels - args.label_step * grad_labels
    # 10-11. Refinement loss towards the refined labels (no λ, no ramp), optimizer step #2 (shared state).
    loss_refine = task.consistency_loss(student_out, task.impute(refined, batch))
    loss_refine.backward()
    optimizer.step()
    second_update = updates.since_last()
    # 12. EMA-E (with the student shrink on CIFAR-10), then the mean teacher.
    nets.ema_eval.update(student)
    nets.mean_teacher.update(student, step)
    # What the meta step did (README "Quick try"): M(θ'), the size of dM/dr, and the second update's size
    # relative to the first.
    return dict(losses, loss_refine=loss_refine.detach(), meta_loss=meta_loss, meta_grad_norm=grad_labels.norm(),
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
