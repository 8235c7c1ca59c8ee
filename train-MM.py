"""MixMatch, as in the authors' copy of YU1ut/MixMatch-pytorch (docs/method.md §3.2). CIFAR-10 only:
sharpening and mixing of labels are defined for classes, not for landmark coordinates.

    python train-MM.py --gpu 0 --n-labeled 250 --out cifar10MM@250
"""
from utils.options import check_command_line, common_parser, method_name

METHOD = method_name(__file__)    # "MM"; a copy named train-MYVAR.py trains the method "MYVAR"
BASED_ON = "MM"                   # whose options and per-task defaults this script takes (docs/defaults.md)
DATASETS = ("cifar10",)


def parse_args(argv=None):
    parser = common_parser("MixMatch", BASED_ON, DATASETS)
    mixmatch = parser.add_argument_group("MixMatch")
    mixmatch.add_argument("--alpha", type=float, help="Beta(alpha, alpha) of the mixing weight (default 0.75)")
    mixmatch.add_argument("--T", type=float, help="sharpening temperature (default 0.5)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # --help and option errors answer now, before PyTorch is imported
    check_command_line(parse_args)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.interleave import interleaved_forward  # noqa: E402
from utils.training import run_script  # noqa: E402


def sharpen(p, temperature):
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def train_step(run, batch):
    task, args, n = run.task, run.args, len(batch.x_l)
    # 1. Label guess: average prediction of the student (train mode) on both views, sharpened.
    with torch.no_grad():
        guess = (task.prediction(run.student(batch.u1)) + task.prediction(run.student(batch.u2))) / 2
        guess = sharpen(guess, args.T)
    # 2-3. MixUp of all 3B images and targets with one λ ~ Beta(α, α), λ ≥ 0.5, and one permutation.
    inputs = torch.cat([batch.x_l, batch.u1, batch.u2])
    targets = torch.cat([batch.y_l, guess, guess])
    lam = np.random.beta(args.alpha, args.alpha)
    lam = max(lam, 1 - lam)
    perm = torch.randperm(len(inputs)).to(inputs.device)
    mixed_inputs = lam * inputs + (1 - lam) * inputs[perm]
    mixed_targets = lam * targets + (1 - lam) * targets[perm]
    # 4. Three student forwards through the 3-way BN interleave (docs/method.md §2.3).
    outputs = interleaved_forward(run.student, list(torch.split(mixed_inputs, n)))
    # 5. Cross-entropy on the mixed labeled chunk, squared error on the two mixed unlabeled chunks.
    loss_x = task.supervised_loss(outputs[0], mixed_targets[:n])
    loss_u = task.consistency_loss(torch.cat(outputs[1:]), mixed_targets[n:])
    loss = loss_x + run.unsup_weight() * loss_u
    # 6. Optimizer step, then EMA-E with the student shrink. MixMatch has no mean teacher.
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.ema_eval.update(run.student)
    return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv, datasets=DATASETS)


if __name__ == "__main__":
    main()
