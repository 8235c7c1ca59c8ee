"""Mean Teacher (SPEC §B.1.1 on CIFAR-10, §B.2.3 on AFLW).

    python train-MT.py --gpu 0 --n-labeled 250  --out cifar10MT@250
    python train-MT.py --gpu 0 --n-labeled 0.01 --out aflwMT@0.01
"""
import torch

from utils.options import common_parser
from utils.training import run_script

METHOD = "MT"


def parse_args(argv=None):
    return common_parser("Mean Teacher").parse_args(argv)


def train_step(run, batch):
    task = run.task
    # 1. Targets: the mean teacher's prediction on view 2, as a label for view 1 (no gradient).
    with torch.no_grad():
        target = task.impute(run.mean_teacher.model(batch.u2), batch)
    # 2-3. Student on labeled images and view 1; supervised + ramped consistency loss.
    out_l, out_u = task.student_forward(run.student, batch.x_l, batch.u1)
    loss_x = task.supervised_loss(out_l, batch.y_l)
    loss_u = task.consistency_loss(out_u, target)
    loss = loss_x + run.unsup_weight() * loss_u
    # 4. Optimizer step.
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    # 5-6. EMA-E (with the student shrink on CIFAR-10), then the teacher with β_t = min(1-1/(t+1), decay).
    run.ema_eval.update(run.student)
    run.mean_teacher.update(run.student, run.step)
    return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}


def main(argv=None):
    run_script(METHOD, parse_args, train_step, argv)


if __name__ == "__main__":
    main()
