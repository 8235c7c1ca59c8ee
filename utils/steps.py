"""The consistency update shared by PL, MT and both L2I variants (they differ in who labels view 2)."""
import torch


def consistency_update(student, optimizer, task, batch, labeler, weight):
    """One optimizer step on ``L_x + weight·L_u`` (docs/method.md §3.1 steps 1-4, §4.2-§4.3 steps 1-4).

    ``labeler`` (the mean teacher for MT and L2I, the student itself for PL) predicts view 2 without
    gradient; the task turns that into a label for view 1 (softmax, or shift-compensated landmarks).
    The student sees the labeled images and view 1 (through the BN interleave on CIFAR-10).
    Returns the losses for logging: total, supervised and the unweighted consistency loss.
    """
    with torch.no_grad():
        target = task.impute(labeler(batch.u2), batch)
    out_l, out_u = task.student_forward(student, batch.x_l, batch.u1)
    loss_x = task.supervised_loss(out_l, batch.y_l)
    loss_u = task.consistency_loss(out_u, target)
    loss = loss_x + weight * loss_u
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach()}


def set_lr(optimizer, lr):
    """Every parameter group of ``optimizer`` at learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class UpdateSizes:
    """How far each optimizer step moves the parameters, ‖Δθ‖, for the logs (L2I: the meta step's second
    update beside the first). Reads nothing from the device: the sizes stay tensors until logged."""

    def __init__(self, parameters):
        self.parameters = list(parameters)
        self.last = [p.detach().clone() for p in self.parameters]

    def since_last(self):
        """‖θ now − θ at the previous call (or at construction)‖ over all parameters."""
        now = [p.detach().clone() for p in self.parameters]
        change = torch._foreach_sub(now, self.last)
        self.last = now
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(change)))
