"""Time one real training iteration of every method on every task (README "Speed").

    python -m utils.benchmark                       # all methods × tasks, paper batch sizes, this device
    python -m utils.benchmark --methods MT L2I-O --tasks cifar10 --threads 2 --iters 10 --json bench.json

Each configuration builds its script's own networks (``build``) and runs its own ``train_step`` on random
inputs shaped like the task's batches (what the loaders would deliver). Configurations are timed in interleaved rounds — one
iteration of each per round, after warm-up rounds — so every round's ratio to MT compares iterations
taken under the same machine conditions; ``ratio_to_mt`` is the median of those per-round ratios.
On CUDA the clock is read after ``torch.cuda.synchronize()``.
"""
import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from utils.defaults import METHODS
from utils.options import SPEED_FLAGS, finalize
from utils.runtime import configure_backends, keep_freed_memory, warn_if_slow_bf16
from utils.schedules import unsup_weight
from utils.scripts import load_script, script_methods
from utils.tasks import TASKS, Batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=script_methods(),
                   help="the scripts to time (default the six; a copied script such as train-MYVAR.py is MYVAR)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per configuration (≥ 10 advised)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch-size", type=int, help="override the paper's batch size (64 CIFAR-10, 128 AFLW)")
    p.add_argument("--meta-grad", nargs="+", default=["exact"], choices=("exact", "unroll"),
                   help="L2I meta-gradient computations to time")
    p.add_argument("--amp", action="store_true", help="time with the scripts' --amp (bf16 autocast)")
    p.add_argument("--channels-last", action="store_true", help="time with --channels-last")
    p.add_argument("--compile", action="store_true", help="time with --compile (torch.compile)")
    p.add_argument("--tf32", action="store_true", help="time with --tf32 (TF32 matmuls and convolutions on CUDA)")
    p.add_argument("--json", help="also write the table as JSON to this file")
    return p.parse_args(argv)


def make_config(method, task_name, device, script_argv):
    """``(train_step, setup)``: a script's networks and optimizer for ``task_name`` on ``device`` (its ``build``),
    and ``train_step(setup, batch)`` running one of its iterations on them as its training loop does.
    ``setup`` holds what the script built (``student``, ``optimizer``, …), the task, the options, the device
    and the loop's counters ``epoch``, ``iteration`` and ``step`` (which give λ_u's ramp-up)."""
    module = load_script(method)
    args = finalize(module.parse_args(["--dataset", task_name] + script_argv), module.METHOD, task_name)
    task = TASKS[task_name]()
    task.mean, task.std = torch.full((10,), 30.0, device=device), torch.full((10,), 8.0, device=device)
    setup = SimpleNamespace(**vars(module.build(args, task, device)), task=task, args=args, device=device,
                            epoch=0, iteration=0, step=0)
    setup.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)

    def train_step(setup, batch):
        weight = unsup_weight(setup.task, setup.args, setup.epoch, setup.iteration, setup.step)
        return module.train_step(setup, batch, setup.task, setup.args, weight, setup.step)
    return train_step, setup


def random_batch(setup, dtype=torch.float32):
    """A batch as the loaders deliver it, moved to the device (random values, real shapes and types).
    The values are drawn in float32 whatever ``dtype``, so a float64 batch holds the float32 one's values."""
    n, device = setup.args.batch_size, setup.device
    if setup.task.name == "cifar10":
        def images():
            return torch.randn(n, 3, 32, 32, device=device)

        def labels():
            return F.one_hot(torch.randint(0, 10, (n,), device=device), 10).float()
        batch = Batch(x_l=images(), y_l=labels(), u1=images(), u2=images(), x_m=images(), y_m=labels())
    else:
        def images():
            return torch.rand(n, 1, 60, 60, device=device)
        shift = tuple(torch.randint(-4, 5, (n,), device=device) for _ in range(4))
        batch = Batch(x_l=images(), y_l=torch.randn(n, 10, device=device), u1=images(), u2=images(), shift=shift,
                      x_m=images(), y_m=torch.randn(n, 10, device=device))
    return dataclasses.replace(batch, **{field.name: value.to(dtype) for field in dataclasses.fields(batch)
                                         if torch.is_tensor(value := getattr(batch, field.name))
                                         and value.is_floating_point()})


