"""The paper's experiment grid as command lines (docs/defaults.md §3), one run folder each.

    python -m utils.experiments                       # print: one command per line (e.g. a cluster array job)
    python -m utils.experiments --seeds 0 1 2 --filter aflw --data-root /data/aflw_release-2
    python -m utils.experiments --run --gpu 0         # run them one after another, resumably
    python -m utils.experiments --seeds 0 1 2 --slurm grid.sbatch   # a Slurm array job, one task per command

CIFAR-10: MT, MM, L2I-O, L2I-L at 250 … 4000 labels; AFLW: SL on all labels, and SL, PL, MT, L2I-O,
L2I-L at 1 … 20 % labels. Options this tool does not know (``--data-root DIR``, ``--workers 4``,
``--amp`` ...) are passed to every training command. ``--run`` skips runs whose folder holds
``summary.json`` and resumes those with a checkpoint, so re-issuing it after an interruption continues
where it stopped; each task of the ``--slurm`` script runs its command the same way, so a requeued or
re-submitted task resumes its own run folder.
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from utils.folder import CHECKPOINT, SUMMARY
from utils.options import fail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_METHODS, CIFAR10_LABELS = ("MT", "MM", "L2I-O", "L2I-L"), (250, 500, 1000, 2000, 4000)
AFLW_METHODS, AFLW_FRACTIONS = ("SL", "PL", "MT", "L2I-O", "L2I-L"), (0.01, 0.05, 0.1, 0.2)
INTERRUPTED = 130  # a training script's exit status after Ctrl-C (its checkpoint is kept)
# Training options the grid sets for each run: passed again, they would take over every run of the grid.
GRID_OPTIONS = ("--n-labeled", "--dataset", "--manualSeed", "--out", "--resume")
SLURM_LOGS = "slurm"  # folder under the runs root for the array tasks' output


@dataclass
class Experiment:
    method: str
    n_labeled: float
    seed: int
    out: str

    @property
    def script(self):
        return f"train-{self.method}.py"

    def command(self, gpu, extra=(), python="python", script_dir=""):
        return [python, os.path.join(script_dir, self.script), "--gpu", gpu, "--n-labeled", f"{self.n_labeled:g}",
                "--manualSeed", str(self.seed), "--out", self.out, *extra]

    def resume_command(self, gpu, extra, python, script_dir):
        return [python, os.path.join(script_dir, self.script), "--resume", self.out, "--gpu", gpu, *extra]


def run_name(dataset, method, n_labeled, seed):
    """The paper's folder names (``cifar10L2IO@250``) with the seed appended."""
    return f"{dataset}{method.replace('-', '')}@{n_labeled:g}-s{seed}"


def grid(seeds, root="runs"):
    """Seed-major, so a sequential ``--run`` has every setting's first seed before any second one."""
    settings = [("cifar10", m, n) for m in CIFAR10_METHODS for n in CIFAR10_LABELS]
    settings += [("aflw", "SL", -1)]  # all labels: one run per seed, independent of the fraction
    settings += [("aflw", m, f) for m in AFLW_METHODS for f in AFLW_FRACTIONS]
    return [Experiment(method, n, seed, os.path.join(root, run_name(dataset, method, n, seed)))
            for seed in seeds for dataset, method, n in settings]


def select(experiments, gpu, substring):
    """The experiments whose command contains ``substring``; the options passed through are left out of
    the match, so ``--filter aflw --data-root /data/aflw_release-2`` still keeps only AFLW runs."""
    return [e for e in experiments if substring is None or substring in shlex.join(e.command(gpu))]


def run_child(command):
    """Run one training script and return its exit status.

    Ctrl-C reaches the script too (same process group); it stops cleanly with status 130, so the runner
    waits for that instead of killing it. A second Ctrl-C aborts the wait.
    """
    child = subprocess.Popen(command)
    try:
        return child.wait()
    except KeyboardInterrupt:
        return child.wait()


def run_all(experiments, gpu, runner=run_child, extra=()):
    """Train each experiment in turn; returns the number that failed.

    ``runner`` takes an argument list and returns an exit status (tests pass a fake).
    """
    failed = 0
    for e in experiments:
        if os.path.isfile(os.path.join(e.out, SUMMARY)):
            print(f"done already: {e.out}", flush=True)
            continue
        resume = os.path.isfile(os.path.join(e.out, CHECKPOINT))
        command = (e.resume_command if resume else e.command)(gpu, extra, sys.executable, REPO)
        print(f"{'resuming' if resume else 'starting'}: {shlex.join(command)}", flush=True)
        status = runner(command)
        if status == INTERRUPTED:
            print(f"interrupted; run the same command again to continue with {e.out}", file=sys.stderr)
            return failed + 1
        if status != 0:
            print(f"failed (exit status {status}): {e.out}", file=sys.stderr)
            failed += 1
    return failed


