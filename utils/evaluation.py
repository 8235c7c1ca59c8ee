"""The reporting protocol of each task (docs/evaluation.md): log.txt columns, tensorboard tags, model
selection and the summary values. Free of PyTorch, so ``utils.results`` reads run folders without it.

An epoch's *record* is a flat dict: ``train_loss``, ``train_loss_x``, … (means of what the script recorded
in the epoch's iterations), ``val_loss``, ``val_acc``, ``test_acc``, … (evaluations), ``epoch``.
"""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Protocol:
    metric: str              # the value model selection and the summary use: "acc" or "me"
    higher_is_better: bool
    columns: tuple           # log.txt: (column name, record key), the authors' layout
    tags: dict               # tensorboard tag → record key

    def best_after(self, best, record):
        """Model selection on the validation metric; strictly better replaces (docs/evaluation.md §3).
        Returns (best, whether this record is the new best)."""
        value = record[f"val_{self.metric}"]
        if best is None or (value > best["val"] if self.higher_is_better else value < best["val"]):
            return {"val": value, "epoch": record["epoch"], "test": record[f"test_{self.metric}"]}, True
        return best, False

    def log_row(self, record):
        """A log.txt row. A column the method does not compute (SL's ``Train Loss U``) holds 0, as in the
        authors' logs, whose meters of an absent loss stay at 0."""
        return {name: record.get(key, 0.0) for name, key in self.columns}

    def epoch_line(self, epoch, epochs, record):
        m = self.metric
        return (f"epoch {epoch}/{epochs}  train loss {record['train_loss']:.4f}  "
                f"valid {m} {record[f'val_{m}']:.4f}  test {m} {record[f'test_{m}']:.4f}")


_TRAIN_LOSSES = (("Train Loss", "train_loss"), ("Train Loss X", "train_loss_x"), ("Train Loss U", "train_loss_u"))
_LOSS_TAGS = {"losses/train_loss": "train_loss", "losses/valid_loss": "val_loss", "losses/test_loss": "test_loss"}

PROTOCOLS = {
    "cifar10": Protocol(  # top-1 accuracy in percent (docs/evaluation.md §1)
        metric="acc", higher_is_better=True,
        columns=_TRAIN_LOSSES + (("Valid Loss", "val_loss"), ("Valid Acc.", "val_acc"), ("Test Loss", "test_loss"),
                                 ("Test Acc.", "test_acc")),
        tags=dict(_LOSS_TAGS, **{f"accuracy/{split}_acc": f"{split}_acc" for split in ("train", "val", "test")})),
    "aflw": Protocol(  # mean error and failure rate, fractions of the inter-ocular distance (docs/evaluation.md §2)
        metric="me", higher_is_better=False,
        columns=_TRAIN_LOSSES + (("Train ME", "train_me"), ("Train FR", "train_fr"), ("Valid Loss", "val_loss"),
                                 ("Valid ME.", "val_me"), ("Valid FR", "val_fr"), ("Test Loss", "test_loss"),
                                 ("Test ME.", "test_me"), ("Test FR", "test_fr")),
        tags=dict(_LOSS_TAGS, **{f"accuracy/{split}_{m}": f"{split}_{m}"
                                 for m in ("me", "fr") for split in ("train", "val", "test")})),
}


def summarize(protocol, history, wall_time, args):
    """Every candidate protocol value (docs/evaluation.md §3): the best-validation epoch's test value, median
    and mean of the last 20 test values. ``args`` needs method, dataset, n_labeled and manualSeed."""
    m = protocol.metric
    vals = [row[f"val_{m}"] for row in history]
    pick = int(np.argmax(vals) if protocol.higher_is_better else np.argmin(vals))  # first best = strictly better
    last = [row[f"test_{m}"] for row in history[-20:]]
    return {"method": args.method, "dataset": args.dataset, "n_labeled": args.n_labeled, "seed": args.manualSeed,
            "metric": m, "higher_is_better": protocol.higher_is_better, "epochs": len(history),
            "best_epoch": pick + 1, "best_val": vals[pick], "test_at_best_val": history[pick][f"test_{m}"],
            "median_last20_test": float(np.median(last)), "mean_last20_test": float(np.mean(last)),
            "wall_time_s": wall_time, "finished": True}
