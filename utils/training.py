"""The training machinery every script shares: run folder, epoch loop, evaluation, checkpoints, summary.

A script supplies its ``parse_args`` and its ``train_step(run, batch)``; ``run_script`` does the rest.
``train_step`` gets a ``Run`` (models, optimizer, counters, the task) and a ``utils.tasks.Batch``, does
one iteration of its method including the optimizer and EMA updates, and returns its losses.
"""
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torchvision

from utils.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from utils.defaults import data_workers
from utils.ema import EvalEMA, MeanTeacher
from utils.errors import UserError
from utils.logger import EpochProgress, open_writer, write_log
from utils.options import RESUME_OVERRIDES, fail, finalize, normalised_path
from utils.runtime import (keep_freed_memory, rng_state, seed_everything, select_device, set_rng_state,
                           warn_if_slow_bf16)
from utils.schedules import linear_rampup
from utils.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Run:
    """Everything ``train_step`` may touch."""
    args: object
    task: object
    device: torch.device
    student: torch.nn.Module
    ema_eval: EvalEMA
    mean_teacher: MeanTeacher
    optimizer: torch.optim.Optimizer
    epoch: int = 0       # 0-based epoch being trained
    iteration: int = 0   # 0-based iteration inside the epoch
    step: int = 0        # global iteration counter t (docs/method.md §1.1), advanced after each train_step

    def autocast(self):
        """bf16 autocast with ``--amp``; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def unsup_weight(self):
        """``lambda_u · ramp(progress, rampup_length)`` (docs/method.md §2.2)."""
        progress = self.task.ramp_progress(self.epoch, self.iteration, self.step, self.args)
        return self.args.lambda_u * linear_rampup(progress, self.args.rampup_length)


class NonFiniteLoss(Exception):
    pass


class Restarting:
    """A loader's iterator, restarted whenever it is exhausted (docs/method.md §2.6)."""

    def __init__(self, loader):
        self.loader, self.iterator = loader, iter(loader)

    def next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.loader)
            return next(self.iterator)


def run_script(method, parse_args, train_step, argv=None, datasets=("cifar10", "aflw"), unlabeled_batches=True,
               meta_batches=False):
    """Entry point of every script: user mistakes become one line on stderr and exit status 2.

    ``datasets``: the tasks the method supports, the first being the default; ``unlabeled_batches`` /
    ``meta_batches``: whether each iteration draws unlabeled images / an L2I meta batch.
    """
    try:
        train(method, parse_args(argv), train_step, datasets, unlabeled_batches, meta_batches)
    except UserError as exc:
        fail(exc)


# ----------------------------------------------------------------------------- options and run folder

def resolve_args(method, args, datasets):
    """Fill defaults, or on ``--resume`` take the run's own options (only a few may change)."""
    if args.resume:
        path = checkpoint_path(args.resume)
        state = load_checkpoint(path)
        saved = state["args"]
        if saved.get("method") != method:
            raise UserError(f"{path} is a run of the method {saved.get('method')} (train-{saved.get('method')}.py), "
                            f"not of {method}; resume it with its own script")
        given = {key: value for key, value in vars(args).items() if value is not None and key != "based_on"}
        for key, value in given.items():
            if key not in RESUME_OVERRIDES and not same_option(key, value, saved.get(key)):
                raise UserError(f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                                f"({saved.get(key)}); a resumed run keeps its options")
        folder = os.path.dirname(os.path.abspath(path))
        if args.out is not None and normalised_path(args.out) != folder:
            raise UserError(f"--out {args.out} differs from the folder of the resumed checkpoint ({folder})")
        resolved = dict(saved, out=folder, resume=path)
        for key in ("epochs", "gpu", "workers"):
            if getattr(args, key) is not None:
                resolved[key] = getattr(args, key)
        resolved["no_progress"] = bool(args.no_progress)
        args = type(args)(**resolved)
        args.given = sorted(given)
    else:
        state = None
        args = finalize(args, method, default_dataset=datasets[0])
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise UserError(f"run folder {args.out} already exists and is not empty; choose another --out, "
                            f"or continue that run with --resume {args.out}")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out} exists and is not a folder")
    if state is not None and state["epoch"] >= args.epochs:
        raise UserError(f"{args.resume} has already trained {state['epoch']} of --epochs {args.epochs}; "
                        f"pass a larger --epochs to continue it")
    return args, state


