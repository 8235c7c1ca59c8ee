"""Landmark arithmetic for AFLW: target normalisation, shift compensation, metrics.

Coordinates are N×10 tensors laid out ``[x0,y0,x1,y1,…,x4,y4]`` in the 60×60 frame (docs/data.md §2).
All functions are plain torch ops on the inputs' device; the 10-vectors ``mean``/``std`` may live on
any device and are moved to the input's (docs/faithfulness.md §2.5 and §2.6), but never rounded to a
lower-precision input's dtype: a bf16 input (``--amp``) gives fp32 results, since bf16 spaces values near
30 px by 0.125 px (docs/method.md §2.5).
"""
import torch

NUM_POINTS = 5
FAILURE_THRESHOLD = 0.1


def _working(statistic, x):
    """``statistic`` on ``x``'s device, in the wider of the two dtypes (the result's, by type promotion)."""
    return statistic.to(device=x.device, dtype=torch.promote_types(x.dtype, statistic.dtype))


def normalise(y, mean, std):
    """``n(y) = (y − μ) / s`` (docs/method.md §1.1)."""
    return (y - _working(mean, y)) / _working(std, y)


def denormalise(v, mean, std):
    """``n⁻¹(v) = v ⊙ s + μ`` (docs/method.md §1.1)."""
    return v * _working(std, v) + _working(mean, v)


def shift_compensate(v2, dx1, dy1, dx2, dy2, mean, std):
    """Map normalised predictions on view 2 to targets for view 1 (docs/method.md §2.5).

    ``S(v₂) = n(n⁻¹(v₂) + [dx1−dx2, dy1−dy2] × 5)``. Affine in ``v₂``, so it can sit inside an
    autograd graph (L2I). The offsets are length-N tensors of any numeric dtype.
    """
    working = torch.promote_types(v2.dtype, mean.dtype)  # the dtype of n⁻¹(v₂)

    def offset(a):
        return torch.as_tensor(a).to(device=v2.device, dtype=working)

    shift = torch.stack([offset(dx1) - offset(dx2), offset(dy1) - offset(dy2)], dim=1)
    return normalise(denormalise(v2, mean, std) + shift.repeat(1, NUM_POINTS), mean, std)


def landmark_errors(pred, target):
    """Per-image error in the 60×60 pixel frame, normalised by the inter-ocular distance (docs/evaluation.md §2).

    ``err = mean_k ‖P_k − Y_k‖ / ‖Y_0 − Y_1‖`` with points 0 and 1 the ground-truth eyes.
    """
    pred = pred.reshape(-1, NUM_POINTS, 2)
    target = target.reshape(-1, NUM_POINTS, 2)
    inter_ocular = torch.linalg.vector_norm(target[:, 0] - target[:, 1], dim=1)
    return torch.linalg.vector_norm(pred - target, dim=2).mean(dim=1) / inter_ocular


def error_and_failure_sums(pred, target):
    """Over a batch, the sum of the per-image errors and the number of failures (``err > 0.1`` strictly),
    as tensors on the batch's device: ME and FR are their sums over a set divided by its size
    (docs/evaluation.md §2)."""
    errors = landmark_errors(pred, target)
    return errors.sum(), (errors > FAILURE_THRESHOLD).sum().float()
