"""Atomic full-state checkpoints (README "Monitoring and run folders").

A checkpoint is written to a temporary file in the same folder and then renamed over the old one,
so a crash mid-save never destroys the last good checkpoint.
"""
import os
import shutil

import torch

from utils.errors import UserError
from utils.folder import BEST, CHECKPOINT


def _replace_atomically(write, path):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state, folder, is_best):
    path = os.path.join(folder, CHECKPOINT)
    _replace_atomically(lambda f: torch.save(state, f), path)
    if is_best:
        with open(path, "rb") as src:
            _replace_atomically(lambda f: shutil.copyfileobj(src, f), os.path.join(folder, BEST))


def checkpoint_path(resume):
    """``--resume`` names a run folder or its latest checkpoint file.

    A resumed run writes its next epochs into the checkpoint's folder, so resuming from an earlier state
    (``model_best.pth.tar``) would rewind the run and overwrite the later epochs' checkpoint and log rows.
    """
    path = os.path.join(resume, CHECKPOINT) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise UserError(f"--resume {resume}: no checkpoint at {path}")
    name = os.path.basename(path)
    if name == BEST:
        raise UserError(f"--resume {resume}: a run continues from its latest checkpoint, {CHECKPOINT}; resuming "
                        f"from {BEST} would rewind it and overwrite the later epochs. "
                        f"Give the run folder: --resume {os.path.dirname(path) or '.'}")
    if name != CHECKPOINT:
        raise UserError(f"--resume {resume}: {name} is not a checkpoint of this repository's runs; give a run "
                        f"folder, or the {CHECKPOINT} in it")
    return path


def load_checkpoint(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(f"cannot read checkpoint {path} ({exc.__class__.__name__}); it is damaged or not "
                        f"a checkpoint of this repository") from None
    if not isinstance(state, dict) or "args" not in state or "epoch" not in state:
        raise UserError(f"{path} is not a checkpoint of this repository (no run state in it)")
    return state
