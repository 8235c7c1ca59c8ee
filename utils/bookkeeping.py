"""The bookkeeping no method differs in, shared by every training script. The run itself — networks,
optimizers, the epoch and iteration loops, the method's step, what is evaluated — lives in the script.

    with bookkeeping(METHOD, parse_args, argv, DATASETS, streams=("labeled", "unlabeled")) as book:
        nets = book.keep(build(book.args, book.task, book.device))  # checkpointed by name
        for epoch in book.epochs():                   # starts the run folder, or restores the checkpoint
            for iteration, batch in book.iterations():   # data streams, progress, the step counter
                ...; book.record(loss=loss, lr=lr)       # any scalar: epoch mean → tensorboard
            book.evaluate_epoch(student, ema_eval)    # the reported model: log.txt, model selection
            book.end_epoch()                          # log.txt, tensorboard, checkpoint, epoch line
        book.finish()                                 # summary.json

What it keeps: the run folder (never clobbered) with ``args.json`` (options and the history of resumes),
``split.json``, ``log.txt``, the tensorboardX events, atomic checkpoints of every object the script
``keep``s (networks, optimizers, EMAs, tensors: anything with a ``state_dict``) plus counters, metric
history and RNG states, and ``summary.json``. A resumed run continues bit for bit on the CPU.
User mistakes end with one line; Ctrl-C keeps the last epoch's checkpoint; a non-finite loss stops the run.
"""
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torchvision

from utils.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from utils.defaults import data_workers
from utils.errors import UserError
from utils.evaluation import PROTOCOLS, summarize
from utils.folder import ARGS, SPLIT, STATUS, SUMMARY
from utils.logger import EpochProgress, open_writer, short_duration, write_log
from utils.options import RESUME_OVERRIDES, fail, finalize, normalised_path
from utils.runtime import (configure_backends, keep_freed_memory, rng_state, seed_everything, select_device,
                           set_rng_state, warn_if_slow_bf16)
from utils.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STREAMS = {"labeled": "labeled", "unlabeled": "unlabeled", "meta": "labeled"}  # stream → the data it draws
CHECKPOINT_FORMAT = 2
NONFINITE_CHECK_S = 60.0   # a non-finite loss stops the run within a minute, whatever the progress display
PROJECTION_AFTER_S = 10.0  # the whole run's time is projected once the first iterations took this long
# Checkpoints written before the scripts owned their loops held four fixed objects under these keys.
LEGACY_KEYS = {"state_dict": "student", "ema_state_dict": "ema_eval", "teacher_state_dict": "mean_teacher",
               "optimizer": "optimizer"}


class NonFiniteLoss(Exception):
    pass


