"""Run-folder outputs that grow during training: ``log.txt``, tensorboard events, the progress bar."""
import os
import sys
import time

from progress.bar import Bar
from tensorboardX import SummaryWriter

LOG = "log.txt"


def write_log(folder, columns, rows):
    """Rewrite ``log.txt`` whole (the authors' format: tab after every field, values with 6 decimals).

    Rewriting from the checkpoint's history keeps the file consistent with the checkpoint even when a
    run died between the two writes.
    """
    lines = ["".join(f"{name}\t" for name in columns)]
    lines += ["".join(f"{row[name]:.6f}\t" for name in columns) for row in rows]
    tmp = os.path.join(folder, LOG + ".tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(folder, LOG))


def open_writer(folder, first_step):
    """tensorboardX writer; on resume, events at or after ``first_step`` from the earlier attempt are purged.

    tensorboardX names the events file after the current second and the host, so an attempt resumed
    within the second its predecessor started would overwrite the predecessor's file. A nanosecond
    suffix keeps one file per attempt, in the order tensorboard reads them (sorted by name).
    """
    return SummaryWriter(logdir=folder, purge_step=first_step, filename_suffix=f".{time.time_ns()}")


class EpochProgress:
    """A ``progress`` bar over one epoch's iterations, or nothing with ``--no-progress``."""

    def __init__(self, title, total, enabled):
        self.bar = Bar(title, max=total, file=sys.stdout) if enabled else None

    def step(self, text):
        if self.bar is not None:
            self.bar.suffix = text
            self.bar.next()

    def finish(self):
        if self.bar is not None:
            self.bar.finish()
