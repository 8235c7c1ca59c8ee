"""Check this repository on a CUDA machine: every script end to end, exact vs unrolled meta-gradients,
resume, and per-iteration timings, in one command that fits a time budget.

    python -m utils.gpucheck --out gpucheck                  # on any CUDA machine, default budget 450 s
    python -m utils.gpucheck --out DIR --device cpu --batch-size 8 --iterations 2 --tasks aflw

It writes DIR/gpucheck.json (everything) and DIR/gpucheck.md (one table per section and an overall
PASS/FAIL line), prints the Markdown last and exits 0 only on PASS: no check of sections 2-4 failed and
none of them was skipped whole (the benchmark reports a configuration that fails, such as --compile
with the unrolled double backward, in its table). The sections:

1. environment — device, library versions, CPU count;
2. runs — every script (and L2I-O and MT with the speed flags) as a user runs it, as a subprocess, on
   generated data in the real formats (``dataset/synthetic.py``), one epoch at the paper's batch size;
3. exactness — ``--meta-grad exact`` against ``unroll`` on the device: meta-gradients in float64, one
   float32 training step (the bounds of tests/test_meta.py and tests/test_l2i.py);
4. resume — a straight 2-epoch run, the same again, and 1 epoch + ``--resume`` for 1 more;
5. benchmark — ``utils.benchmark`` per method, task, meta-gradient route and speed flag.

They run in order of importance and cost, so that an exhausted budget costs the least: the default-flag
runs (with the resume check's first runs in the same pool of ``--jobs`` subprocesses), exactness, the
resumed runs, the speed-flag runs and the benchmark without ``--compile``, and last ``--compile`` (runs,
then benchmark), the slowest and least predictable. When ``--budget`` seconds have passed, running
scripts are stopped, in-process work is interrupted (SIGALRM), and every check not finished is reported
as "skipped: time budget".
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from utils.defaults import DATASETS as TASK_NAMES
from utils.defaults import METHODS, defaults
from utils.options import fail
from utils.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("runs", "exactness", "resume", "benchmark")
# The sections that decide PASS / FAIL. The benchmark measures: a configuration PyTorch cannot run
# (--compile with the unrolled double backward) is reported in its table, and is no failure of the code.
CHECK_SECTIONS = ("runs", "exactness", "resume")
SECTION_TITLES = {"environment": "1. Environment", "runs": "2. Scripts end to end",
                  "exactness": "3. Exact vs unroll meta-gradients", "resume": "4. Resume",
                  "benchmark": "5. Benchmark (ms per iteration)"}
FLAG_SETS = {"amp": ["--amp"], "channels-last": ["--channels-last"], "amp+channels-last": ["--amp", "--channels-last"],
             "compile": ["--compile"], "data-on-device": ["--data-on-device"]}
# Script runs with speed flags: L2I-O (the main method) and MT (its baseline).
SPEED_RUN_METHODS = ("MT", "L2I-O")
SPEED_RUN_FLAGS = ("amp+channels-last", "data-on-device", "compile")
BENCHMARK_FLAGS = ("fp32", "channels-last", "amp", "amp+channels-last", "compile")
AFLW_LINES, AFLW_TEST, AFLW_LABELED = 300, 60, "0.01"   # 270 training images: 0.01 labels 3 of them
RUN_FILES = ("args.json", "split.json", "log.txt", "checkpoint.pth.tar", "model_best.pth.tar", "summary.json")
RESUME_METHODS = ("MT", "L2I-O")
DEFAULT_ITERATIONS = {"runs": 20, "resume": 10, "benchmark": 10}


class OutOfTime(BaseException):
    """Raised into in-process work at the deadline. Not an ``Exception``, so that the handlers that
    report a failing configuration (and those inside torch.compile) let it through."""


class Budget:
    def __init__(self, seconds):
        self.seconds, self.started = seconds, time.monotonic()

    def elapsed(self):
        return time.monotonic() - self.started

    def left(self):
        return self.seconds - self.elapsed()

    @contextlib.contextmanager
    def enforced(self):
        """In-process work stops at the deadline: SIGALRM raises ``OutOfTime`` in the main thread."""
        if self.left() <= 0:
            raise OutOfTime

        def on_alarm(signum, frame):
            raise OutOfTime
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.left())
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


SKIPPED = {"status": "skipped", "reason": "skipped: time budget"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="report folder (new or empty); generated data and runs go there too")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the same checks on the CPU)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds; what is not done by then is skipped (default 450: under 8 minutes on an H200)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="sections to run (the environment is always reported)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    p.add_argument("--flags", nargs="*", choices=list(FLAG_SETS), default=list(FLAG_SETS),
                   help="speed-flag sets for the runs (amp+channels-last, data-on-device, compile) and the "
                        "benchmark (amp, channels-last, amp+channels-last, compile); fp32 is always included")
    p.add_argument("--batch-size", type=int, help="override the paper's batch sizes (64 CIFAR-10, 128 AFLW)")
    p.add_argument("--iterations", type=int,
                   help="iterations per epoch of the runs (default 20) and of the resume runs (10), and timed "
                        "iterations per benchmark configuration (10)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="scripts run at a time (default: half the CPU cores, at most 8)")
    p.add_argument("--script-args", default="", help="extra options for every script, e.g. '--workers 4'")
    return p.parse_args(argv)


# ============================================================================ 1. environment

def environment(device):
    info = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpus": os.cpu_count(), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f"{props.major}.{props.minor}")
    return {"status": "info", "info": info}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


# ============================================================================ generated data

def cifar_sizes(batch_size):
    """The generated CIFAR-10 and the options that use it. At the paper's batch 64, per class: 25 labeled,
    50 validation, 25 unlabeled and 20 test images (``--n-labeled 250 --n-val 500``). A smaller test batch
    shrinks them in proportion; every training stream still holds at least one batch."""
    scale = batch_size / defaults("cifar10", "MT")["batch_size"]
    labeled, validation, unlabeled, test = (math.ceil(n * scale) for n in (25, 50, 25, 20))
    return {"per_class_train": labeled + validation + unlabeled, "per_class_test": test,
            "n_labeled": 10 * labeled, "n_val": 10 * validation}


def generate_data(folder, tasks, batch_size):
    """Write the datasets once; returns each task's data options for the scripts."""
    from dataset.synthetic import make_aflw_release, make_cifar10
    options = {}
    if "cifar10" in tasks:
        sizes = cifar_sizes(batch_size or defaults("cifar10", "MT")["batch_size"])
        root = make_cifar10(folder / "cifar10", sizes["per_class_train"], sizes["per_class_test"])
        options["cifar10"] = ["--data-root", str(root), "--n-labeled", str(sizes["n_labeled"]),
                              "--n-val", str(sizes["n_val"])]
    if "aflw" in tasks:
        release = make_aflw_release(folder / "aflw", n_train=AFLW_LINES, n_test=AFLW_TEST)
        options["aflw"] = ["--data-root", str(release), "--n-labeled", AFLW_LABELED]
    return options


