"""Run-folder outputs that grow during training: ``log.txt``, tensorboard events, the progress bar."""
import os
import sys
import time

from progress.bar import Bar
from tensorboardX import SummaryWriter

from utils.folder import LOG


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
    """tensorboardX writer; events at or after ``first_step`` from earlier attempts are purged.

    tensorboardX names the events file after the current second and the host, so an attempt resumed
    within the second its predecessor started would overwrite the predecessor's file. A nanosecond
    suffix keeps one file per attempt, in the order tensorboard reads them (sorted by name).
    """
    return SummaryWriter(logdir=folder, purge_step=first_step, filename_suffix=f".{time.time_ns()}")


class EpochProgress:
    """How an epoch's progress is shown: a ``progress`` bar that fits an 80-column terminal, or, when stdout
    is not a terminal (nohup, a log file, a cluster job), a plain line at most every ``PLAIN_EVERY_S``
    seconds; ``--no-progress`` shows neither. The scripts print one line per finished epoch in every mode.

    ``due`` says when to refresh, so that the caller reads its losses from the device only then.
    """
    BAR_REFRESH_S = 0.5
    PLAIN_EVERY_S = 60.0
    BAR_WIDTH = 16   # "Epoch 1024/1024 |" + 16 + "| " + the longest suffix fits 80 columns

    def __init__(self, epoch, epochs, total, enabled):
        self.epoch, self.epochs, self.total = epoch, epochs, total
        self.mode = None if not enabled else "bar" if sys.stdout.isatty() else "plain"
        self.bar = (Bar(f"Epoch {epoch}/{epochs}", max=total, width=self.BAR_WIDTH, file=sys.stdout)
                    if self.mode == "bar" else None)
        self.last_shown = time.monotonic()

    def due(self, done):
        """Whether iteration ``done`` (1-based) should be shown: the last one, or enough time has passed."""
        if self.mode is None:
            return False
        interval = self.BAR_REFRESH_S if self.mode == "bar" else self.PLAIN_EVERY_S
        return done == self.total or time.monotonic() - self.last_shown >= interval

    def show(self, done, seconds_per_iteration, loss):
        self.last_shown = time.monotonic()
        eta = _duration(seconds_per_iteration * (self.total - done))
        if self.mode == "bar":
            self.bar.suffix = f"{done}/{self.total} {seconds_per_iteration:.3g}s/it loss {loss:.4g} ETA {eta}"
            self.bar.goto(done)
        else:
            print(f"  epoch {self.epoch}/{self.epochs}: iteration {done}/{self.total}, "
                  f"{seconds_per_iteration:.3g} s each, loss {loss:.4g}, epoch ends in {eta}", flush=True)

    def finish(self):
        if self.bar is not None:
            self.bar.finish()


def _duration(seconds):
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
