"""Classification metric (docs/evaluation.md §1). Landmark metrics live in ``utils.landmarks``."""
import torch


@torch.no_grad()
def top1_accuracy(logits, targets):
    """Top-1 accuracy in percent."""
    return (logits.argmax(dim=1) == targets).float().mean().item() * 100.0
