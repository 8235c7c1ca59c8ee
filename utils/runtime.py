"""Device selection and seeding."""
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
