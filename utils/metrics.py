"""Classification metric (docs/evaluation.md §1). Landmark metrics live in ``utils.landmarks``."""
import torch


@torch.no_grad()
def top1_accuracy(logits, targets):
    """Top-1 accuracy in percent, a float64 tensor on the logits' device: read on the host only when the
    whole evaluation is done (on a GPU, every read waits for it)."""
    return (logits.argmax(dim=1) == targets).float().mean().double() * 100.0
