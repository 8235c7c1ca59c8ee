"""Every option's default, per task and per method: the authors' values (docs/defaults.md).

Free of PyTorch, so that ``--help`` shows the defaults and option errors answer in a second.
``method`` here is one of the six methods; a copied script names the one it is based on
(``BASED_ON`` in the script), and takes that method's defaults.
"""
import os

METHODS = ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L")
DATASETS = ("cifar10", "aflw")
TASK_TITLES = {"cifar10": "CIFAR-10", "aflw": "AFLW"}
UNSUPERVISED = ("PL", "MT", "MM", "L2I-O", "L2I-L")  # methods with a weighted unsupervised loss term
# CIFAR-10 loads batches in the training process by default, as the authors did (their augmentation stream).
# On a GPU that would stall every iteration: one CIFAR-10 batch costs 2.5 ms (labeled) to 4.3 ms
# (two unlabeled views) of CPU time, ~7-9 ms per MT/L2I iteration, against a GPU iteration of a few tens
# of ms; four worker processes per loader keep the batches ready (README "Speed on a GPU").
GPU_CIFAR10_WORKERS = 4


def defaults(dataset, method):
    """The default of every option of ``method`` on ``dataset`` (docs/defaults.md §1, §2)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    return {"cifar10": _cifar10, "aflw": _aflw}[dataset](method)


def _cifar10(method):
    return dict(n_labeled=250, data_root="./data", epochs=1024, val_iteration=1024, batch_size=64, lr=0.002,
                ema_decay=0.999, ema_shrink=0.02, eval_model="ema", manualSeed=0, n_val=5000, workers=0,
                bn_momentum=0.001,
                **_unsupervised(method, lambda_u=75.0 if method == "MM" else 50.0,
                                rampup_length=1024 / 64 if method == "MM" else 0.4 * 1024),  # in epochs
                **({"alpha": 0.75, "T": 0.5} if method == "MM" else {}),
                **_meta(method, virtual_step={"L2I-O": 50.0, "L2I-L": 100.0}, reduction="sum", squash_o="none",
                        ema_updates=1))


def _aflw(method):
    return dict(n_labeled=-1 if method == "SL" else 0.01, data_root="./data/aflw_release-2", epochs=150,
                val_iteration=150, batch_size=128, lr=0.03, ema_decay=0.999, ema_shrink=0.0,
                eval_model="student" if method in ("SL", "L2I-L") else "ema", manualSeed=0,
                workers=16 if method in ("PL", "MT") else 8,
                **_unsupervised(method, lambda_u=75.0, rampup_length=9000.0),  # in iterations
                **_meta(method, virtual_step={"L2I-O": 10.0, "L2I-L": 1.0}, reduction="mean", squash_o="tanh",
                        ema_updates=2))


def _unsupervised(method, lambda_u, rampup_length):
    """SL has no unsupervised term: its weight is 0 (and the options are not offered)."""
    if method in UNSUPERVISED:
        return dict(lambda_u=lambda_u, rampup_length=rampup_length)
    return dict(lambda_u=0.0, rampup_length=0.0)


def _meta(method, virtual_step, reduction, squash_o, ema_updates):
    """The per-task differences of the L2I meta step (docs/method.md §5), as explicit defaults."""
    if not method.startswith("L2I"):
        return {}
    meta = dict(virtual_step=virtual_step[method], virtual_reduction=reduction,
                virtual_squash=squash_o if method == "L2I-O" else "none", ema_updates=ema_updates, meta_grad="exact")
    if method == "L2I-L":
        meta["label_step"] = 1.0
    return meta


def available_cpus():
    """CPUs this process may run on (what PyTorch's DataLoader compares its worker count with)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def data_workers(requested, given, dataset, on_gpu):
    """Worker processes per data loader: the default (or the given number), never more than the CPUs here."""
    if not given and on_gpu and dataset == "cifar10":
        requested = GPU_CIFAR10_WORKERS
    return min(requested, available_cpus())
