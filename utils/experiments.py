"""The paper's experiment grid as command lines (SPEC §C.3, §G.2), one run folder each.

    python -m utils.experiments                       # print: one command per line (e.g. a cluster array job)
    python -m utils.experiments --seeds 0 1 2 --filter aflw
    python -m utils.experiments --run --gpu 0         # run them one after another, resumably

CIFAR-10: MT, MM, L2I-O, L2I-L at 250 … 4000 labels; AFLW: SL on all labels, and SL, PL, MT, L2I-O,
L2I-L at 1 … 20 % labels. ``--run`` skips runs whose folder holds ``summary.json`` and resumes those
with a checkpoint, so re-issuing it after an interruption continues where it stopped.
"""
import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The run-folder files (utils.checkpoint, utils.training), named here so that printing commands needs no torch.
CHECKPOINT, SUMMARY = "checkpoint.pth.tar", "summary.json"
CIFAR10_METHODS, CIFAR10_LABELS = ("MT", "MM", "L2I-O", "L2I-L"), (250, 500, 1000, 2000, 4000)
AFLW_METHODS, AFLW_FRACTIONS = ("SL", "PL", "MT", "L2I-O", "L2I-L"), (0.01, 0.05, 0.1, 0.2)
INTERRUPTED = 130  # a training script's exit status after Ctrl-C (its checkpoint is kept)


@dataclass
class Experiment:
    method: str
    n_labeled: float
    seed: int
    out: str

    @property
    def script(self):
        return f"train-{self.method}.py"

    def command(self, gpu, python="python", script_dir=""):
        return [python, os.path.join(script_dir, self.script), "--gpu", gpu, "--n-labeled", f"{self.n_labeled:g}",
                "--manualSeed", str(self.seed), "--out", self.out]

    def resume_command(self, gpu, python, script_dir):
        return [python, os.path.join(script_dir, self.script), "--resume", self.out, "--gpu", gpu]


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


def run_all(experiments, gpu, runner=run_child):
    """Train each experiment in turn; returns the number that failed.

    ``runner`` takes an argument list and returns an exit status (tests pass a fake).
    """
    failed = 0
    for e in experiments:
        if os.path.isfile(os.path.join(e.out, SUMMARY)):
            print(f"done already: {e.out}", flush=True)
            continue
        resume = os.path.isfile(os.path.join(e.out, CHECKPOINT))
        command = (e.resume_command if resume else e.command)(gpu, sys.executable, REPO)
        print(f"{'resuming' if resume else 'starting'}: {shlex.join(command)}", flush=True)
        status = runner(command)
        if status == INTERRUPTED:
            print(f"interrupted; run the same command again to continue with {e.out}", file=sys.stderr)
            return failed + 1
        if status != 0:
            print(f"failed (exit status {status}): {e.out}", file=sys.stderr)
            failed += 1
    return failed


def main(argv=None, runner=run_child):
    p = argparse.ArgumentParser(description="The paper's experiment grid as training commands.")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--print", action="store_true", help="print one command per line (the default)")
    action.add_argument("--run", action="store_true", help="run the commands one after another")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="values of --manualSeed (default 0)")
    p.add_argument("--gpu", default="0", help="--gpu for every command (default 0)")
    p.add_argument("--filter", metavar="SUBSTRING", help="only commands containing SUBSTRING, e.g. aflw or L2I-O")
    p.add_argument("--root", default="runs", help="folder holding the run folders (default runs)")
    args = p.parse_args(argv)
    experiments = select(grid(args.seeds, args.root), args.gpu, args.filter)
    if not args.run:
        try:
            print("\n".join(shlex.join(e.command(args.gpu)) for e in experiments), flush=True)
        except BrokenPipeError:  # a reader such as `head` stopped early: not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    failed = run_all(experiments, args.gpu, runner)
    if failed:
        print(f"{failed} of {len(experiments)} runs did not finish", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