@contextlib.contextmanager
def bookkeeping(method, parse_args, argv, datasets, streams):
    """A ``Bookkeeper`` for this command line. ``datasets``: the tasks the script runs, the first being the
    default; ``streams``: the training data each iteration draws, in order, from ``STREAMS`` (``meta`` is a
    second, independently shuffled stream over the labeled set, docs/method.md §2.6).

    User mistakes become one line on stderr and exit status 2; Ctrl-C (exit 130) and a non-finite loss
    (exit 1) keep the checkpoint of the last finished epoch."""
    book = None
    try:
        book = Bookkeeper(method, parse_args(argv), datasets, streams)
        yield book
    except UserError as exc:
        fail(exc)
    except KeyboardInterrupt:
        if book is None:  # during the set-up: nothing was written
            sys.exit(130)
        book.set_status("interrupted", f"Ctrl-C in epoch {book.epoch + 1}")
        print(f"\ninterrupted in epoch {book.epoch + 1}; the checkpoint after epoch {book.epoch} is kept "
              f"(work in the unfinished epoch is dropped, so a resumed run is exact): "
              f"continue with --resume {book.args.out}", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as exc:
        book.set_status("stopped", str(exc))
        print(f"error: {exc}; the checkpoint after epoch {book.epoch} is kept in {book.args.out}", file=sys.stderr)
        sys.exit(1)
    except Exception as exc:  # a crash (out of memory, a bug in a variant): say so in status.json, then raise
        if book is not None:
            book.set_status("stopped", f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise
    finally:
        if book is not None:
            book.close()


class Bookkeeper:
    """Options, data, run folder and logs of one run; see the module docstring for the order of calls."""

    def __init__(self, method, args, datasets, streams):
        unknown = [name for name in streams if name not in STREAMS]
        if unknown:
            raise ValueError(f"unknown data streams {unknown}; one of {tuple(STREAMS)}")
        self.method = method
        self.args, self.saved = resolve_args(method, args, datasets)
        args = self.args
        self.task = TASKS[args.dataset]()
        self.protocol = PROTOCOLS[args.dataset]
        self.device = select_device(args.gpu)
        keep_freed_memory()  # same numbers, far fewer page faults on the CPU
        if args.amp:
            warn_if_slow_bf16(self.device)
        configure_backends(self.device, args.tf32)
        choose_workers(args, self.device, resuming=self.saved is not None)
        seed_everything(args.manualSeed)
        data = self.task.load(args)
        if self.saved is not None and self.saved["args"].get("split") != data.split:
            raise UserError(f"the data split of {args.resume} differs from the one made now from the same seed "
                            f"(different data or library versions); it cannot be resumed exactly")
        args.split = data.split
        self.labeled_images = len(data.labeled)
        self.task.to(self.device)
        self.loaders = {name: self.task.train_loader(getattr(data, STREAMS[name]), args)
                        for name in STREAMS if name in streams}
        self.loaders["train"] = self.task.train_stats_loader(data.labeled, args)  # "Train Stats"
        self.loaders.update(val=self.task.eval_loader(data.val, args), test=self.task.eval_loader(data.test, args))
        self.streams = [name for name in STREAMS if name in streams]
        self.kept = {}
        self.epoch = 0       # 0-based epoch being trained; = epochs finished
        self.iteration = 0   # 0-based iteration inside the epoch
        self.step = 0        # global iteration counter t (docs/method.md §1.1), advanced after each iteration
        self.history, self.best, self.wall_time = [], None, 0.0
        self.writer, self.started = None, None
        self.scalars, self.recorded, self.epoch_record = None, {}, {}   # the epoch being trained

    # ------------------------------------------------------------------------ what the script calls

    def keep(self, objects):
        """Checkpoint every attribute of ``objects`` (a namespace) under its name, and restore it on
        ``--resume``: networks, optimizers, EMAs, anything with ``state_dict``/``load_state_dict``, and
        tensors (restored in place). Returns ``objects``."""
        if self.started is not None:
            raise RuntimeError("keep() must come before the first epoch")
        for name, obj in vars(objects).items():
            if not (torch.is_tensor(obj) or hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"cannot checkpoint {name!r} ({type(obj).__name__}): keep tensors or objects "
                                f"with state_dict() and load_state_dict()")
            self.kept[name] = obj
        return objects

    def epochs(self):
        """The 0-based epochs still to train. The first call creates the run folder, or on ``--resume``
        restores every kept object, the counters and the RNG states from the checkpoint."""
        self._start()
        while self.epoch < self.args.epochs:
            first = self.epoch
            yield self.epoch
            if self.epoch == first:
                raise RuntimeError("every epoch must end with book.end_epoch()")

    def iterations(self):
        """``(iteration, batch)`` for the epoch's ``--val-iteration`` iterations: the batch holds one draw of
        each stream, on the device (``utils.tasks.Batch``). Shows progress; advances ``step`` after each."""
        args = self.args
        streams = {name: iter(self.loaders[name]) for name in self.streams}  # an epoch's batches each
        self.scalars = EpochScalars(self.epoch, args.val_iteration)
        self.epoch_record = {}
        progress = EpochProgress(self.epoch + 1, args.epochs, args.val_iteration, enabled=not args.no_progress,
                                 later_iterations=(args.epochs - self.epoch - 1) * args.val_iteration)
        started, data_time, checked = time.perf_counter(), 0.0, time.monotonic()
        for self.iteration in range(args.val_iteration):
            tick = time.perf_counter()
            drawn = {name: next(stream) for name, stream in streams.items()}
            batch = self.task.make_batch(drawn.get("labeled"), drawn.get("unlabeled"), drawn.get("meta"), self.device)
            data_time += time.perf_counter() - tick
            yield self.iteration, batch
            self.step += 1
            done = self.iteration + 1
            shown = progress.due(done)
            # Reading the losses waits for the device: only to show them, and at least once a minute to stop
            # a run whose loss is no longer finite (NonFiniteLoss).
            if shown or time.monotonic() - checked >= NONFINITE_CHECK_S:
                loss = self.scalars.means(done).get("loss")
                checked = time.monotonic()
                if shown:
                    progress.show(done, (time.perf_counter() - started) / done, loss)
            if not self.projected and (time.perf_counter() - started >= PROJECTION_AFTER_S
                                       or done == args.val_iteration):
                self._project((time.perf_counter() - started) / done, args.val_iteration - done)
        means = self.scalars.means(args.val_iteration)  # on a GPU, also waits for the epoch's last iterations
        progress.finish()
        seconds = time.perf_counter() - started
        print(f"  {seconds / args.val_iteration:.3f} s per iteration, of which waiting for data "
              f"{data_time / args.val_iteration:.3f} s ({100 * data_time / seconds:.1f} %)", flush=True)
        self.recorded = means
        self.epoch_record.update({f"train_{name}": value for name, value in means.items()})

    def record(self, **scalars):
        """Scalars of this iteration (tensors stay on their device until shown). Each is logged as its mean
        over the iterations that recorded it: ``loss…`` as ``losses/train_<name>``, ``a/b`` as the tag
        ``a/b``, any other name as ``train/<name>``; ``loss`` is the training loss of log.txt and the bar."""
        self.scalars.add(self.iteration, scalars)

    def autocast(self):
        """bf16 autocast with ``--amp``; a no-op context otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp)

    def evaluate(self, model, splits=("val", "test"), prefix=None):
        """Evaluate ``model`` (in eval mode) on ``splits`` — ``train`` (the labeled training images, as the
        authors' "Train Stats"), ``val``, ``test`` — and return the metrics. Without ``prefix`` they are the
        run's reported values (log.txt, model selection, summary); with it they are logged under
        ``<prefix>/<split>_<metric>`` only (e.g. another model; the prefix must not start with ``train_``)."""
        if prefix is not None and (prefix.startswith("train_") or not prefix):
            raise ValueError(f"prefix {prefix!r}: give a name such as 'teacher' that does not start with 'train_'")
        results = {}
        with self.autocast():
            for split in splits:
                for name, value in self.task.evaluate(model, self.loaders[split], self.device).items():
                    if prefix is None and split == "train" and name == "loss":
                        continue  # the train loss of the log is the training loss
                    key = f"{split}_{name}" if prefix is None else f"{prefix}/{split}_{name}"
                    results[key] = value
        self.epoch_record.update(results)
        return results

    def evaluate_epoch(self, student, ema_eval):
        """The end-of-epoch evaluation every method shares (docs/evaluation.md): the model ``--eval-model``
        names is reported (log.txt, model selection, summary), after "Train Stats" on the labeled training
        images (of the student on AFLW, of the reported model on CIFAR-10); on AFLW, whose authors' scripts
        differ in the model they report, the other one is logged too, as ``other_model/*``."""
        reported, other = (ema_eval, student) if self.args.eval_model == "ema" else (student, ema_eval)
        self.evaluate(student if self.task.train_stats_on_student else reported, ["train"])
        self.evaluate(reported)
        if self.task.name == "aflw":
            self.evaluate(other, prefix="other_model")

    def end_epoch(self):
        """Log the epoch (log.txt, tensorboard), select the best model, write the checkpoint and the epoch line."""
        record = dict(self.epoch_record, epoch=self.epoch + 1)
        self.history.append(record)
        self.best, is_best = self.protocol.best_after(self.best, record)
        self.epoch += 1
        # Logs first, checkpoint last: if the run dies in between, the resumed run redoes this epoch and
        # its writer purges the stale events (purge_step), so nothing is lost or doubled.
        self._write_log()
        self._write_scalars(record)
        save_checkpoint(self._state(), self.args.out, is_best)
        extras = "".join(f"  {name} {value:.4g}" for name, value in self.recorded.items()
                         if _shown_in_epoch_line(name))
        print(self.protocol.epoch_line(self.epoch, self.args.epochs, record) + extras, flush=True)

    def finish(self):
        """``summary.json`` and the printed summary, once every epoch is trained."""
        summary = summarize(self.protocol, self.history, self._wall_time(), self.args)
        write_json(os.path.join(self.args.out, SUMMARY), summary)
        self.set_status("finished")
        print_summary(summary)

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def set_status(self, state, detail=""):
        """``status.json``: how this attempt stands or ended (running, finished, interrupted, stopped), after
        those of the run's earlier attempts. An attempt that is killed stays "running"."""
        if self.started is None:
            return  # nothing of this attempt is on disk yet
        attempt = {"started": self.attempt_started, "state": state, "detail": detail, "epochs_done": self.epoch}
        status = {key: attempt[key] for key in ("state", "detail", "epochs_done")}
        write_json(os.path.join(self.args.out, STATUS),
                   dict(status, epochs=self.args.epochs, attempts=self.earlier_attempts + [attempt]))

    def _project(self, seconds_per_iteration, left_in_epoch):
        """Once per attempt: if the training left takes more than a day at this speed, say so."""
        self.projected = True
        left = left_in_epoch + (self.args.epochs - self.epoch - 1) * self.args.val_iteration
        seconds = seconds_per_iteration * left
        if seconds > 24 * 3600:
            where = "this GPU" if self.device.type == "cuda" else "this CPU; a GPU takes hours"
            print(f"note: the {left:,} training iterations left take about {short_duration(seconds)} on {where} "
                  f"(README \"Quick try\" shows a run of minutes)", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------ run folder and checkpoints

    def _start(self):
        if self.started is not None:
            return
        args = self.args
        if self.saved is None:
            os.makedirs(args.out, exist_ok=True)
            write_json(os.path.join(args.out, SPLIT), args.split)
            save_checkpoint(self._state(), args.out, is_best=False)
        else:
            self._restore(self.saved)
        self._write_log()  # its header for a new run; drops rows of an epoch the checkpoint does not hold
        earlier = None if self.saved is None else earlier_record(args.out)
        write_json(os.path.join(args.out, ARGS), options_record(args, earlier))
        self.earlier_attempts = [] if self.saved is None else read_json(os.path.join(args.out, STATUS)).get("attempts", [])
        self.attempt_started, self.projected = datetime.now(timezone.utc).isoformat(timespec="seconds"), False
        if self.device.type == "cpu" and args.gpu != "cpu":
            print("CUDA is not available: running on the CPU.", file=sys.stderr)
        networks = [obj for obj in self.kept.values() if isinstance(obj, torch.nn.Module)]
        size = f"; {sum(p.numel() for p in networks[0].parameters()) / 1e6:.2f}M parameters" if networks else ""
        print(f"{self.method} on {args.dataset}, {labels_text(args.n_labeled, self.labeled_images)}, "
              f"{self.device}{size}; run folder {args.out}")
        # Every attempt rewrites the scalars of the epochs the checkpoint holds, purging those of earlier
        # attempts: tensorboardX writes events from a queue in a thread of its own, so the last epoch's
        # events of an attempt killed with SIGKILL may never have reached the disk.
        self.writer = open_writer(args.out, first_step=args.batch_size * args.val_iteration)
        for record in self.history:
            self._write_scalars(record)
        self.started = time.time()
        self.set_status("running")

    def _state(self):
        return {"format": CHECKPOINT_FORMAT, "args": {k: v for k, v in vars(self.args).items() if k != "given"},
                "epoch": self.epoch, "step": self.step,
                "kept": {name: obj if torch.is_tensor(obj) else obj.state_dict() for name, obj in self.kept.items()},
                "history": self.history, "best": self.best, "wall_time": self._wall_time(),
                "rng": rng_state(self.device)}

    def _restore(self, state):
        saved = state.get("kept")
        if saved is None:  # an earlier version's checkpoint: its objects under fixed keys, older record keys
            saved = {name: state[key] for key, name in LEGACY_KEYS.items() if key in state and name in self.kept}
            state = dict(state, history=[legacy_record(row) for row in state["history"]])
        missing, extra = sorted(set(self.kept) - set(saved)), sorted(set(saved) - set(self.kept))
        if missing or extra:
            raise UserError(f"{self.args.resume} holds {', '.join(sorted(saved))} but the script keeps "
                            f"{', '.join(self.kept)}: the script changed after the run started; resume it with "
                            f"the script that started it")
        for name, obj in self.kept.items():
            if torch.is_tensor(obj):
                with torch.no_grad():
                    obj.copy_(saved[name])
            else:
                obj.load_state_dict(saved[name])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.best, self.wall_time = state["history"], state["best"], state["wall_time"]
        set_rng_state(state["rng"], self.device)

    def _wall_time(self):
        return self.wall_time + (time.time() - self.started if self.started is not None else 0.0)

    def _write_log(self):
        write_log(self.args.out, [name for name, _ in self.protocol.columns],
                  [self.protocol.log_row(row) for row in self.history])

    def _write_scalars(self, record):
        """One epoch's tensorboard scalars, at the step of samples seen by its end."""
        step = self.args.batch_size * self.args.val_iteration * record["epoch"]
        for tag, value in tensorboard_scalars(self.protocol, record).items():
            if math.isfinite(value):  # a diverged evaluation stays in log.txt; tensorboard would only warn
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()


def tensorboard_scalars(protocol, record):
    """Tag → value of an epoch's record: the protocol's tags, every recorded scalar (``_tag_of``) and the
    evaluations logged under a prefix."""
    tags = {tag: record[key] for tag, key in protocol.tags.items() if key in record}
    reported = set(protocol.tags.values())
    for key, value in record.items():
        if key.startswith("train_") and key not in reported:
            tags[_tag_of(key[len("train_"):])] = value
        elif "/" in key:
            tags[key] = value
    return tags


def legacy_record(row):
    """An epoch record of an earlier version: ``lr``, ``lambda_u`` and ``other_<split>_<metric>`` keys."""
    renamed = {"lr": "train_lr", "lambda_u": "train_lambda_u"}
    return {renamed.get(key, f"other_model/{key[len('other_'):]}" if key.startswith("other_") else key): value
            for key, value in row.items()}


def _tag_of(name):
    """The tensorboard tag of a recorded scalar (``Bookkeeper.record``)."""
    if "/" in name:
        return name
    return f"losses/train_{name}" if name.startswith("loss") else f"train/{name}"


def _shown_in_epoch_line(name):
    """Recorded scalars beyond the losses and the schedules (lr, λ_u) are shown in the epoch line too."""
    return not (name.startswith("loss") or name in ("lr", "lambda_u"))


class EpochScalars:
    """The scalars recorded in an epoch's iterations. Tensors stay on the device that computed them and are
    read only when shown (at a progress refresh and at the end of the epoch): on a GPU, reading a loss every
    iteration would make the CPU wait for the GPU each time. A non-finite ``loss`` is reported with its
    exact iteration."""

    def __init__(self, epoch, iterations):
        self.epoch, self.iterations = epoch, iterations
        self.tensors = {}   # name → (float64 buffer with a slot per iteration, iterations that wrote it)
        self.numbers = {}   # name → [(iteration, float)] for Python numbers

    def add(self, iteration, scalars):
        with torch.no_grad():
            for name, value in scalars.items():
                if torch.is_tensor(value):
                    buffer, written = self.tensors.setdefault(
                        name, (torch.empty(self.iterations, dtype=torch.float64, device=value.device), []))
                    buffer[iteration] = value
                    written.append(iteration)
                else:
                    self.numbers.setdefault(name, []).append((iteration, float(value)))

    def means(self, done):
        """Each scalar's mean over the iterations before ``done`` that recorded it; ``NonFiniteLoss`` names
        the first non-finite ``loss``."""
        values = {name: [v for i, v in pairs if i < done] for name, pairs in self.numbers.items()}
        if self.tensors:
            names = list(self.tensors)
            rows = torch.cat([self.tensors[name][0][:done] for name in names]).tolist()  # one device→host copy
            for k, name in enumerate(names):
                row = rows[k * done:(k + 1) * done]
                values[name] = [row[i] for i in self.tensors[name][1] if i < done]
        bad = next((i for i, value in enumerate(values.get("loss", [])) if not math.isfinite(value)), None)
        if bad is not None:
            raise NonFiniteLoss(f"the training loss became {values['loss'][bad]} in epoch {self.epoch + 1}, "
                                f"iteration {bad + 1}")
        return {name: sum(row) / len(row) for name, row in values.items() if row}


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
        resolved.setdefault("tf32", False)  # runs started before the option existed trained without TF32
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


def choose_workers(args, device, resuming):
    """Data-loader workers per loader (``utils.defaults.data_workers``), recorded in args.json as used.
    A number the user gave (or the run being resumed used) is lowered to this machine's CPUs, with a note."""
    explicit = resuming or "workers" in args.given
    workers = data_workers(args.workers, explicit, args.dataset, device.type == "cuda")
    if explicit and workers < args.workers:
        print(f"note: --workers {args.workers} lowered to {workers}, the CPUs this process may use", file=sys.stderr)
    args.workers = workers


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


def labels_text(n_labeled, images):
    """``250 labels``; ``1 % labels (11 images)`` for a fraction; ``all labels (8 970 images)`` for -1."""
    if n_labeled == -1:
        return f"all labels ({images} images)"
    if isinstance(n_labeled, float):
        return f"{100 * n_labeled:g} % labels ({images} images)"
    return f"{images} labels"


def read_json(path):
    """A JSON object from ``path``; {} if it is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def earlier_record(folder):
    """The run's ``args.json`` as written by its earlier attempts; {} if it is missing or unreadable."""
    return read_json(os.path.join(folder, ARGS))


def print_summary(s):
    m = {"acc": "accuracy (%)", "me": "mean error (fraction of the inter-ocular distance)"}[s["metric"]]
    last = "epoch" if s["epochs"] == 1 else f"{min(20, s['epochs'])} epochs"
    print(f"Test {m}:\n"
          f"  at the best-validation epoch ({s['best_epoch']}, valid {s['best_val']:.4f}): {s['test_at_best_val']:.4f}\n"
          f"  median of the last {last}: {s['median_last20_test']:.4f}\n"
          f"  mean of the last {last}:   {s['mean_last20_test']:.4f}")
