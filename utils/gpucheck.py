"""Check and time this repository on a CUDA machine in one command (README "Speed on a GPU").

    python -m utils.gpucheck --out gpucheck

1. ``python -m pytest tests --device cuda -q -rfEs``: the device-relevant tests (tests/test_device.py) on the GPU:
   every script end to end, exact vs unroll in float64, resume within the device's run-to-run noise, the speed
   flags end to end, and the meta-gradients under --compile and --amp.
2. ``python -m utils.benchmark`` for MT, L2I-O and L2I-L on CIFAR-10 and AFLW at the paper's batch sizes with
   ``--meta-grad exact unroll``, in fp32, with ``--amp --channels-last``, with ``--tf32`` and with ``--compile``
   (exact only: compiled autograd has no double backward; one run per task, AFLW's first).
Writes OUT/gpucheck.md, OUT/gpucheck.json and each step's log; exits 0 if every step passed, else 1; without
CUDA 2, with one line on stderr (``--device cpu`` runs the steps here; the tests do so at tiny sizes).

Time, bounded by construction: each step is a subprocess with a timeout, its cap but never past the deadline
(--total 450 s = 7.5 min; the wrapper adds seconds); a step then still running is killed with its process group
and reported timed out. Estimate on one H100/H200 with 16 CPU cores: pytest ~2-3 min (cap 210 s): 27 script runs
of ~10-20 s (interpreter and CUDA start-up; 8 at a time) beside ~1-2 min in-process (compiling WRN-28-2 and
TCDCNN); each benchmark without --compile ~30 s (cap 40 s): ~15 s start-up, 10 configurations × 12 iterations of
≤ 0.1 s; --compile ~30 s on AFLW (40 s), ~1 min on CIFAR-10 (80 s). Expected ~5 min in all.
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from utils.options import fail

REPO = Path(__file__).resolve().parents[1]
# name: (utils.benchmark flags, cap in seconds); "compile-TASK" times that task only, and "exact" only.
BENCHMARKS = {"fp32": ([], 40), "amp+channels-last": (["--amp", "--channels-last"], 40), "tf32": (["--tf32"], 40),
              "compile-aflw": (["--compile"], 40), "compile-cifar10": (["--compile"], 80)}
NEEDED = ("pytest", "tensorboard", "tensorboardX", "progress", "scipy", "PIL")   # requirements.txt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="report folder (new or empty)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--pytest-args", default="tests", help="what pytest runs (default: tests)")
    p.add_argument("--methods", nargs="+", default=["MT", "L2I-O", "L2I-L"])
    p.add_argument("--tasks", nargs="+", default=["cifar10", "aflw"])
    p.add_argument("--batch-size", type=int, help="benchmark batch size (default the paper's: 64 CIFAR-10, 128 AFLW)")
    p.add_argument("--iters", type=int, default=10, help="timed benchmark iterations per configuration")
    p.add_argument("--benchmarks", nargs="*", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    p.add_argument("--total", type=float, default=450, help="seconds for the whole check (default 450)")
    p.add_argument("--pytest-timeout", type=float, default=210, help="cap of the pytest run (default 210)")
    p.add_argument("--benchmark-timeout", type=float, help="cap of every benchmark run (default: its own)")
    return p.parse_args(argv)


def run_step(name, command, log, timeout):
    """Run ``command`` (output to ``log``) for at most ``timeout`` s; then kill its process group."""
    step = {"name": name, "command": shlex.join(["python", *command[1:]]), "log": log.name, "timeout_s": timeout}
    if timeout <= 0:
        return dict(step, status="not run: no time left", returncode=None, wall_s=0.0)
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    status = f"timed out after {timeout:g} s" if code is None else "passed" if code == 0 else f"failed (exit {code})"
    return dict(step, status=status, returncode=code, wall_s=round(time.monotonic() - started, 1))


def pytest_outcome(log):
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    counts = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b|"
                                                               r"no tests ran", line)]
    return {"summary": counts[-1] if counts else None,
            "short": [line for line in lines if line.startswith(("FAILED ", "ERROR ", "SKIPPED "))]}


def markdown(report):
    tests, steps = report["steps"][0], report["steps"]
    lines = [f"# GPU check: {'PASS' if report['passed'] else 'FAIL'}", "",
             f"{report['device']}; torch {report['torch']} (CUDA {report['cuda']}), Python {report['python']}; "
             f"{report['elapsed_s']:.0f} s of {report['total_s']:.0f} s.", "",
             "| step | status | wall s | command |", "|---|---|---|---|",
             *(f"| {s['name']} | {s['status']} | {s['wall_s']:.0f} | `{s['command']}` |" for s in steps), "",
             "## Tests", "", f"**{tests['summary'] or 'no pytest summary: ' + tests['status']}**", "",
             *(f"* {line}" for line in tests["short"]), "",
             "## Benchmark (one training iteration)", "",
             "| method | task | flags | median ms | min ms | max ms | peak MB | × MT | × fp32 |", "|" + "---|" * 9]
    fp32 = {(r["method"], r["task"], tuple(r["flags"])): r["median_s"] for s in steps if s["name"] == "benchmark-fp32"
            for r in s["rows"]}
    for r in (row for s in steps[1:] for row in s["rows"]):
        base = fp32.get((r["method"], r["task"], tuple(f for f in r["flags"] if f.startswith("meta-grad="))))
        ratios = " | ".join(f"{v:.2f}" if v else "–" for v in (r["ratio_to_mt"], base and r["median_s"] / base))
        lines.append(f"| {r['method']} | {r['task']} | {' '.join(r['flags'])} | {1e3 * r['median_s']:.1f} | "
                     f"{1e3 * r['min_s']:.1f} | {1e3 * r['max_s']:.1f} | {r['peak_mem_mb']:.0f} | {ratios} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    opts = parse_args(argv)
    if missing := [name for name in NEEDED if importlib.util.find_spec(name) is None]:
        fail(f"missing Python packages: {', '.join(missing)} (python -m pip install -r requirements.txt)")
    import torch
    if opts.device == "cuda" and not torch.cuda.is_available():
        fail("CUDA is not available on this machine: utils.gpucheck checks a CUDA machine (--device cpu runs it here)")
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"--out {opts.out} exists and is not an empty folder; choose another")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def step(name, command, cap):   # never past the deadline
        done = run_step(name, command, out / f"{name}.log", round(min(cap, opts.total - time.monotonic() + started), 1))
        print(f"[{time.monotonic() - started:4.0f} s] {name}: {done['status']}", flush=True)
        return done
    steps = [step("pytest", [sys.executable, "-m", "pytest", *shlex.split(opts.pytest_args), "--device", opts.device,
                             "-q", "-rfEs", "-p", "no:cacheprovider"], opts.pytest_timeout)]
    steps[0].update(pytest_outcome(out / "pytest.log"))
    for name in opts.benchmarks:
        flags, cap = BENCHMARKS[name]
        tasks = [t for t in opts.tasks if not name.startswith("compile-") or name == f"compile-{t}"]
        result = out / f"benchmark-{name}.json"
        if tasks:
            done = step(f"benchmark-{name}", [
                sys.executable, "-m", "utils.benchmark", "--device", opts.device, "--methods", *opts.methods,
                "--tasks", *tasks, "--meta-grad", *(["exact"] if "--compile" in flags else ["exact", "unroll"]),
                "--iters", str(opts.iters), *(["--batch-size", str(opts.batch_size)] if opts.batch_size else []),
                *flags, "--json", str(result)], opts.benchmark_timeout or cap)
            steps.append(dict(done, rows=json.loads(result.read_text()) if done["returncode"] == 0 else []))
    report = {"passed": all(s["returncode"] == 0 for s in steps), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if opts.device == "cuda" else f"CPU ({os.cpu_count()} cores)",
              "cuda": torch.version.cuda, "python": platform.python_version(), "total_s": opts.total,
              "elapsed_s": round(time.monotonic() - started, 1), "steps": steps}
    (out / "gpucheck.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpucheck.md").write_text(markdown(report))
    print(markdown(report), end="")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
