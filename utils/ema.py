"""The two exponential-moving-average models of docs/method.md §2.1.

* ``EvalEMA`` ("EMA-E", the authors' ``ema_model``): the model that is evaluated. Pure EMA of the
  student's parameters, plus the classification quirk that every update also shrinks the *student*
  by ``1 - shrink`` (docs/faithfulness.md §1.1), and an end-of-epoch copy of the student's BN buffers.
* ``MeanTeacher`` ("EMA-T", the authors' ``target_model``): produces consistency targets; warm-up
  decay ``min(1 - 1/(t+1), decay)``; stays in train mode (its BN uses batch statistics, item 24).
"""
import copy

import torch


def _frozen_copy(model):
    clone = copy.deepcopy(model)
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def _fresh_buffers(model):
    """Reset BN running statistics to their initial values (mean 0, var 1, count 0)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


class _EMAModel:
    """An EMA network; checkpointed as its network's state dict."""

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


class EvalEMA(_EMAModel):
    """EMA-E: parameters start as the student's, BN buffers at their init values (docs/method.md §2.1)."""

    def __init__(self, student, decay, shrink):
        self.model = _frozen_copy(student)
        _fresh_buffers(self.model)
        self.decay = decay
        self.shrink = shrink  # per-update student shrink factor, e.g. 0.02 * lr = 4e-5 on CIFAR-10

    @torch.no_grad()
    def update(self, student):
        ema_params = list(self.model.parameters())
        student_params = list(student.parameters())
        torch._foreach_lerp_(ema_params, student_params, 1.0 - self.decay)
        if self.shrink:
            torch._foreach_mul_(student_params, 1.0 - self.shrink)

    @torch.no_grad()
    def copy_buffers(self, student):
        """End-of-epoch BN sync: parameters stay the EMA, running statistics become the student's."""
        for ema_buffer, buffer in zip(self.model.buffers(), student.buffers()):
            ema_buffer.copy_(buffer)


class MeanTeacher(_EMAModel):
    def __init__(self, student, decay):
        self.model = _frozen_copy(student)
        self.decay = decay

    def decay_at(self, step):
        """``β_t = min(1 - 1/(t+1), decay)``: 0 at t = 0, so the teacher equals the student after step 0."""
        return min(1.0 - 1.0 / (step + 1), self.decay)

    @torch.no_grad()
    def update(self, student, step):
        torch._foreach_lerp_(list(self.model.parameters()), list(student.parameters()),
                             1.0 - self.decay_at(step))
