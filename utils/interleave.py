"""The BN "interleave" trick of the CIFAR-10 scripts (docs/method.md §2.3).

Each of the k student forwards sees a mix of labeled and unlabeled rows, so every BN batch statistic
mixes both. Applying ``interleave`` to the k outputs undoes the swap (it is its own inverse).
"""
import torch


def interleave_offsets(batch_size, k):
    """Group boundaries: ``batch_size // k`` each, the remainder added one by one to the last groups."""
    groups = [batch_size // k] * k
    for extra in range(batch_size - sum(groups)):
        groups[-extra - 1] += 1
    offsets = [0]
    for group in groups:
        offsets.append(offsets[-1] + group)
    return offsets


def interleave(batches, batch_size):
    """Swap group j of batch 0 with group j of batch j, for j = 1..k-1."""
    k = len(batches)
    offsets = interleave_offsets(batch_size, k)
    groups = [[b[offsets[p]:offsets[p + 1]] for p in range(k)] for b in batches]
    for j in range(1, k):
        groups[0][j], groups[j][j] = groups[j][j], groups[0][j]
    return [torch.cat(g, dim=0) for g in groups]


def interleaved_forward(model, batches):
    """One forward per mixed batch (k BN updates), outputs restored to the original order."""
    batch_size = batches[0].shape[0]
    mixed = interleave(batches, batch_size)
    return interleave([model(x) for x in mixed], batch_size)
