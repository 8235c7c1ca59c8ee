"""The paper's experiment grid as command lines (docs/defaults.md §3), one run folder each.

    python -m utils.experiments                       # print: one command per line (e.g. a cluster array job)
    python -m utils.experiments --seeds 0 1 2 --filter aflw --data-root /data/aflw_release-2
    python -m utils.experiments --run --gpu 0         # run them one after another, resumably
    python -m utils.experiments --seeds 0 1 2 --slurm grid.sbatch   # a Slurm array job, one task per command

CIFAR-10: MT, MM, L2I-O, L2I-L at 250 … 4000 labels; AFLW: SL on all labels, and SL, PL, MT, L2I-O,
L2I-L at 1 … 20 % labels. Options this tool does not know (``--data-root DIR``, ``--workers 4``,
``--amp`` ...) are passed to every training command. ``--run`` skips runs whose folder holds
``summary.json``, resumes those with a checkpoint, and starts again those killed before their first
checkpoint (it removes the files the scripts write before it, and refuses a folder holding anything
else), so re-issuing it after an interruption continues where it stopped; each task of the ``--slurm``
script runs its command the same way, so a requeued or re-submitted task resumes its own run folder.
The script is written for the repository folder it is submitted from and the ``python`` of the
environment active when it is submitted, not for this machine's paths; a passed-through
``--workers N`` sets its ``--cpus-per-task``.
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from utils.folder import ARGS, CHECKPOINT, LOG, SPLIT, STATUS, SUMMARY
from utils.options import fail
from utils.results import plural

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_METHODS, CIFAR10_LABELS = ("MT", "MM", "L2I-O", "L2I-L"), (250, 500, 1000, 2000, 4000)
AFLW_METHODS, AFLW_FRACTIONS = ("SL", "PL", "MT", "L2I-O", "L2I-L"), (0.01, 0.05, 0.1, 0.2)
INTERRUPTED = 130  # a training script's exit status after Ctrl-C (its checkpoint is kept)
# Training options the grid sets for each run: passed again, they would take over every run of the grid.
GRID_OPTIONS = ("--n-labeled", "--dataset", "--manualSeed", "--out", "--resume")
SLURM_LOGS = "slurm"  # folder under the runs root for the array tasks' output
# Training data streams each iteration draws (the scripts' ``bookkeeping(..., streams=...)``): each is a
# DataLoader with its own --workers processes, alive together for the whole epoch.
TRAINING_LOADERS = {"SL": 1, "PL": 2, "MT": 2, "MM": 2, "L2I-O": 3, "L2I-L": 3}
DEFAULT_CPUS = 8  # --cpus-per-task without --workers: each loader's default worker count is capped at the CPUs
# What a training script writes into a new run folder before its first checkpoint
# (README "Monitoring and run folders"), with the temporary files of its atomic writes; tensorboard
# events start with EVENTS.
BEFORE_FIRST_CHECKPOINT = (ARGS, SPLIT, LOG, STATUS)
EVENTS = "events.out.tfevents."


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


def early_files(folder):
    """(the files of ``folder`` a training script writes before its first checkpoint, the first other entry
    or None): a run killed that early can only be started again, once they are removed."""
    early, other = [], None
    for name in sorted(os.listdir(folder)):
        base = name[:-len(".tmp")] if name.endswith(".tmp") else name
        if os.path.isfile(os.path.join(folder, name)) and (
                base in BEFORE_FIRST_CHECKPOINT or base.startswith(EVENTS) or name == f"{CHECKPOINT}.tmp"):
            early.append(name)
        elif other is None:
            other = name
    return early, other


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
        if not resume and os.path.isdir(e.out) and os.listdir(e.out):
            early, other = early_files(e.out)
            if other is not None:
                print(f"cannot start {e.out} again: it has no {CHECKPOINT} to resume, and it holds {other}, which "
                      f"a training script does not write before its first checkpoint; move the folder away",
                      file=sys.stderr)
                failed += 1
                continue
            for name in early:
                os.remove(os.path.join(e.out, name))
            print(f"{e.out} was stopped before its first checkpoint: removed {', '.join(early)} to start it again",
                  flush=True)
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


def passed_workers(extra):
    """The value of a passed-through ``--workers N`` (or ``--workers=N``), or None."""
    for i, option in enumerate(extra):
        value = option.split("=", 1)[1] if option.startswith("--workers=") else (
            extra[i + 1] if option == "--workers" and i + 1 < len(extra) else None)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return None  # the training script will say what is wrong with it
    return None


def cpu_lines(experiments, workers):
    """The ``#SBATCH --cpus-per-task`` line and the comment that explains its number."""
    if workers is None:
        return (f"# Data-loader workers: each loader takes its default (AFLW 8, 16 for PL and MT; CIFAR-10 4 on a\n"
                f"# GPU), capped at the CPUs the task has; pass --workers N to the tool to size this line.\n"
                f"#SBATCH --cpus-per-task={DEFAULT_CPUS}")
    loaders = max(TRAINING_LOADERS.get(e.method, 3) for e in experiments)
    methods = ", ".join(sorted({e.method for e in experiments if TRAINING_LOADERS.get(e.method, 3) == loaders}))
    return (f"# --workers {workers}: {workers} data-loader processes per training loader; {methods} draw"
            f"{'s' if ',' not in methods else ''} from {plural(loaders, 'loader')}\n"
            f"# at once (evaluation loaders run after the epoch's), plus the training process itself:\n"
            f"# {workers} x {loaders} + 1 = {workers * loaders + 1} CPUs.\n"
            f"#SBATCH --cpus-per-task={workers * loaders + 1}")