def same_option(key, given, saved):
    """Paths name the same folder however they are written (trailing slash, relative or absolute)."""
    if key == "data_root" and saved is not None:
        return normalised_path(given) == normalised_path(saved)
    return given == saved


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def options_record(args, earlier):
    """``args.json``: every resolved option, library versions, and how the run was started and resumed.

    ``earlier`` is the record of the attempt being resumed (None for a new run): its command, commit and
    start time are kept, and this attempt is appended to its ``resumes``.
    """
    record = {k: v for k, v in vars(args).items() if k not in ("given", "split")}  # split: split.json
    record["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "torchvision": torchvision.__version__, "numpy": np.__version__}
    attempt = {"command": " ".join(sys.argv), "git_commit": _git_commit(),
               "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if earlier is None:
        record.update(command=attempt["command"], git_commit=attempt["git_commit"], started=attempt["time"],
                      resumes=[])
    else:
        record.update({key: earlier.get(key) for key in ("command", "git_commit", "started")},
                      resumes=list(earlier.get("resumes", [])) + [attempt])
    return record


def earlier_record(folder):
    """The run's ``args.json`` as written by its earlier attempts; {} if it is missing or unreadable."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


# ----------------------------------------------------------------------------- the run

def build_run(args, task, device):
    student = task.build_model(args).to(device)
    student.train()
    if args.channels_last:  # convolutions then keep activations channels-last too
        student.to(memory_format=torch.channels_last)
    run = Run(args=args, task=task, device=device, student=student,
              ema_eval=EvalEMA(student, args.ema_decay, args.ema_shrink * args.lr),
              mean_teacher=MeanTeacher(student, args.ema_decay),
              optimizer=task.make_optimizer(student.parameters(), args))
    if args.compile:  # in place, so parameter names and state dicts stay those of the plain model
        # The L2I meta step back-propagates the student's view-1 graph twice (retain_graph), which
        # compiled backwards only allow without buffer donation.
        torch._functorch.config.donated_buffer = False
        for model in (run.student, run.ema_eval.model, run.mean_teacher.model):
            model.compile()
    return run


def run_state(run, history, best, wall_time):
    return {"args": {k: v for k, v in vars(run.args).items() if k != "given"},
            "epoch": run.epoch, "step": run.step,
            "state_dict": run.student.state_dict(), "ema_state_dict": run.ema_eval.model.state_dict(),
            "teacher_state_dict": run.mean_teacher.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "history": history, "best": best, "wall_time": wall_time, "rng": rng_state()}


def restore_run(run, state):
    run.student.load_state_dict(state["state_dict"])
    run.ema_eval.model.load_state_dict(state["ema_state_dict"])
    run.mean_teacher.model.load_state_dict(state["teacher_state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.epoch, run.step = state["epoch"], state["step"]
    set_rng_state(state["rng"])


def train(method, args, train_step, datasets, unlabeled_batches, meta_batches):
    args, state = resolve_args(method, args, datasets)
    task = TASKS[args.dataset]()
    device = select_device(args.gpu)
    keep_freed_memory()  # same numbers, far fewer page faults on the CPU
    if args.amp:
        warn_if_slow_bf16(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the authors; GPU runs are not bit-reproducible anyway
    choose_workers(args, device, resuming=state is not None)
    seed_everything(args.manualSeed)
    data = task.load(args)
    if state is not None and state["args"].get("split") != data.split:
        raise UserError(f"the data split of {args.resume} differs from the one made now from the same seed "
                        f"(different data or library versions); it cannot be resumed exactly")
    args.split = data.split
    task.to(device)
    run = build_run(args, task, device)
    loaders = {"labeled": task.train_loader(data.labeled, args)}
    if unlabeled_batches:
        loaders["unlabeled"] = task.train_loader(data.unlabeled, args)
    if meta_batches:  # a second, independently shuffled stream over the labeled set (docs/method.md §2.6)
        loaders["meta"] = task.train_loader(data.labeled, args)
    eval_loaders = {"val": task.eval_loader(data.val, args), "test": task.eval_loader(data.test, args)}

    if state is None:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "split.json"), data.split)
        history, best, wall_time = [], None, 0.0
        save_checkpoint(run_state(run, history, best, wall_time), args.out, is_best=False)
    else:
        restore_run(run, state)
        history, best, wall_time = state["history"], state["best"], state["wall_time"]
        write_task_log(args.out, task, history)  # drop rows of an epoch the checkpoint does not hold
    earlier = None if state is None else earlier_record(args.out)
    write_json(os.path.join(args.out, "args.json"), options_record(args, earlier))
    print(f"{method} on {args.dataset}, {args.n_labeled:g} labels, {device}; "
          f"{sum(p.numel() for p in run.student.parameters()) / 1e6:.2f}M parameters; run folder {args.out}")

    samples_per_epoch = args.batch_size * args.val_iteration
    writer = open_writer(args.out, first_step=samples_per_epoch * (run.epoch + 1))
    started = time.time()
    try:
        while run.epoch < args.epochs:
            epoch_record = train_and_evaluate_epoch(run, loaders, eval_loaders, train_step)
            history.append(epoch_record)
            best, is_best = update_best(task, best, run.epoch, epoch_record)
            run.epoch += 1
            # Logs first, checkpoint last: if the run dies in between, the resumed run redoes this epoch
            # and its writer purges the stale events (purge_step), so nothing is lost or doubled.
            write_task_log(args.out, task, history)
            log_scalars(writer, task, epoch_record, samples_per_epoch * run.epoch)
            save_checkpoint(run_state(run, history, best, wall_time + time.time() - started), args.out, is_best)
            print(epoch_line(task, run.epoch, args.epochs, epoch_record), flush=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted in epoch {run.epoch + 1}; the checkpoint after epoch {run.epoch} is kept "
              f"(work in the unfinished epoch is dropped, so a resumed run is exact): "
              f"continue with --resume {args.out}", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as exc:
        print(f"error: {exc}; the checkpoint after epoch {run.epoch} is kept in {args.out}", file=sys.stderr)
        sys.exit(1)
    finally:
        writer.close()
    summary = summarize(task, history, wall_time + time.time() - started, args)
    write_json(os.path.join(args.out, "summary.json"), summary)
    print_summary(summary)


def choose_workers(args, device, resuming):
    """Data-loader workers per loader (``utils.defaults.data_workers``), recorded in args.json as used.
    A number the user gave (or the run being resumed used) is lowered to this machine's CPUs, with a note."""
    explicit = resuming or "workers" in args.given
    workers = data_workers(args.workers, explicit, args.dataset, device.type == "cuda")
    if explicit and workers < args.workers:
        print(f"note: --workers {args.workers} lowered to {workers}, the CPUs this process may use", file=sys.stderr)
    args.workers = workers


def train_and_evaluate_epoch(run, loaders, eval_loaders, train_step):
    args, task = run.args, run.task
    for group in run.optimizer.param_groups:
        group["lr"] = task.lr_at(run.epoch, args)
    losses = train_epoch(run, loaders, train_step)
    run.ema_eval.copy_buffers(run.student)  # end-of-epoch BN sync (docs/method.md §2.1)
    reported, other = ((run.ema_eval.model, run.student) if args.eval_model == "ema"
                       else (run.student, run.ema_eval.model))
    record = {f"train_{k}": v for k, v in losses.items()}
    with run.autocast():
        train_stats = task.evaluate(run.student if task.train_stats_on_student else reported,
                                    loaders["labeled"], run.device)
        record.update({f"train_{k}": v for k, v in train_stats.items() if k != "loss"})
        for split, loader in eval_loaders.items():
            record.update({f"{split}_{k}": v for k, v in task.evaluate(reported, loader, run.device).items()})
            if task.train_stats_on_student:  # AFLW: also log the model not reported (docs/faithfulness.md §2.20)
                record.update({f"other_{split}_{k}": v
                               for k, v in task.evaluate(other, loader, run.device).items()})
    record.update(lr=run.lr, lambda_u=run.unsup_weight(), epoch=run.epoch + 1)
    return record


def train_epoch(run, loaders, train_step):
    """``val_iteration`` training iterations; returns the epoch's mean losses."""
    args = run.args
    streams = {name: Restarting(loader) for name, loader in loaders.items()}
    losses = EpochLosses(run.epoch, args.val_iteration)
    progress = EpochProgress(run.epoch + 1, args.epochs, args.val_iteration, enabled=not args.no_progress)
    started, data_time = time.perf_counter(), 0.0
    for run.iteration in range(args.val_iteration):
        tick = time.perf_counter()
        labeled, unlabeled, meta = (streams[name].next() if name in streams else None
                                    for name in ("labeled", "unlabeled", "meta"))
        batch = run.task.make_batch(labeled, unlabeled, meta, run.device)
        data_time += time.perf_counter() - tick
        with run.autocast():
            losses.add(run.iteration, train_step(run, batch))
        run.step += 1
        done = run.iteration + 1
        if progress.due(done):
            progress.show(done, (time.perf_counter() - started) / done, losses.means(done)["loss"])
    means = losses.means(args.val_iteration)  # on a GPU, also waits for the epoch's last iterations
    progress.finish()
    seconds = time.perf_counter() - started
    print(f"  {seconds / args.val_iteration:.3f} s per iteration, of which waiting for data "
          f"{data_time / args.val_iteration:.3f} s ({100 * data_time / seconds:.1f} %)", flush=True)
    return means


class EpochLosses:
    """Each iteration's losses, left on the device that computed them and read only when shown (at a
    progress refresh and at the end of the epoch): on a GPU, reading a loss every iteration would make
    the CPU wait for the GPU each time. A non-finite total loss is reported with its exact iteration."""

    def __init__(self, epoch, iterations):
        self.epoch, self.iterations = epoch, iterations
        self.values = None   # name → float64 tensor with one entry per iteration

    def add(self, iteration, losses):
        if self.values is None:
            device = losses["loss"].device
            self.values = {name: torch.empty(self.iterations, dtype=torch.float64, device=device)
                           for name in losses}
        with torch.no_grad():
            for name, value in losses.items():
                self.values[name][iteration] = value

    def means(self, done):
        """Means over the first ``done`` iterations; ``NonFiniteLoss`` names the first non-finite one."""
        names = list(self.values)
        rows = torch.stack([self.values[name][:done] for name in names]).tolist()  # one device→host copy
        totals = rows[names.index("loss")]
        bad = next((i for i, value in enumerate(totals) if not math.isfinite(value)), None)
        if bad is not None:
            raise NonFiniteLoss(f"the training loss became {totals[bad]} in epoch {self.epoch + 1}, "
                                f"iteration {bad + 1}")
        return {name: sum(row) / done for name, row in zip(names, rows)}


# ----------------------------------------------------------------------------- bookkeeping

def update_best(task, best, epoch, record):
    """Model selection on the validation metric; strictly better replaces (docs/evaluation.md §3)."""
    value = record[f"val_{task.metric}"]
    if best is None or (value > best["val"] if task.higher_is_better else value < best["val"]):
        return {"val": value, "epoch": epoch + 1, "test": record[f"test_{task.metric}"]}, True
    return best, False


def write_task_log(folder, task, history):
    write_log(folder, [name for name, _ in task.columns],
              [{name: row[key] for name, key in task.columns} for row in history])


def log_scalars(writer, task, record, step):
    for tag, key in task.scalars.items():
        writer.add_scalar(tag, record[key], step)
    for key in record:
        if key.startswith("train_loss_"):  # the parts of the training loss (x, u; L2I-L's refine)
            writer.add_scalar(f"losses/{key}", record[key], step)
    writer.add_scalar("train/lr", record["lr"], step)
    writer.add_scalar("train/lambda_u", record["lambda_u"], step)
    for key, value in record.items():
        if key.startswith("other_"):
            writer.add_scalar(f"other_model/{key[len('other_'):]}", value, step)
    writer.flush()


def epoch_line(task, epoch, epochs, record):
    m = task.metric
    return (f"epoch {epoch}/{epochs}  train loss {record['train_loss']:.4f}  "
            f"valid {m} {record[f'val_{m}']:.4f}  test {m} {record[f'test_{m}']:.4f}")


def summarize(task, history, wall_time, args):
    """Every candidate protocol value (docs/evaluation.md §3): best-validation epoch's test value, median and mean of
    the last 20 test values."""
    m = task.metric
    vals = [row[f"val_{m}"] for row in history]
    pick = int(np.argmax(vals) if task.higher_is_better else np.argmin(vals))  # first best = strictly better
    last = [row[f"test_{m}"] for row in history[-20:]]
    return {"method": args.method, "dataset": args.dataset, "n_labeled": args.n_labeled, "seed": args.manualSeed,
            "metric": m, "higher_is_better": task.higher_is_better, "epochs": len(history),
            "best_epoch": pick + 1, "best_val": vals[pick], "test_at_best_val": history[pick][f"test_{m}"],
            "median_last20_test": float(np.median(last)), "mean_last20_test": float(np.mean(last)),
            "wall_time_s": wall_time, "finished": True}


def print_summary(s):
    m = {"acc": "accuracy (%)", "me": "mean error (fraction of the inter-ocular distance)"}[s["metric"]]
    print(f"Test {m}:\n"
          f"  at the best-validation epoch ({s['best_epoch']}, valid {s['best_val']:.4f}): {s['test_at_best_val']:.4f}\n"
          f"  median of the last {min(20, s['epochs'])} epochs: {s['median_last20_test']:.4f}\n"
          f"  mean of the last {min(20, s['epochs'])} epochs:   {s['mean_last20_test']:.4f}")
