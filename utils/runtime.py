"""Device selection, seeding and the CPU memory allocator."""
import ctypes
import random
import sys

import numpy as np
import torch

from utils.errors import UserError


def select_device(gpu):
    """``--gpu ID`` as in the authors' scripts; CPU (announced in one line) when CUDA is unavailable."""
    if gpu == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        print("CUDA is not available: running on the CPU.", file=sys.stderr)
        return torch.device("cpu")
    first = gpu.split(",")[0]
    if not first.isdigit() or int(first) >= torch.cuda.device_count():
        raise UserError(f"--gpu {gpu}: no such CUDA device (this machine has {torch.cuda.device_count()}); "
                        f"give an id below that, or --gpu cpu")
    return torch.device(f"cuda:{first}")


# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Let glibc reuse freed CPU memory instead of returning it to the OS; returns whether it applied.

    By default glibc serves large allocations with fresh mmap pages and unmaps them on free, and it
    trims the top of the heap when enough of it is free, so every iteration's activations fault their
    pages in anew: about 150 000 page faults and a third of the time of an AFLW MT iteration on the CPU
    (README "Speed"). Serving everything from the heap and never trimming it removes that. Only where
    tensors live changes, not what is computed: the numbers are bit-identical (tests/test_speed.py).
    The process's resident memory then stays at its peak. A no-op outside glibc (macOS, Windows, musl).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # no glibc, or one without mallopt
        return False


def warn_if_slow_bf16(device):
    """--amp on a CPU without bf16 instructions (AVX512-BF16 or AMX) runs PyTorch's reference bf16
    kernels, ~10× slower than fp32 (measured on an AVX2-only EPYC): say so once instead of silently.
    Silent where this (private) PyTorch query does not exist."""
    try:
        native = device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = True
    if not native:
        print("warning: this CPU has no bf16 instructions (AVX512-BF16/AMX); --amp will be much slower "
              "than fp32 here", file=sys.stderr)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """All RNG states, as types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