def slurm_script(path, count, task_options, log_dir, cpus):
    """A Slurm array job whose task i runs the i-th of ``count`` commands through ``--run``, in the
    repository folder it is submitted from, with the ``python`` of the environment it is submitted in."""
    run_task = f'python -m utils.experiments --run --array-task "$SLURM_ARRAY_TASK_ID" {shlex.join(task_options)}'
    name = os.path.basename(path)
    return f"""#!/bin/bash
# The experiment grid as a Slurm array job: task i trains the i-th of the {plural(count, 'command')} that
#   python -m utils.experiments {shlex.join(task_options)}
# prints. Each task skips a finished run and resumes an interrupted one from its checkpoint, so a
# requeued task continues its own run, and submitting this file again finishes what is left.
# Edit the #SBATCH lines for your cluster. Then, in the repository folder, activate the environment the
# training scripts run in (conda activate ..., source .venv/bin/activate) and submit: sbatch {name}
# (sbatch passes that environment, and so its `python`, to every task).
#SBATCH --job-name=l2i-grid
# One task per command; --array=1-{count}%8 would run at most 8 at a time.
#SBATCH --array=1-{count}
# One GPU per run; the task sees it as device 0.
#SBATCH --gres=gpu:1
{cpus}
#SBATCH --mem=32G
# A paper-length CIFAR-10 run takes days; a task stopped by the limit resumes when the file is submitted again.
#SBATCH --time=2-00:00:00
# Requeue a task whose node fails or that is preempted; it resumes from its last finished epoch.
#SBATCH --requeue
# %A: the array job's id, %a: the task's index; relative to the folder sbatch is run in, which must exist.
#SBATCH --output={log_dir}/%A_%a.out
set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"  # where sbatch was run: the repository folder
if [ ! -f train-MT.py ] || [ ! -f utils/experiments.py ]; then
    echo "error: $(pwd) is not the repository folder (no train-MT.py): submit {name} from there" >&2
    exit 2
fi
if ! command -v python >/dev/null; then
    echo "error: no python on PATH: activate the repository's environment, then submit {name} again" >&2
    exit 2
fi
{run_task}
"""


def repository_relative(path):
    """``path`` relative to the repository when it lies inside it (the script then works wherever the
    repository is), else absolute."""
    full = os.path.abspath(path)
    inside = os.path.commonpath([full, REPO]) == REPO
    return os.path.relpath(full, REPO) if inside else full


def write_slurm(path, experiments, args, extra):
    """Write the array script (and the folder for its logs) and say how to submit it."""
    root = repository_relative(args.root)  # the task starts in the repository, maybe not where this runs
    task_options = ["--seeds", *map(str, args.seeds), "--gpu", args.gpu, "--root", root,
                    *(["--filter", args.filter] if args.filter else []), *extra]
    log_dir = os.path.join(root, SLURM_LOGS)
    count = len(experiments)
    try:
        with open(path, "w") as f:
            f.write(slurm_script(path, count, task_options, log_dir, cpu_lines(experiments, passed_workers(extra))))
        os.makedirs(os.path.join(REPO, log_dir), exist_ok=True)  # Slurm does not create it: a task would fail
    except OSError as exc:
        fail(f"cannot write {exc.filename} ({exc.strerror})")
    here = os.path.abspath(os.curdir) == REPO
    submit = f"sbatch {shlex.quote(path if here else os.path.abspath(path))}"
    print(f"wrote {path}: a Slurm array of {plural(count, 'task')}, logs in {log_dir}/\n"
          f"submit it from the repository folder with its environment active: "
          f"{submit if here else f'cd {shlex.quote(REPO)} && {submit}'}")


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
            count = len(experiments)
            fail(f"--array-task {args.array_task}: there {'is' if count == 1 else 'are'} {plural(count, 'command')} "
                 f"(1-{count})")
        experiments = experiments[args.array_task - 1:args.array_task]
    if args.slurm:
        write_slurm(args.slurm, experiments, args, extra)
        return 0
    if not args.run:
        print_commands(experiments, args.gpu, extra)
        return 0
    failed = run_all(experiments, args.gpu, runner, extra)
    if failed:
        print(f"{failed} of {plural(len(experiments), 'run')} did not finish", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