# ============================================================================ running scripts

@dataclasses.dataclass
class Job:
    name: str
    method: str
    task: str
    argv: list
    folder: Path
    epochs: int
    flags: tuple = ()

    def command(self):
        return [sys.executable, f"train-{self.method}.py", *self.argv]


class Scripts:
    """Builds the scripts' command lines as a user types them, and runs them."""

    def __init__(self, opts, device, data_options, out):
        self.opts, self.data_options, self.out = opts, data_options, out
        self.gpu = "cpu" if device.type == "cpu" else str(device.index or 0)
        self.extra = shlex.split(opts.script_args)

    def job(self, name, method, task, epochs, iterations, flags=()):
        folder = self.out / "runs" / name
        argv = ["--gpu", self.gpu, *self.data_options[task], "--epochs", str(epochs),
                "--val-iteration", str(iterations)]
        if self.opts.batch_size:
            argv += ["--batch-size", str(self.opts.batch_size)]
        argv += [option for flag in flags for option in FLAG_SETS[flag]]
        return Job(name, method, task, argv + ["--no-progress", *self.extra, "--out", str(folder)], folder, epochs,
                   tuple(flags))

    def resume_job(self, name, first_half, epochs):
        argv = ["--resume", str(first_half.folder), "--epochs", str(epochs), "--gpu", self.gpu, "--no-progress",
                *self.extra]
        return Job(name, first_half.method, first_half.task, argv, first_half.folder, epochs)

    def run(self, jobs, budget):
        """Run ``jobs``, ``--jobs`` at a time; returns {name: outcome}. At the deadline, running scripts
        are stopped and the rest are not started."""
        pending, running, outcomes = list(jobs), {}, {}
        while pending or running:
            while pending and len(running) < self.opts.jobs and budget.left() > 0:
                job = pending.pop(0)
                running[job.name] = start(job, self.out)
            for name, (process, started, log) in list(running.items()):
                if process.poll() is not None or budget.left() <= 0:
                    outcomes[name] = finish(process, started, log)
                    del running[name]
            if budget.left() <= 0:
                outcomes.update({job.name: {"exit_status": None, "wall_s": None} for job in pending})
                pending = []
            time.sleep(0.1)
        return outcomes

    def run_and_judge(self, jobs, budget):
        """{name: judged item}, judged at once: a resume later continues in its first epoch's folder."""
        outcomes = self.run(jobs, budget)
        return {job.name: judge_run(job, outcomes[job.name]) for job in jobs}


