"""The command-line contract shared by all six scripts (docs/defaults.md §4).

Every option defaults to ``None`` here; ``finalize`` then fills what the user did not give from the
per-task defaults of the method the script is based on (``utils.defaults``), so ``None`` also tells
"not given on the command line" (used when resuming). ``--dataset`` is inferred from ``--n-labeled`` so
the paper's commands work verbatim: an integer count means CIFAR-10, a fraction or -1 means AFLW.

This module imports no PyTorch: a script parses its command line before it loads PyTorch, so ``--help``
and option errors answer in about a second.
"""
import argparse
import math
import os
import sys

from utils.defaults import METHODS, TASK_TITLES, UNSUPERVISED, defaults
from utils.errors import UserError

# Options that may differ when a run is resumed; all others must match the run's own.
RESUME_OVERRIDES = ("epochs", "gpu", "workers", "no_progress", "resume", "out")
FLAGS = ("no_progress", "amp", "channels_last", "compile", "data_on_device", "tf32")  # on/off options
SPEED_FLAGS = ("amp", "channels_last", "compile", "data_on_device", "tf32")
META_GRADS = ("exact", "unroll")  # how the L2I meta-gradient is computed (utils.meta)
N_LABELED_HELP = ("labeled images: an integer is a count (CIFAR-10: a multiple of 10), -1 means all; a number "
                  "with a decimal point is a fraction of the training set (0.01 = 1 %%, 1.0 = all)")


