"""Device selection, seeding and the CPU memory allocator."""
import ctypes
import random
import sys

import numpy as np
import torch

from utils.errors import UserError


def select_device(gpu):
    """``--gpu ID`` as in the authors' scripts: ``None`` (not given) means 0, as ``--help`` says; ``'cpu'``
    forces the CPU, and the CPU is used when CUDA is unavailable (the training scripts say so once training
    starts, so that the note never precedes a data error). Of a list such
    as ``0,1`` (the authors' CUDA_VISIBLE_DEVICES value) the first id is used. On CUDA the device is made
    the current one, so that nothing (cuDNN and cuBLAS handles, the RNG, a ``'cuda'`` without an index)
    opens a context on GPU 0 when training on another GPU."""
    gpu = "0" if gpu is None else str(gpu).strip()
    if gpu == "cpu":
        return torch.device("cpu")
    first = gpu.split(",")[0].strip()
    if not first.isdigit():
        raise UserError(f"--gpu {gpu}: not a CUDA device id; give one such as 0, or --gpu cpu")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index, count = int(first), torch.cuda.device_count()
    if index >= count:
        raise UserError(f"--gpu {gpu}: no such CUDA device (this machine has {count}); "
                        f"give an id below that, or --gpu cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def configure_backends(device, tf32):
    """The CUDA backend settings of training (and of utils.benchmark); nothing on the CPU.

    cuDNN picks the fastest convolution algorithms for the shapes it meets (``cudnn.benchmark``, as the
    authors did; GPU runs are not bit-reproducible anyway). TF32 is set explicitly for both cuBLAS matmuls
    and cuDNN convolutions: PyTorch's own defaults differ (matmuls IEEE, cuDNN TF32), so without ``--tf32``
    an "fp32" run on an Ampere or later GPU would silently convolve in TF32 (10 mantissa bits).

    The legacy ``allow_tf32`` flags are used, and only they: PyTorch raises a RuntimeError when a legacy
    getter is read after the newer ``fp32_precision`` settings were written (the two APIs must not be
    mixed), and torch 2.14 itself (inductor) still reads the legacy getters, while a
    legacy write keeps both APIs' getters consistent. They also exist in every supported torch (≥ 2.6; the
    ``fp32_precision`` settings arrived in 2.9).
    """
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)


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


def rng_state(device):
    """All RNG states that training draws from, as types ``torch.load(weights_only=True)`` accepts: python's,
    numpy's, torch's CPU generator and, on a CUDA ``device``, that device's generator only (so that a run
    resumes on a machine with another number of GPUs, or with another ``--gpu``)."""
    device = torch.device(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    """Restore ``rng_state``'s states; the saved CUDA generator goes to ``device`` (the resuming run's).

    Nothing CUDA-related is touched on a CPU device, and a state saved on the CPU leaves the CUDA generator
    as seeded. Checkpoints written before this format hold under ``"cuda"`` a list, the state of every GPU
    of the saving machine (``get_rng_state_all``): the entry of ``device``'s index is restored, as the old
    code did for a run resumed with the same ``--gpu``, else (fewer GPUs saved) the first one; the others
    were never drawn from by that run.
    """
    device = torch.device(device)
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):  # the old format: one state per GPU of the saving machine
        if not cuda:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda, device)


def compile_networks(args, *networks):
    """``--compile``: ``torch.compile`` each network in place, so parameter names and state dicts stay those
    of the plain model; a no-op without the flag."""
    if not args.compile:
        return
    # The L2I meta step back-propagates the student's view-1 graph twice (retain_graph), which compiled
    # backwards only allow without buffer donation.
    torch._functorch.config.donated_buffer = False
    for network in networks:
        network.compile()
