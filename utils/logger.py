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
    seconds; ``--no-progress`` shows neither. Both give the time left in the epoch and in the whole run
    (training only, at the current speed; ``later_iterations``: those of the epochs after this one). The
    scripts print the lines of each finished epoch in every mode.

    ``due`` says when to refresh, so that the caller reads its losses from the device only then.
    """
    BAR_REFRESH_S = 0.5
    PLAIN_EVERY_S = 60.0
    BAR_WIDTH = 12   # "Epoch 1024/1024 |" + 12 + "| " + the longest suffix fits 80 columns

    def __init__(self, epoch, epochs, total, enabled, later_iterations=0):
        self.epoch, self.epochs, self.total, self.later = epoch, epochs, total, later_iterations
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
        epoch_eta = _duration(seconds_per_iteration * (self.total - done))
        run_eta = short_duration(seconds_per_iteration * (self.total - done + self.later))
        if self.mode == "bar":
            self.bar.suffix = (f"{done}/{self.total} {seconds_per_iteration:.2g}s/it loss {loss:.3g} "
                               f"ETA {epoch_eta} run {run_eta}")
            self.bar.goto(done)
        else:
            print(f"  epoch {self.epoch}/{self.epochs}: iteration {done}/{self.total}, "
                  f"{seconds_per_iteration:.3g} s each, loss {loss:.4g}, epoch ends in {epoch_eta}, "
                  f"run in {run_eta}", flush=True)

    def finish(self):
        if self.bar is not None:
            self.bar.finish()


def _duration(seconds):
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def short_duration(seconds):
    """``41d03h``, ``3h05m``, ``12m09s``: a run's remaining time in a few characters."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