def method_name(script_file):
    """The method a script trains, named after its file: ``train-MT.py`` → ``MT``. A copy of a script is a
    method of its own (``train-MYVAR.py`` → ``MYVAR``): its run folders, results and resumes are its own."""
    stem = os.path.splitext(os.path.basename(script_file))[0]
    return stem[len("train-"):] if stem.startswith("train-") else stem


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``UserError``) and the value checks that need no data."""

    def __init__(self, description, based_on, datasets):
        super().__init__(description=description)
        self.based_on, self.datasets = based_on, datasets
        self.set_defaults(based_on=based_on)

    def error(self, message):
        raise UserError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        check_values(parsed, self.prog, self.datasets)
        return parsed

    def default_text(self, key, unit=""):
        """``(default 1024 on CIFAR-10, 150 on AFLW)``: the default of ``key`` on each task of this script."""
        values = {dataset: defaults(dataset, self.based_on)[key] for dataset in self.datasets}
        shown = {dataset: f"{value:g}{unit}" if isinstance(value, float) else f"{value}{unit}"
                 for dataset, value in values.items()}
        if len(set(shown.values())) == 1:
            return f"(default {next(iter(shown.values()))})"
        return "(default " + ", ".join(f"{text} on {TASK_TITLES[d]}" for d, text in shown.items()) + ")"


def common_parser(description, based_on, datasets, method=None):
    """The options every script shares. ``based_on``: the method whose options and per-task defaults the
    script takes (one of ``utils.defaults.METHODS``); ``datasets``: the tasks it runs, the first the default;
    ``method``: the script's own method (its file's name), when it is a copy of ``based_on``'s script."""
    if based_on not in METHODS:
        raise ValueError(f"based_on must be one of {METHODS}, not {based_on!r}")
    method = method or based_on
    if method != based_on:
        description = (f"{method}: a variant of {description} (train-{based_on}.py), a method of its own with "
                       f"its own run folders and results")
    p = Parser(description, based_on, datasets)
    d = p.default_text
    p.add_argument("--gpu", help="CUDA device id, or 'cpu' (default 0; the CPU when CUDA is not available)")
    p.add_argument("--n-labeled", type=labeled_amount, metavar="N", help=f"{N_LABELED_HELP} {d('n_labeled')}")
    p.add_argument("--dataset", choices=datasets, help=f"default {datasets[0]}, or as --n-labeled says: a count "
                                                        "means cifar10, a fraction or -1 aflw" if len(datasets) > 1
                   else f"{datasets[0]} only")
    p.add_argument("--data-root", metavar="DIR", help=f"where the dataset is {d('data_root')}")
    p.add_argument("--out", metavar="DIR", help="run folder; default named like the paper's, e.g. "
                                                f"{datasets[0]}{method.replace('-', '')}@{defaults(datasets[0], based_on)['n_labeled']:g}")
    p.add_argument("--resume", metavar="PATH", help="a run folder (or its checkpoint.pth.tar) to continue exactly")
    p.add_argument("--epochs", type=int, help=f"training epochs {d('epochs')}")
    p.add_argument("--val-iteration", type=int, metavar="K", help=f"iterations per epoch {d('val_iteration')}")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help=f"labeled, unlabeled and meta batch size {d('batch_size')}")
    p.add_argument("--lr", type=float, help=f"initial learning rate {d('lr')}")
    p.add_argument("--ema-decay", type=float, help=f"decay of the evaluation EMA and the mean teacher's cap "
                                                   f"{d('ema_decay')}")
    p.add_argument("--ema-shrink", type=float, help="per-iteration student shrink as a multiple of --lr, an "
                                                    f"authors' quirk (docs/faithfulness.md §1.1) {d('ema_shrink')}")
    if based_on in UNSUPERVISED:
        p.add_argument("--lambda-u", type=float, help=f"weight of the unsupervised loss {d('lambda_u')}")
        p.add_argument("--rampup-length", type=float, metavar="R",
                       help="linear ramp-up of --lambda-u, in epochs on CIFAR-10 and in iterations on AFLW "
                            f"(docs/method.md §2.2) {d('rampup_length')}")
    p.add_argument("--eval-model", choices=("ema", "student"), help=f"model reported on validation and test "
                                                                   f"{d('eval_model')}")
    p.add_argument("--manualSeed", type=int, metavar="S", help="seeds python, numpy and torch; the split is a "
                                                               f"function of it {d('manualSeed')}")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"data-loader worker processes per loader {d('workers')}"
                        + ("; 4 for CIFAR-10 on a GPU" if "cifar10" in datasets else "")
                        + "; never more than this machine's CPUs")
    p.add_argument("--no-progress", action="store_true", default=None,
                   help="no progress bar (or, when the output is not a terminal, no progress lines): only the "
                        "lines of each finished epoch")
    if "cifar10" in datasets:
        cifar = p.add_argument_group("CIFAR-10 only")
        cifar.add_argument("--n-val", type=int, help="validation images taken from the training set (default 5000)")
        cifar.add_argument("--bn-momentum", type=float,
                           help="batch-norm momentum of the WRN (default 0.001, the authors'). With it, the "
                                "running statistics barely move in a short run and evaluation then shows chance "
                                "accuracy; 0.1 makes a quick try meaningful (README \"Quick try\")")
    speed = p.add_argument_group("speed (opt-in; the default is the faithful fp32 path)")
    speed.add_argument("--amp", action="store_true", default=None, help="bf16 autocast (CPU and CUDA)")
    speed.add_argument("--channels-last", action="store_true", default=None, help="channels-last memory format")
    speed.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    speed.add_argument("--tf32", action="store_true", default=None,
                       help="CUDA: allow TF32 in matmuls and cuDNN convolutions (faster on Ampere and later GPUs, "
                            "about 1e-3 relative precision); off by default = strict IEEE fp32. No effect on the CPU")
    if "cifar10" in datasets:
        speed.add_argument("--data-on-device", action="store_true", default=None,
                           help="CIFAR-10: keep the uint8 images on the device and augment whole batches there")
    else:
        p.set_defaults(data_on_device=None)
    return p


def add_meta_options(parser, label_step):
    """The L2I options; their per-task defaults are the authors' (docs/method.md §5)."""
    d = parser.default_text
    group = parser.add_argument_group("L2I meta step")
    group.add_argument("--virtual-step", type=float, metavar="MULTIPLE",
                       help=f"virtual step size as a multiple of the current lr {d('virtual_step')}")
    group.add_argument("--virtual-reduction", choices=("sum", "mean"),
                       help=f"reduction of the virtual consistency loss {d('virtual_reduction')}")
    group.add_argument("--virtual-squash", choices=("none", "tanh"),
                       help=f"squashing inside the virtual consistency loss {d('virtual_squash')}")
    group.add_argument("--ema-updates", type=int, choices=(1, 2),
                       help=f"EMA-E updates per iteration; 2 = after each optimizer step {d('ema_updates')}")
    group.add_argument("--meta-grad", choices=META_GRADS,
                       help="exact first-order meta-gradient or the authors' unrolled double backward "
                            f"{d('meta_grad')}")
    if label_step:
        group.add_argument("--label-step", type=float, help=f"gradient step on the imputed labels {d('label_step')}")


