"""MixMatch, as in the authors' copy of YU1ut/MixMatch-pytorch (docs/method.md §3.2). CIFAR-10 only:
sharpening and mixing of labels are defined for classes, not for landmark coordinates.

    python train-MM.py --gpu 0 --n-labeled 250 --out cifar10MM@250
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "MM"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "MM"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10",)


def parse_args(argv=None):
    parser = common_parser("MixMatch", BASED_ON, DATASETS, method=METHOD)
    mixmatch = parser.add_argument_group("MixMatch")
    mixmatch.add_argument("--alpha", type=float, help="Beta(alpha, alpha) of the mixing weight (default 0.75)")
    mixmatch.add_argument("--T", type=float, help="sharpening temperature (default 0.5)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.bookkeeping import bookkeeping  # noqa: E402  (imports PyTorch)
from utils.ema import EvalEMA  # noqa: E402
from utils.interleave import interleaved_forward  # noqa: E402
from utils.runtime import compile_networks  # noqa: E402
from utils.schedules import unsup_weight  # noqa: E402
from utils.steps import set_lr  # noqa: E402


def build(args, task, device):
    """The student, its evaluation EMA (docs/method.md §2.1) and the optimizer. MixMatch has no mean teacher."""
    student = task.build_student(args, device)
    nets = SimpleNamespace(student=student,
                           ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
                           optimizer=task.make_optimizer(student.parameters(), args))
    compile_networks(args, student, nets.ema_eval.model)
    return nets


def sharpen(p, temperature):
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def train_step(nets, batch, task, args, weight, step):
    """One MixMatch iteration; ``weight`` = λ_u after its ramp-up (``step`` is unused: no teacher)."""
    student, n = nets.student, len(batch.x_l)
    # 1. Label guess: average prediction of the student (train mode) on both views, sharpened.
    with torch.no_grad():
        guess = (task.prediction(student(batch.u1)) + task.prediction(student(batch.u2))) / 2
        guess = sharpen(guess, args.T)
    # 2-3. MixUp of all 3B images and targets with one λ ~ Beta(α, α), λ ≥ 0.5, and one permutation.
    inputs = torch.cat([batch.x_l, batch.u1, batch.u2])
    targets = torch.cat([batch.y_l, guess, guess])
    lam = np.random.beta(args.alpha, args.alpha)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(inputs), device=inputs.device)  # drawn on the device: no host copy
    mixed_inputs = lam * inputs + (1 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    # 4. Three student forwards through the 3-way BN interleave (docs/method.md §2.3).
    outputs = interleaved_forward(student, list(torch.split(mixed_inputs, n)))
    # 5. Cross-entropy on the mixed labeled chunk, squared error on the two mixed unlabeled chunks.
    loss_x = task.supervised_loss(outputs[0], mixed_targets[:n])
    loss_u = task.consistency_loss(torch.cat(outputs[1:]), mixed_targets[n:])
    loss = loss_x + weight * loss_u
    # 6. Optimizer step, then EMA-E with the student shrink.
    nets.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nets.optimizer.step()
    nets.ema_eval.update(student)
    return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}


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
