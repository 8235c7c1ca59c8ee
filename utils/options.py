"""The command-line contract shared by all six scripts (DESIGN.md §4).

Every option defaults to ``None`` here; ``finalize`` then fills what the user did not give from the
per-task, per-method defaults (``utils.tasks``), so ``None`` also tells "not given on the command line"
(used when resuming). ``--dataset`` is inferred from ``--n-labeled`` so the paper's commands work
verbatim: an integer count means CIFAR-10, a fraction or -1 means AFLW.
"""
import argparse

from utils.errors import UserError

DATASETS = ("cifar10", "aflw")
# Options that may differ when a run is resumed; all others must match the run's own.
RESUME_OVERRIDES = ("epochs", "gpu", "workers", "no_progress", "resume", "out")
FLAGS = ("no_progress", "amp", "channels_last", "compile", "data_on_device")  # on/off options
SPEED_FLAGS = ("amp", "channels_last", "compile", "data_on_device")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def common_parser(description):
    p = Parser(description=description)
    p.add_argument("--gpu", help="CUDA device id, or 'cpu' (default 0; falls back to the CPU without CUDA)")
    p.add_argument("--n-labeled", type=float,
                   help="labeled images: a count (CIFAR-10: multiple of 10), a fraction in (0, 1), or -1 for all")
    p.add_argument("--dataset", choices=DATASETS, help="default: count → cifar10, fraction or -1 → aflw")
    p.add_argument("--data-root", help="default ./data (cifar10) or ./data/aflw_release-2 (aflw)")
    p.add_argument("--out", help="run folder; default named like the paper's, e.g. cifar10MT@250")
    p.add_argument("--resume", help="checkpoint file or run folder to continue exactly")
    p.add_argument("--epochs", type=int)
    p.add_argument("--val-iteration", type=int, help="iterations per epoch")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="initial learning rate")
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--ema-shrink", type=float,
                   help="per-iteration student shrink as a multiple of --lr (SPEC §H.3 22; 0.02 cifar10, 0 aflw)")
    p.add_argument("--lambda-u", type=float, help="weight of the unsupervised loss")
    p.add_argument("--rampup-length", type=float,
                   help="ramp-up of lambda-u: epochs on cifar10, iterations on aflw (SPEC §B.0.2)")
    p.add_argument("--eval-model", choices=("ema", "student"), help="model reported on val/test (SPEC §H.2 20)")
    p.add_argument("--manualSeed", type=int, help="seeds python, numpy and torch (default 0)")
    p.add_argument("--n-val", type=int, help="cifar10 validation images taken from the training set (5000)")
    p.add_argument("--workers", type=int, help="data-loader worker processes")
    p.add_argument("--no-progress", action="store_true", default=None,
                   help="one plain line per epoch instead of a progress bar")
    speed = p.add_argument_group("speed (opt-in; the default is the faithful fp32 path)")
    speed.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (CPU and CUDA)")
    speed.add_argument("--channels-last", action="store_true", default=None, help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    speed.add_argument("--data-on-device", action="store_true", default=None,
                       help="cifar10: keep the uint8 images on the device and augment whole batches there")
    return p


def infer_dataset(n_labeled):
    if n_labeled is None:
        return None
    if n_labeled == -1 or 0 < n_labeled < 1:
        return "aflw"
    if n_labeled >= 1:
        return "cifar10"
    raise UserError(f"--n-labeled {n_labeled:g}: give a count ≥ 1, a fraction in (0, 1), or -1 for all labels")


def check_n_labeled(n_labeled):
    if n_labeled == 0 or (n_labeled < 0 and n_labeled != -1):
        raise UserError(f"--n-labeled {n_labeled:g}: give a count ≥ 1, a fraction in (0, 1), or -1 for all labels")


def finalize(args, method, tasks, default_dataset):
    """Resolve the dataset, then fill every option left at ``None`` from that task's defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if args.n_labeled is not None:
        check_n_labeled(args.n_labeled)
    dataset = args.dataset or infer_dataset(args.n_labeled) or default_dataset
    task = tasks[dataset]()
    for key, value in task.defaults(method).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.dataset = dataset
    args.method = method
    for flag in FLAGS:
        setattr(args, flag, bool(getattr(args, flag)))
    if args.out is None:
        args.out = f"{dataset}{method.replace('-', '')}@{args.n_labeled:g}"
    args.given = sorted(given)
    return args