def labeled_amount(text):
    """``--n-labeled``: an integer is a count (-1: all labels); a number with a decimal point is a fraction
    of the training set in (0, 1], where 1.0 means all labels, as -1 does."""
    try:
        count = int(text)
    except ValueError:
        pass
    else:
        if count == -1 or count >= 1:
            return count
        raise argparse.ArgumentTypeError(f"{text}: give a count ≥ 1, -1 for all labels, or a fraction such as 0.01")
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number") from None
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise argparse.ArgumentTypeError(f"{text}: a number with a decimal point is a fraction of the training "
                                         f"set and must lie in (0, 1]; write a count as an integer, e.g. 250")
    return -1 if fraction == 1 else fraction


def infer_dataset(n_labeled):
    """An integer count means CIFAR-10 (the paper's 250 … 4000); a fraction or -1 (all) means AFLW."""
    if n_labeled is None:
        return None
    return "cifar10" if isinstance(n_labeled, int) and n_labeled >= 1 else "aflw"


def check_values(args, script, datasets):
    """Checks of the given values that need no data, so a mistake is reported before anything loads."""
    dataset = args.dataset or infer_dataset(args.n_labeled) or datasets[0]
    if dataset not in datasets:
        inferred = "" if args.dataset else (f" (--n-labeled {args.n_labeled:g} means {dataset}: a count means "
                                            f"cifar10, a fraction or -1 aflw)")
        raise UserError(f"{script} runs on {', '.join(datasets)} only, not on {dataset}{inferred}")
    for key in ("epochs", "val_iteration", "batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be 0 or more")
    if dataset == "cifar10":
        if isinstance(args.n_labeled, int) and args.n_labeled != -1 and args.n_labeled % 10:
            raise UserError(f"--n-labeled {args.n_labeled}: CIFAR-10 splits the labeled images evenly over its "
                            f"10 classes, so a count must be a multiple of 10")
        if args.n_val is not None and (args.n_val < 10 or args.n_val % 10):
            raise UserError(f"--n-val {args.n_val} must be a positive multiple of 10 (validation images are "
                            f"taken evenly from each class)")
        if args.bn_momentum is not None and not 0 <= args.bn_momentum <= 1:
            raise UserError(f"--bn-momentum {args.bn_momentum:g} must lie in [0, 1]")
    else:
        for key in ("n_val", "bn_momentum", "data_on_device"):
            if getattr(args, key, None) is not None:
                raise UserError(f"--{key.replace('_', '-')} is for CIFAR-10 only: AFLW "
                                + {"n_val": "holds out the last 10 % of its train list for validation",
                                   "bn_momentum": "uses the TCDCNN, which has no batch norm",
                                   "data_on_device": "caches its decoded images already"}[key])


def finalize(args, method, default_dataset):
    """Resolve the dataset, then fill every option left at ``None`` from that task's defaults."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    dataset = args.dataset or infer_dataset(args.n_labeled) or default_dataset
    for key, value in defaults(dataset, args.based_on).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.dataset = dataset
    args.method = method
    args.data_root = normalised_path(args.data_root)
    for flag in FLAGS:
        setattr(args, flag, bool(getattr(args, flag, False)))
    if args.out is None:
        args.out = f"{dataset}{method.replace('-', '')}@{args.n_labeled:g}"
    args.given = sorted(given)
    return args


def normalised_path(path):
    """Absolute, without a trailing slash: ``data/``, ``./data`` and ``/repo/data`` name one folder."""
    return os.path.normpath(os.path.abspath(path))


def check_command_line(parse_args):
    """Parse ``sys.argv`` now: ``--help`` and option errors answer at once, before PyTorch is imported."""
    try:
        parse_args()
    except UserError as exc:
        fail(exc)


def fail(mistake):
    """A user mistake (a ``UserError`` or a message): one line on stderr, exit status 2."""
    print(f"error: {mistake}", file=sys.stderr)
    sys.exit(2)