def slurm_script(path, count, task_options, log_dir):
    """A Slurm array job whose task i runs the i-th of ``count`` commands through ``--run``."""
    run_task = (f'{shlex.quote(sys.executable)} -m utils.experiments --run --array-task "$SLURM_ARRAY_TASK_ID" '
                f"{shlex.join(task_options)}")
    return f"""#!/bin/bash
# The experiment grid as a Slurm array job: task i trains the i-th of the {count} commands that
#   python -m utils.experiments {shlex.join(task_options)}
# prints. Each task skips a finished run and resumes an interrupted one from its checkpoint, so a
# requeued task continues its own run, and submitting this file again finishes what is left.
# Edit the #SBATCH lines for your cluster, then submit with: sbatch {shlex.quote(path)}
#SBATCH --job-name=l2i-grid
# One task per command; --array=1-{count}%8 would run at most 8 at a time.
#SBATCH --array=1-{count}
# One GPU per run; the task sees it as device 0.
#SBATCH --gres=gpu:1
# Data-loader workers: AFLW's default is 8 (16 for PL and MT); CIFAR-10's is 0.
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
# A paper-length CIFAR-10 run takes days; a task stopped by the limit resumes when the file is submitted again.
#SBATCH --time=2-00:00:00
# Requeue a task whose node fails or that is preempted; it resumes from its last finished epoch.
#SBATCH --requeue
# %A: the array job's id, %a: the task's index.
#SBATCH --output={log_dir}/%A_%a.out
set -euo pipefail
cd {shlex.quote(REPO)}
{run_task}
"""


def write_slurm(path, count, args, extra):
    """Write the array script (and the folder for its logs) and say how to submit it."""
    root = os.path.abspath(args.root)  # the task starts in the repository, maybe not where this runs
    task_options = ["--seeds", *map(str, args.seeds), "--gpu", args.gpu, "--root", root,
                    *(["--filter", args.filter] if args.filter else []), *extra]
    log_dir = os.path.join(root, SLURM_LOGS)
    try:
        with open(path, "w") as f:
            f.write(slurm_script(path, count, task_options, log_dir))
        os.makedirs(log_dir, exist_ok=True)  # Slurm does not create it: a task would fail before it starts
    except OSError as exc:
        fail(f"cannot write {exc.filename} ({exc.strerror})")
    print(f"wrote {path}: a Slurm array of {count} tasks, logs in {log_dir}/\nsubmit it with: "
          f"sbatch {shlex.quote(path)}")


def print_commands(experiments, gpu, extra):
    try:
        print("\n".join(shlex.join(e.command(gpu, extra)) for e in experiments), flush=True)
    except BrokenPipeError:  # a reader such as `head` stopped early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)  # without argparse's usage lines


def parse_args(argv):
    """This tool's options, and the training options to pass through to every command."""
    p = Parser(description="The paper's experiment grid as training commands. Options not listed here "
                           "(e.g. --data-root DIR --workers 4) are added to every training command.",
               allow_abbrev=False)  # an abbreviation would take a training option meant to pass through
    action = p.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print one command per line (the default)")
    action.add_argument("--run", action="store_true", help="run the commands one after another")
    action.add_argument("--slurm", metavar="FILE", help="write a Slurm array script, one task per command")
    p.add_argument("--array-task", type=int, metavar="I", help="with --run: only the I-th command (1-based)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="values of --manualSeed (default 0)")
    p.add_argument("--gpu", default="0", help="--gpu for every command (default 0)")
    p.add_argument("--filter", metavar="SUBSTRING", help="only commands containing SUBSTRING, e.g. aflw or L2I-O")
    p.add_argument("--root", default="runs", help="folder holding the run folders (default runs)")
    args, extra = p.parse_known_args(argv)
    if extra and not extra[0].startswith("-"):
        fail(f"unexpected argument {extra[0]!r}")
    for option in extra:
        if option.split("=")[0] in GRID_OPTIONS:
            fail(f"{option.split('=')[0]} is set by the grid for each run and cannot be passed through")
    if args.array_task is not None and not args.run:
        fail("--array-task needs --run")
    return args, extra


def main(argv=None, runner=run_child):
    args, extra = parse_args(argv)
    experiments = select(grid(args.seeds, args.root), args.gpu, args.filter)
    if not experiments:
        fail(f"no command of the grid contains --filter {args.filter!r}")
    if args.array_task is not None:
        if not 1 <= args.array_task <= len(experiments):
            fail(f"--array-task {args.array_task}: there are {len(experiments)} commands "
                       f"(1-{len(experiments)})")
        experiments = experiments[args.array_task - 1:args.array_task]
    if args.slurm:
        write_slurm(args.slurm, len(experiments), args, extra)
        return 0
    if not args.run:
        print_commands(experiments, args.gpu, extra)
        return 0
    failed = run_all(experiments, args.gpu, runner, extra)
    if failed:
        print(f"{failed} of {len(experiments)} runs did not finish", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
