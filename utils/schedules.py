"""Ramp-up of the unsupervised weight (docs/method.md §2.2)."""


def linear_rampup(current, rampup_length):
    """``clip(current / length, 0, 1)``; 1 when the length is 0."""
    if rampup_length == 0:
        return 1.0
    return min(max(current / rampup_length, 0.0), 1.0)


def unsup_weight(task, args, epoch, iteration, step):
    """``lambda_u · ramp(progress, rampup_length)``: progress in fractional epochs on CIFAR-10, in global
    iterations on AFLW (``task.ramp_progress``)."""
    return args.lambda_u * linear_rampup(task.ramp_progress(epoch, iteration, step, args), args.rampup_length)