def timed_iteration(train_step, setup, batch):
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    start = time.perf_counter()
    with setup.autocast():  # as the scripts' loops run it
        train_step(setup, batch)
    if setup.device.type == "cuda":
        torch.cuda.synchronize(setup.device)
    setup.step += 1
    return time.perf_counter() - start


def configurations(opts):
    """(method, task, meta-grad) for every combination the scripts support."""
    modules = {method: load_script(method) for method in opts.methods}
    for task in opts.tasks:
        for method, module in modules.items():
            if task not in module.DATASETS:
                continue
            grads = opts.meta_grad if module.BASED_ON.startswith("L2I") else [None]
            for grad in grads:
                yield method, task, grad


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far (Linux: KiB)


def benchmark(opts):
    device = torch.device(opts.device)
    script_argv = ["--gpu", "cpu" if device.type == "cpu" else str(device.index or 0)]
    if opts.batch_size:
        script_argv += ["--batch-size", str(opts.batch_size)]
    speed_flags = [f"--{f.replace('_', '-')}" for f in SPEED_FLAGS if getattr(opts, f, False)]
    script_argv += speed_flags
    configs = {}
    for method, task, grad in configurations(opts):
        extra = ["--meta-grad", grad] if grad else []
        train_step, setup = make_config(method, task, device, script_argv + extra)
        configs[(method, task, grad)] = (train_step, setup, random_batch(setup))
    times = {key: [] for key in configs}
    peaks = {}
    for round_index in range(opts.warmup + opts.iters):
        for key, (train_step, setup, batch) in configs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed_iteration(train_step, setup, batch)
            if round_index >= opts.warmup:
                times[key].append(seconds)
                peaks[key] = max(peaks.get(key, 0.0), peak_memory_mb(device))
    return table_rows(times, peaks, [f.lstrip("-") for f in speed_flags])


def table_rows(times, peaks, speed_flags):
    """One row per configuration: median, min, max, peak memory and the median per-round ratio to MT."""
    rows = []
    for (method, task, grad), samples in times.items():
        mt = times.get(("MT", task, None))
        ratios = [a / b for a, b in zip(samples, mt)] if mt else []
        flags = speed_flags + ([f"meta-grad={grad}"] if grad else [])
        rows.append({"method": method, "task": task, "flags": flags,
                     "median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
                     "peak_mem_mb": peaks[(method, task, grad)],
                     "ratio_to_mt": statistics.median(ratios) if ratios else None})
    return rows


def print_table(rows, out=None):
    out = out or sys.stdout  # looked up now, so redirection of stdout is honoured
    print("| method | task | flags | median s | min s | max s | peak MB | × MT |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        ratio = "–" if r["ratio_to_mt"] is None else f"{r['ratio_to_mt']:.2f}"
        print(f"| {r['method']} | {r['task']} | {' '.join(r['flags'])} | {r['median_s']:.3f} | {r['min_s']:.3f} | "
              f"{r['max_s']:.3f} | {r['peak_mem_mb']:.0f} | {ratio} |", file=out)


def main(argv=None):
    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    keep_freed_memory()  # as the training scripts do
    device = torch.device(opts.device)
    configure_backends(device, opts.tf32)  # the backend settings the scripts train with
    if opts.amp:
        warn_if_slow_bf16(device)
    torch.manual_seed(0)
    rows = benchmark(opts)
    threads = torch.get_num_threads()
    print(f"device {opts.device}, {threads} thread{'' if threads == 1 else 's'}, torch {torch.__version__}, "
          f"{opts.iters} timed iteration{'' if opts.iters == 1 else 's'} after {opts.warmup} "
          f"warm-up round{'' if opts.warmup == 1 else 's'}")
    print_table(rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