def start(job, out):
    log_path = out / "runs" / f"{job.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # A session of its own: stopping the script at the deadline also stops its data-loader and
    # compile workers.
    process = subprocess.Popen(job.command(), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    return process, time.monotonic(), log


def finish(process, started, log):
    """The outcome of a script that ended, or was stopped here at the deadline (exit status None)."""
    stopped = process.poll() is None
    if stopped:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    log.close()
    return {"exit_status": None if stopped else process.returncode, "wall_s": round(time.monotonic() - started, 1),
            "log": log.name}


def judge_run(job, outcome):
    """pass / fail / skipped, with the reason: exit status, run folder, finite losses in log.txt."""
    item = {"name": job.name, "method": job.method, "task": job.task, "flags": list(job.flags),
            "command": shlex.join(["python", *job.command()[1:]]), **outcome}
    if outcome["exit_status"] is None:
        stopped = f" (stopped after {outcome['wall_s']} s)" if outcome["wall_s"] is not None else ""
        return dict(item, status="skipped", reason=f"skipped: time budget{stopped}")
    problem = run_problem(job, outcome)
    return dict(item, status="fail" if problem else "pass", reason=problem or "")


def run_problem(job, outcome):
    if outcome["exit_status"] != 0:
        return f"exit status {outcome['exit_status']}: {last_line(outcome['log'])}"
    names = {p.name for p in job.folder.iterdir()} if job.folder.is_dir() else set()
    missing = [n for n in RUN_FILES if n not in names]
    if not any(n.startswith("events.out.tfevents.") for n in names):
        missing.append("tensorboard events file")
    if missing:
        return f"run folder lacks {', '.join(missing)}"
    return log_problem(job.folder / "log.txt", job.epochs)


def last_line(path):
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def read_log(path):
    """log.txt as {column: [value per epoch]} (tab after every field)."""
    header, *rows = Path(path).read_text().splitlines()
    columns = header.split("\t")[:-1]
    values = [[float(v) for v in row.split("\t")[:-1]] for row in rows]
    return {column: [row[i] for row in values] for i, column in enumerate(columns)}


def log_problem(path, epochs):
    log = read_log(path)
    losses = {column: values for column, values in log.items() if "Loss" in column}
    if not losses or any(len(values) != epochs for values in losses.values()):
        return f"log.txt does not hold {epochs} epoch(s) of losses"
    bad = [column for column, values in losses.items() if not all(map(math.isfinite, values))]
    return f"non-finite {', '.join(bad)} in log.txt" if bad else None


def default_runs(scripts, opts):
    iterations = opts.iterations or DEFAULT_ITERATIONS["runs"]
    return [scripts.job(f"{task}-{method}", method, task, 1, iterations)
            for task in opts.tasks for method in opts.methods if supports(method, task)]


def speed_runs(scripts, opts):
    iterations = opts.iterations or DEFAULT_ITERATIONS["runs"]
    return [scripts.job(f"{task}-{method}-{flag}", method, task, 1, iterations, flags=[flag])
            for flag in SPEED_RUN_FLAGS if flag in opts.flags
            for task in opts.tasks if not (flag == "data-on-device" and task != "cifar10")
            for method in SPEED_RUN_METHODS if method in opts.methods]


def supports(method, task):
    return task in load_script(method).DATASETS


def compiles(flags):
    return "compile" in flags


# ============================================================================ 3. exactness

EXACTNESS_BATCH = 4   # the batch of tests/test_l2i.py and tests/test_meta.py, where the bounds were set
META_GRADIENT_RTOL = 1e-10
# The counters and AFLW lr of tests/test_l2i.py: a non-zero, unsaturated unsupervised weight, a
# mean-teacher decay strictly inside (0, 0.999), and a virtual step that follows the decayed lr.
COUNTERS = {"cifar10": dict(epoch=100, iteration=3, step=6), "aflw": dict(epoch=0, iteration=3, step=600)}
AFLW_DECAYED_LR = 0.003


@contextlib.contextmanager
def strict_arithmetic():
    """IEEE float32 and reproducible kernels while comparing the two routes: the bounds were derived for
    float32 rounding, and cuDNN's TF32 convolutions (on by default) round to 10 mantissa bits."""
    backends = [(torch.backends.cudnn, "deterministic", True), (torch.backends.cudnn, "benchmark", False),
                (torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(obj, name) for obj, name, _ in backends]
    for obj, name, value in backends:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(backends, saved):
            setattr(obj, name, value)


def l2i_run(method, task_name, device, dtype):
    """A ``Run`` as the scripts build it (through ``utils.benchmark.make_config``), in ``dtype``."""
    from utils.benchmark import make_config
    torch.manual_seed(0)
    gpu = "cpu" if device.type == "cpu" else str(device.index or 0)
    train_step, run = make_config(method, task_name, device, ["--gpu", gpu, "--batch-size", str(EXACTNESS_BATCH)])
    for model in (run.student, run.ema_eval.model, run.mean_teacher.model):
        model.to(dtype)
    run.optimizer = run.task.make_optimizer(run.student.parameters(), run.args)  # on the converted parameters
    if task_name == "aflw":
        run.task.mean, run.task.std = run.task.mean.to(dtype), run.task.std.to(dtype)
    return train_step, run


def batch_in(run, dtype, seed):
    from utils.benchmark import random_batch
    torch.manual_seed(seed)
    return random_batch(run, dtype)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def meta_gradient_check(method, task_name, device):
    """float64: dM/dz from ``exact`` and ``unroll`` with the scripts' own options (virtual step, loss
    reduction, squash, AFLW shift compensation); for L2I-O also the gradient pushed on into the label
    generator's parameters. Both within 1e-10 relative, as tests/test_meta.py asserts on the CPU."""
    from utils.meta import imputed_label_gradient, label_generator_output
    _, run = l2i_run(method, task_name, device, torch.float64)
    batch = batch_in(run, torch.float64, seed=1)
    labels = label_generator_output(run.student, batch.u2)
    if method == "L2I-L":
        labels = labels.detach().requires_grad_(True)   # free labels r, no path back to the generator
    student_out = run.student(batch.u1)
    gradients = {}
    for route in ("exact", "unroll"):
        run.args.meta_grad = route
        gradients[route] = imputed_label_gradient(run, batch, student_out, labels, keep_graph=True)
    if not gradients["exact"].norm() > 1e-8 * labels.norm():
        return {"value": None, "status": "fail", "reason": "the meta-gradient is zero: nothing was compared"}
    errors = [relative_error(gradients["exact"], gradients["unroll"])]
    if method == "L2I-O":
        params = list(run.student.parameters())
        errors.append(relative_error(*(generator_gradient(labels, params, gradients[route])
                                       for route in ("exact", "unroll"))))
    worst = max(errors)
    within = worst <= META_GRADIENT_RTOL
    return {"value": worst, "bound": META_GRADIENT_RTOL, "status": "pass" if within else "fail",
            "reason": "" if within else f"relative difference {worst:.3g} > {META_GRADIENT_RTOL:g}"}


def generator_gradient(labels, params, grad_labels):
    grads = torch.autograd.grad(labels, params, grad_outputs=grad_labels, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def primed_float32_run(method, task_name, device):
    """After one script iteration (non-trivial optimizer state, teacher ≠ student), at COUNTERS."""
    train_step, run = l2i_run(method, task_name, device, torch.float32)
    if task_name == "aflw":
        for group in run.optimizer.param_groups:
            group["lr"] = AFLW_DECAYED_LR
    for key, value in COUNTERS[task_name].items():
        setattr(run, key, value)
    run.step, run.iteration = run.step - 1, run.iteration - 1   # priming: the iteration before
    train_step(run, batch_in(run, torch.float32, seed=1))
    run.step, run.iteration = run.step + 1, run.iteration + 1
    return train_step, run


def gradient_free(run):
    """Parameters whose gradient is only rounding noise (WRN conv biases before a BN layer); Adam turns
    that noise into steps that differ between two correct routes (tests/test_l2i.py ``gradient_free``)."""
    return {name for name, p in run.student.named_parameters()
            if "exp_avg_sq" in run.optimizer.state.get(p, {})
            and run.optimizer.state[p]["exp_avg_sq"].max().sqrt() < 1e-7}


def train_step_check(method, task_name, device):
    """float32, from one state and batch: ``exact``, ``unroll`` and a zero virtual step. Per student
    tensor, |θ_exact − θ_unroll| ≤ 1e-3·|meta step's contribution| + 1e-6·|whole change| + ε₃₂·|θ|, the
    bound of tests/test_l2i.py (where its terms are explained); value = the worst ratio to the bound."""
    train_step, base = primed_float32_run(method, task_name, device)
    batch = batch_in(base, torch.float32, seed=2)
    after = {}
    for label, route, virtual_step in (("exact", "exact", None), ("unroll", "unroll", None), ("no_meta", "exact", 0.0)):
        run = copy.deepcopy(base)
        run.args.meta_grad = route
        if virtual_step is not None:
            run.args.virtual_step = virtual_step
        train_step(run, batch)
        after[label] = dict(run.student.named_parameters())
        if label == "exact":
            free = gradient_free(run)
    worst, meta_total = 0.0, 0.0
    for name, before in base.student.named_parameters():
        if name in free:
            continue
        exact = after["exact"][name].detach()
        meta_part = (exact - after["no_meta"][name]).norm().item()
        bound = (1e-3 * meta_part + 1e-6 * (exact - before).norm().item()
                 + torch.finfo(torch.float32).eps * before.norm().item())
        difference = (exact - after["unroll"][name]).norm().item()
        worst = max(worst, difference / bound if difference else 0.0)   # WRN's dead BN tensors never move
        meta_total += meta_part
    if meta_total == 0:
        return {"value": None, "status": "fail", "reason": "the meta step did not change the weights"}
    return {"value": worst, "bound": 1.0, "status": "pass" if worst <= 1 else "fail",
            "reason": "" if worst <= 1 else f"a student tensor differs by {worst:.3g}× the bound"}


def exactness_checks(opts):
    """(name, kind, method, task, function) in order; each function returns its result. Both L2I variants
    whatever ``--methods`` says: they are what this section is about, and in-process they cost little."""
    configs = [(method, task) for task in opts.tasks for method in ("L2I-O", "L2I-L")]
    checks = [(f"float64 meta-gradient {task} {method}", "float64 meta-gradient", method, task, meta_gradient_check)
              for method, task in configs]
    checks += [(f"float32 train step {task} {method}", "float32 train step", method, task, train_step_check)
               for method, task in configs]
    return checks


def exactness_section(opts, device, budget):
    items = []
    for name, check, method, task, function in exactness_checks(opts):
        item = {"name": name, "check": check, "method": method, "task": task}
        items.append(dict(item, **guarded(budget, lambda: function(method, task, device), strict=True)))
    return items


def guarded(budget, work, strict=False):
    """``work()`` under the deadline; an exception is a failure with its one-line reason."""
    if budget.left() <= 0:
        return dict(SKIPPED)
    try:
        with budget.enforced(), (strict_arithmetic() if strict else contextlib.nullcontext()):
            return work()
    except OutOfTime:
        return dict(SKIPPED)
    except Exception as exc:  # reported, not fatal: the other checks still run
        return {"status": "fail", "reason": one_line(exc)}


def one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ============================================================================ 4. resume

RESUME_FLOOR = 1e-5   # relative
RESUME_FACTOR = 10
LOG_RESOLUTION = 1e-6   # log.txt keeps 6 decimals: a tiny difference can flip the last one


def resume_task(tasks):
    """CIFAR-10 (Adam, and the numpy augmentation stream a resume must restore); AFLW if only it is selected."""
    return "cifar10" if "cifar10" in tasks else "aflw"


def resume_groups(scripts, opts):
    """Per method: straight 2 epochs, the same again, and 1 epoch (resumed afterwards)."""
    iterations = opts.iterations or DEFAULT_ITERATIONS["resume"]
    task = resume_task(opts.tasks)
    return [{kind: scripts.job(f"resume-{task}-{method}-{kind}", method, task, epochs, iterations)
             for kind, epochs in (("straight", 2), ("repeat", 2), ("first-epoch", 1))}
            for method in RESUME_METHODS if method in opts.methods]


def finish_resume(groups, judged, scripts, budget):
    """Resume every first epoch that passed for one more epoch, then compare the three 2-epoch runs."""
    resumes = []
    for group in groups:
        first = group["first-epoch"]
        group["resumed"] = scripts.resume_job(first.name.replace("first-epoch", "resumed"), first, epochs=2)
        if judged[first.name]["status"] == "pass":
            resumes.append(group["resumed"])
    judged = dict(judged, **scripts.run_and_judge(resumes, budget))
    return [judge_resume(group, judged) for group in groups]


def judge_resume(group, judged):
    runs = {kind: judged[job.name] for kind, job in group.items() if job.name in judged}
    if "resumed" not in runs:   # not started: it inherits why its first epoch did not pass
        runs["resumed"] = {"status": runs["first-epoch"]["status"], "reason": "its first epoch did not pass"}
    straight = group["straight"]
    item = {"name": straight.name.replace("-straight", ""), "method": straight.method, "task": straight.task,
            "runs": runs}
    unfinished = [kind for kind, run in runs.items() if run["status"] != "pass"]
    if unfinished:
        status = "skipped" if all(runs[k]["status"] == "skipped" for k in unfinished) else "fail"
        return dict(item, status=status, reason="; ".join(f"{k}: {runs[k]['reason']}" for k in unfinished))
    kinds = ("straight", "repeat", "resumed")
    states = [final_state(group[kind].folder) for kind in kinds]
    item["weights"] = compare_three(*states, student_difference(states[0], straight.method, straight.task))
    item["losses"] = compare_three(*(logged_losses(group[kind].folder) for kind in kinds), loss_difference)
    bad = [what for what in ("weights", "losses") if not item[what]["pass"]]
    return dict(item, status="fail" if bad else "pass",
                reason=f"the resumed run differs beyond the tolerance in its {' and '.join(bad)}" if bad else "")


def compare_three(straight, repeat, resumed, difference):
    """The resume rule: |resumed − straight| ≤ max(10·|repeat − straight|, floor). GPU runs are not
    bit-reproducible, so the repeat measures this device's run-to-run noise, and a correct resume may
    differ by about that much; a broken one (wrong RNG, optimizer or EMA state) differs far more."""
    noise, resume = difference(repeat, straight), difference(resumed, straight)
    tolerance = max(RESUME_FACTOR * noise, RESUME_FLOOR)
    return {"resumed_vs_straight": resume, "repeat_vs_straight": noise, "tolerance": tolerance,
            "pass": resume <= tolerance}


def final_state(folder):
    return torch.load(folder / "checkpoint.pth.tar", map_location="cpu", weights_only=True)


def student_difference(reference, method, task):
    """Largest per-tensor relative difference of the final student weights and BN statistics, leaving
    out the parameters whose gradient is rounding noise (found from the reference run's Adam state, as
    ``gradient_free`` does): Adam makes their values run-to-run noise of order one."""
    names = parameter_names(method, task)
    noise_only = {names[int(i)] for i, s in reference["optimizer"]["state"].items()
                  if "exp_avg_sq" in s and s["exp_avg_sq"].max().sqrt() < 1e-7}

    def difference(actual, expected):
        return max(((actual["state_dict"][name].double() - e.double()).norm() / max(e.double().norm(), 1e-30)).item()
                   for name, e in expected["state_dict"].items() if name not in noise_only)
    return difference


def parameter_names(method, task):
    """The student's parameter names in the optimizer's order, from a run built as the scripts build it."""
    from utils.benchmark import make_config
    _, run = make_config(method, task, torch.device("cpu"), ["--gpu", "cpu"])
    return [name for name, _ in run.student.named_parameters()]


def logged_losses(folder):
    return {column: values for column, values in read_log(folder / "log.txt").items() if "Loss" in column}


def loss_difference(actual, expected):
    """Largest relative difference of the logged losses beyond the log's last decimal."""
    return max(max(abs(a - e) - LOG_RESOLUTION, 0.0) / max(abs(e), 1e-30) for column in expected
               for a, e in zip(actual[column], expected[column]))


# ============================================================================ 5. benchmark

def benchmark_configs(opts):
    """(flag set, task, method, meta-gradient route), all of fp32 first."""
    for flag in BENCHMARK_FLAGS:
        if flag != "fp32" and flag not in opts.flags:
            continue
        for task in opts.tasks:
            for method in opts.methods:
                if not supports(method, task):
                    continue
                for route in (("exact", "unroll") if method.startswith("L2I") else (None,)):
                    yield flag, task, method, route


def benchmark_argv(opts, device, flag, task, method, route):
    argv = ["--methods", method, "--tasks", task, "--device", str(device),
            "--iters", str(opts.iterations or DEFAULT_ITERATIONS["benchmark"])]
    if route:
        argv += ["--meta-grad", route]
    if opts.batch_size:
        argv += ["--batch-size", str(opts.batch_size)]
    return argv + FLAG_SETS.get(flag, [])


def benchmark_one(opts, device, flag, task, method, route):
    from utils import benchmark
    if flag == "compile":
        import torch._dynamo
        torch._dynamo.reset()   # each configuration compiles afresh, never against dynamo's recompile limit
    row = benchmark.benchmark(benchmark.parse_args(benchmark_argv(opts, device, flag, task, method, route)))[0]
    return {"median_ms": 1e3 * row["median_s"], "min_ms": 1e3 * row["min_s"], "max_ms": 1e3 * row["max_s"],
            "peak_mem_mb": row["peak_mem_mb"], "status": "pass", "reason": ""}


def benchmark_section(opts, device, budget, configs):
    from utils.runtime import keep_freed_memory
    keep_freed_memory()   # as utils.benchmark and the scripts do
    torch.backends.cudnn.benchmark = True   # as the scripts train on CUDA
    items = []
    for flag, task, method, route in configs:
        item = {"method": method, "task": task, "flags": flag, "meta_grad": route or "", "device": device_name(device)}
        items.append(dict(item, **guarded(budget, lambda: benchmark_one(opts, device, flag, task, method, route))))
    return items


# ============================================================================ reports

def section(items):
    """fail: a check failed; pass: something passed (a part may be skipped); skipped: nothing ran in time."""
    statuses = {item["status"] for item in items}
    status = ("fail" if "fail" in statuses else "pass" if "pass" in statuses else
              "skipped" if items else "nothing selected")
    return {"status": status, "items": items}


def verdict(sections):
    """PASS only if no check failed and no check section was skipped whole; else FAIL and why."""
    checks = {key: sec for key, sec in sections.items() if key in CHECK_SECTIONS}
    failed = [key for key, sec in checks.items() if sec["status"] == "fail"]
    skipped = [key for key, sec in checks.items() if sec["status"] == "skipped"]
    if failed:
        return "FAIL", f"failed: {', '.join(failed)}"
    if skipped:
        return "FAIL", f"not reached within the time budget: {', '.join(skipped)}"
    return "PASS", ""


def fmt(value, spec=".3g"):
    return "–" if value is None else format(value, spec)


def markdown(report):
    lines = [f"# GPU check: {report['overall']}", "",
             f"`python -m utils.gpucheck {report['argv']}` on {report['sections']['environment']['info']['device']}; "
             f"{report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget.", ""]
    for key, render in (("environment", environment_table), ("runs", runs_table), ("exactness", exactness_table),
                        ("resume", resume_table), ("benchmark", benchmark_table)):
        if key in report["sections"]:
            lines += [f"## {SECTION_TITLES[key]}", "", *render(report["sections"][key]), ""]
    why = f" ({report['overall_reason']})" if report["overall_reason"] else ""
    checks = [item for key in CHECK_SECTIONS for item in report["sections"].get(key, {}).get("items", [])]
    timings = report["sections"].get("benchmark", {}).get("items", [])
    lines.append(f"**Overall: {report['overall']}**{why}: checks {status_counts(checks)}"
                 + (f"; benchmark configurations {status_counts(timings)}" if timings else ""))
    return "\n".join(lines) + "\n"


def status_counts(items):
    return ", ".join(f"{sum(i['status'] == s for i in items)} {word}"
                     for s, word in (("pass", "passed"), ("fail", "failed"), ("skipped", "skipped")))


def table(header, rows):
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"   # a reason may hold a |
    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def environment_table(sec):
    return table(["item", "value"], sec["info"].items())


def runs_table(sec):
    return table(["run", "flags", "exit", "wall s", "result", "reason"],
                 [(i["name"], " ".join(i["flags"]), fmt(i["exit_status"], "d"), fmt(i["wall_s"], ".1f"),
                   i["status"].upper(), i["reason"]) for i in sec["items"]])


def exactness_table(sec):
    return table(["check", "task", "method", "value", "bound", "result", "reason"],
                 [(i["check"], i["task"], i["method"], fmt(i.get("value")), fmt(i.get("bound"), "g"),
                   i["status"].upper(), i["reason"]) for i in sec["items"]])


def resume_table(sec):
    rule = (f"Rule: resumed ≤ max({RESUME_FACTOR} × repeat, {RESUME_FLOOR:g}), where "
            "resumed = |resumed − straight| and repeat = |repeat − straight|, each the largest relative "
            "difference of the final student tensors (checkpoint.pth.tar; parameters whose gradient is rounding "
            "noise left out) or of the logged losses "
            "(beyond log.txt's last decimal). GPU runs are not bit-reproducible (cudnn.benchmark picks algorithms "
            "per process, backward kernels use atomics), so a second straight run measures the noise a correct "
            "resume may show; a broken resume (RNG, optimizer or EMA state) differs far more.")
    rows = []
    for i in sec["items"]:
        w, l = i.get("weights", {}), i.get("losses", {})
        rows.append((i["name"], fmt(w.get("resumed_vs_straight")), fmt(w.get("repeat_vs_straight")),
                     fmt(w.get("tolerance")), fmt(l.get("resumed_vs_straight")), fmt(l.get("repeat_vs_straight")),
                     fmt(l.get("tolerance")), i["status"].upper(), i["reason"]))
    return [rule, "", *table(["run", "weights resumed", "weights repeat", "weights tol.", "losses resumed",
                              "losses repeat", "losses tol.", "result", "reason"], rows)]


def benchmark_table(sec):
    device = sec["items"][0]["device"] if sec["items"] else ""
    return [f"Device: {device}.", "", *table(
        ["method", "task", "flags", "meta-grad", "median ms", "min ms", "peak MB", "result", "reason"],
        [(i["method"], i["task"], i["flags"], i["meta_grad"], fmt(i.get("median_ms"), ".1f"),
          fmt(i.get("min_ms"), ".1f"), fmt(i.get("peak_mem_mb"), ".0f"), i["status"].upper(), i["reason"])
         for i in sec["items"]])]


def write_reports(out, report):
    (out / "gpucheck.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "gpucheck.md").write_text(text)
    return text


# ============================================================================ main

def usage_error(opts):
    """A reason not to start, or None. Nothing is written before these checks."""
    try:
        device = torch.device(opts.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu"):
        return f"--device {opts.device}: give cuda, cuda:N or cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine (pass --device cpu to run the same checks on the CPU)"
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return f"--out {opts.out} exists and is not an empty folder; choose another"
    return None


def progress(budget, stage, items):
    if items:
        print(f"[{budget.elapsed():5.0f} s] {stage}: {status_counts(items)}", flush=True)


def run_checks(opts, device, budget, out):
    """The checks in order of importance and cost — --compile, the slowest and least predictable, last —
    so that an exhausted budget costs the least; returns {section: result} in the report's order."""
    wanted = set(opts.sections)
    data = generate_data(out / "data", opts.tasks, opts.batch_size) if wanted & {"runs", "resume"} else {}
    scripts = Scripts(opts, device, data, out)
    plain = default_runs(scripts, opts) if "runs" in wanted else []
    flagged = speed_runs(scripts, opts) if "runs" in wanted else []
    groups = resume_groups(scripts, opts) if "resume" in wanted else []
    timed = list(benchmark_configs(opts)) if "benchmark" in wanted else []
    sections = {"environment": environment(device)}
    # The resume check's first runs share a pool with the default-flag runs: they fill the slots that the
    # last of those leave free.
    judged = scripts.run_and_judge(plain + [job for group in groups for job in group.values()], budget)
    progress(budget, "runs at default flags", [judged[job.name] for job in plain])
    if "exactness" in wanted:
        sections["exactness"] = section(exactness_section(opts, device, budget))
        progress(budget, "exactness", sections["exactness"]["items"])
    if "resume" in wanted:
        sections["resume"] = section(finish_resume(groups, judged, scripts, budget))
        progress(budget, "resume", sections["resume"]["items"])
    judged.update(scripts.run_and_judge([job for job in flagged if not compiles(job.flags)], budget))
    timings = benchmark_section(opts, device, budget, [config for config in timed if not compiles(config[0])])
    progress(budget, "runs with speed flags and benchmark, without --compile",
             [judged[job.name] for job in flagged if not compiles(job.flags)] + timings)
    judged.update(scripts.run_and_judge([job for job in flagged if compiles(job.flags)], budget))
    timings += benchmark_section(opts, device, budget, [config for config in timed if compiles(config[0])])
    progress(budget, "--compile", [judged[job.name] for job in flagged if compiles(job.flags)]
             + [item for item in timings if compiles(item["flags"])])
    if "runs" in wanted:
        sections["runs"] = section([judged[job.name] for job in plain + flagged])
    if "benchmark" in wanted:
        sections["benchmark"] = section(timings)
    return {key: sections[key] for key in ("environment", *SECTIONS) if key in sections}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    problem = usage_error(opts)
    if problem:
        fail(problem)
    device = torch.device(opts.device)
    budget = Budget(opts.budget)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = run_checks(opts, device, budget, out)
    result, reason = verdict(sections)
    report = {"overall": result, "overall_reason": reason, "argv": shlex.join(argv), "settings": vars(opts),
              "budget_s": opts.budget, "elapsed_s": round(budget.elapsed(), 1), "sections": sections}
    print(write_reports(out, report), end="")
    sys.exit(0 if report["overall"] == "PASS" else 1)


if __name__ == "__main__":
    main()
