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
    parser = common_parser("L2I-L: learning to impute, labels as learnable tensors", BASED_ON, DATASETS)
    add_meta_options(parser, label_step=True)
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

import torch  # noqa: E402

from utils.meta import imputed_label_gradient, label_generator_output  # noqa: E402  (imports PyTorch)
from utils.steps import consistency_update  # noqa: E402
from utils.training import run_script  # noqa: E402


def train_step(run, batch):
    task, args = run.task, run.args
    # 1-4. MT update: the mean teacher labels view 2; L_x + w·L_u; optimizer step #1 (utils/steps.py).
    losses = consistency_update(run, batch, labeler=run.mean_teacher.model)
    if args.ema_updates == 2:  # AFLW: EMA-E after each optimizer step (docs/method.md §4.5 step 4)
        run.ema_eval.update(run.student)
    run.optimizer.zero_grad(set_to_none=True)
    # 5. Imputed labels r: the current student's output on view 2, detached (no path back to φ).
    with torch.no_grad():
        labels = label_generator_output(run.student, batch.u2)
    # 6. The student on view 1: an extra, non-interleaved forward (docs/faithfulness.md §1.7).
    student_out = run.student(batch.u1)
    # 7-8. dM(θ')/dr with θ' = θ - η·∇θ V(o, r), η = virtual-step × current lr (utils/meta.py). Its view-1
    # graph is kept: the refinement loss (step 10) back-propagates through it again.
    grad_labels = imputed_label_gradient(run, batch, student_out, labels, keep_graph=True)
    # 9. One plain gradient step on the labels.
    refined = labels - args.label_step * grad_labels
    # 10-11. Refinement loss towards the refined labels (no λ, no ramp), optimizer step #2 (shared state).
    loss_refine = task.consistency_loss(student_out, task.impute(refined, batch))
    loss_refine.backward()
    run.optimizer.step()
    # 12. EMA-E (with the student shrink on CIFAR-10), then the mean teacher.
    run.ema_eval.update(run.student)
    run.mean_teacher.update(run.student, run.step)
    return dict(losses, loss_refine=loss_refine.detach())


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=DATASETS, meta_batches=True)


if __name__ == "__main__":
    main()
