"""Tables over run folders: one row per run, then mean ± std over seeds.

    python -m utils.results                       # every run folder directly under runs/
    python -m utils.results runs/cifar10MT@250-s* runs/cifar10L2IO@250-s* [--csv results.csv]

Every protocol value (docs/evaluation.md §3) is computed from ``log.txt`` with the training scripts' own
``summarize`` (utils/evaluation.py), so a run still in progress is shown like a finished one; where ``summary.json`` exists
it must agree, and a disagreement is reported. Folders that cannot be read are named on stderr and
skipped. Runs are averaged only when every option that changes the experiment is the same
(``NOT_SETTINGS`` lists the ones that do not).
"""
import argparse
import csv
import glob
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from utils.evaluation import PROTOCOLS, summarize
from utils.folder import ARGS, CHECKPOINT, LOG, SUMMARY

RUN_MARKERS = (ARGS, LOG, SUMMARY, CHECKPOINT)  # any of them marks a folder as a run folder
DEFAULT_ROOT = "runs"  # where utils.experiments puts the grid's run folders
METHODS = ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L")  # table order
REQUIRED_ARGS = ("method", "dataset", "n_labeled", "manualSeed", "epochs", "val_iteration")
# log.txt holds 6 decimals, summary.json full floats: they agree within the rounding of the log.
LOG_TOLERANCE = 1e-6
CHECKED = ("method", "dataset", "n_labeled", "seed", "epochs", "best_epoch", "best_val", "test_at_best_val",
           "median_last20_test", "mean_last20_test")
# args.json keys that do not change what is trained, so runs differing only in them are repeats of one
# experiment: the seed (the table averages over it), where and on what a run executes, and bookkeeping
# the training engine records rather than an option. Keys whose value is a dict or list are bookkeeping
# too. Every other key, including ones a copied script adds, tells experiments apart.
NOT_SETTINGS = ("manualSeed", "out", "gpu", "workers", "no_progress", "resume", "versions", "git_commit", "command",
                "resumes", "started")
METRIC_NAMES = {"acc": "test accuracy (%)", "me": "test mean error (fraction of the inter-ocular distance)"}


class RunFolderError(Exception):
    """A folder that is not a readable run; the message says why."""


@dataclass
class RunRecord:
    path: str
    args: dict
    protocol: object           # the task's reporting protocol (utils.evaluation)
    rows: list                 # log.txt rows as {column name: value}
    values: dict               # summarize() over the log rows
    summary: Optional[dict]    # summary.json when present and readable
    note: str = ""             # short remark on summary.json for the status column

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def finished(self):
        return self.summary is not None

    @property
    def status(self):
        if self.finished:
            return f"finished ({self.note})" if self.note else "finished"
        done = f"{len(self.rows)}/{self.args['epochs']} epochs"
        return f"{done}, {self.note}" if self.note else f"in progress {done}"

    @property
    def wall_time_s(self):
        return self.summary.get("wall_time_s") if self.finished else None

    @property
    def settings(self):
        """The options that define the experiment, as {name: value} (see ``NOT_SETTINGS``)."""
        return {key: value for key, value in self.args.items()
                if key not in NOT_SETTINGS and not isinstance(value, (dict, list))}


# ----------------------------------------------------------------------------- reading one run folder

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as exc:
        raise RunFolderError(f"cannot read {os.path.basename(path)} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{os.path.basename(path)} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def read_log(path):
    """``log.txt`` as a list of {column: value}: a header, then one tab-terminated row per finished epoch."""
    try:
        with open(path) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as exc:
        raise RunFolderError(f"cannot read {LOG} ({exc.strerror})") from None
    if len(lines) < 2:
        raise RunFolderError(f"{LOG} has no finished epoch yet")
    columns = lines[0].rstrip("\t").split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            values = [float(v) for v in line.rstrip("\t").split("\t")]
        except ValueError:
            raise RunFolderError(f"{LOG} line {number} holds a value that is not a number") from None
        if len(values) != len(columns):
            raise RunFolderError(f"{LOG} line {number} has {len(values)} values for {len(columns)} columns")
        rows.append(dict(zip(columns, values)))
    return rows


def protocol_values(protocol, args, rows, wall_time):
    """The log rows as the training loop's history, through the scripts' own ``summarize``."""
    history = [{key: row[name] for name, key in protocol.columns if name in row} for row in rows]
    m = protocol.metric
    if not all(f"val_{m}" in h and f"test_{m}" in h for h in history):
        raise RunFolderError(f"{LOG} lacks the {args['dataset']} columns for validation and test {m}")
    run_args = SimpleNamespace(method=args["method"], dataset=args["dataset"], n_labeled=args["n_labeled"],
                               manualSeed=args["manualSeed"])
    return summarize(protocol, history, wall_time, run_args)


def disagreement(values, summary):
    """The first key on which summary.json and the values from log.txt differ, or None."""
    for key in CHECKED:
        mine, theirs = values[key], summary.get(key)
        if isinstance(mine, float) and isinstance(theirs, (int, float)):
            if not math.isclose(mine, theirs, rel_tol=0, abs_tol=LOG_TOLERANCE):
                return key
        elif mine != theirs:
            return key
    return None


def read_summary(path):
    """(summary or None, what is wrong with it or None); a damaged summary.json is not fatal when log.txt
    is fine."""
    if not os.path.exists(path):
        return None, None
    try:
        summary = read_json(path)
    except RunFolderError as exc:
        return None, str(exc)
    if not isinstance(summary, dict) or summary.get("finished") is not True:
        return None, f"{SUMMARY} does not record a finished run"
    return summary, None


def load_run(path):
    """The run in ``path``, and a remark for stderr about its summary.json (or None)."""
    args = read_json(os.path.join(path, ARGS))
    if not isinstance(args, dict) or any(key not in args for key in REQUIRED_ARGS):
        raise RunFolderError(f"{ARGS} lacks one of {', '.join(REQUIRED_ARGS)}")
    if args["dataset"] not in PROTOCOLS:
        raise RunFolderError(f"{ARGS} names an unknown dataset {args['dataset']!r}")
    protocol = PROTOCOLS[args["dataset"]]
    rows = read_log(os.path.join(path, LOG))
    summary, problem = read_summary(os.path.join(path, SUMMARY))
    values = protocol_values(protocol, args, rows, summary.get("wall_time_s") if summary else None)
    run = RunRecord(path=path, args=args, protocol=protocol, rows=rows, values=values, summary=summary)
    if problem:
        run.note = f"{SUMMARY} damaged"
        return run, f"{problem}; values from {LOG}"
    key = disagreement(values, summary) if summary else None
    if key:
        run.note = f"{SUMMARY} disagrees on {key}"
        return run, f"{SUMMARY} and {LOG} disagree on {key} ({summary.get(key)} vs {values[key]}); values from {LOG}"
    return run, None


def run_folders_under(root):
    """The folders directly under ``root`` holding a run file; others there (such as a Slurm log folder)
    are not runs and are passed over without a remark."""
    if not os.path.isdir(root):
        return []
    children = [os.path.join(root, name) for name in sorted(os.listdir(root))]
    return [path for path in children
            if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in RUN_MARKERS)]


def nothing_read(patterns):
    """The one-line reason for an empty table or figure."""
    if patterns:
        return "no run folder could be read"
    return f"no run folder could be read under {DEFAULT_ROOT}/; name run folders or glob patterns"


def expand(patterns):
    """Folders named on the command line; patterns the shell left unexpanded are globbed here."""
    folders = []
    for pattern in patterns:
        if os.path.exists(pattern):
            folders.append(pattern)
        elif any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
            if not matches:
                print(f"skipped {pattern}: no folder matches", file=sys.stderr)
            folders.extend(matches)
        else:
            print(f"skipped {pattern}: no such folder", file=sys.stderr)
    return folders


def load_runs(patterns):
    """Every readable run; each unreadable one is named on stderr with the reason."""
    runs = []
    for path in expand(patterns):
        try:
            run, remark = load_run(path)
        except RunFolderError as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            continue
        if remark:
            print(f"note on {path}: {remark}", file=sys.stderr)
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------- tables

def labels(n_labeled):
    return "all" if n_labeled == -1 else f"{n_labeled:g}"


def number(value, metric):
    return f"{value:.2f}" if metric == "acc" else f"{value:.4f}"


def wall_time(run):
    """H:MM:SS of a finished run; an unfinished one has no total yet."""
    if not run.finished:
        return "unknown" if run.note else "in progress"
    seconds = run.wall_time_s
    if not isinstance(seconds, (int, float)):
        return "unknown"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def markdown(header, rows):
    """A Markdown table padded to aligned columns, so it also reads well in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


def display_names(runs):
    """Folder names, or the whole path where two runs share a folder name."""
    names = [run.name for run in runs]
    return [run.name if names.count(run.name) == 1 else os.path.normpath(run.path) for run in runs]


def run_table(runs):
    header = ["run", "method", "dataset", "labels", "seed", "status", "test @ best val (epoch)",
              "median last 20", "mean last 20", "wall time"]
    rows = []
    for name, run in zip(display_names(runs), runs):
        v, m = run.values, run.protocol.metric
        rows.append([name, v["method"], v["dataset"], labels(v["n_labeled"]), v["seed"], run.status,
                     f"{number(v['test_at_best_val'], m)} ({v['best_epoch']})", number(v["median_last20_test"], m),
                     number(v["mean_last20_test"], m), wall_time(run)])
    return markdown(header, rows)


def mean_std(values, metric):
    """mean ± sample standard deviation; one run has no spread to show."""
    if len(values) == 1:
        return number(values[0], metric)
    return f"{number(statistics.mean(values), metric)} ± {number(statistics.stdev(values), metric)}"


@dataclass
class Group:
    members: list   # runs with the same settings, by seed
    setting: str    # "name=value, ..." of the options that tell it from groups of the same method,
                    # dataset and labels; empty when there is no such group

    @property
    def name(self):
        v = self.members[0].values
        name = f"{v['method']} on {v['dataset']} with {labels(v['n_labeled'])} labels"
        return f"{name} ({self.setting})" if self.setting else name


def headline(run):
    """Dataset, method and label count in table order: the paper's methods first, others after them."""
    v = run.values
    method_rank = METHODS.index(v["method"]) if v["method"] in METHODS else len(METHODS)
    return v["dataset"], method_rank, v["method"], math.inf if v["n_labeled"] == -1 else v["n_labeled"]


def sortable(value):
    """Option values of mixed types (numbers, strings, None) in one stable order."""
    if value is None:
        return 2, ""
    if isinstance(value, (int, float)):
        return 0, value
    return 1, str(value)


def shown(value):
    return "not recorded" if value is None else str(value)


def groups(runs):
    """Runs whose settings agree on every option any of them records (an option missing from a run's
    args.json, as in older runs, counts as None), in table order."""
    names = list(dict.fromkeys(name for run in runs for name in run.settings))
    by_settings = defaultdict(list)
    for run in runs:
        by_settings[tuple(run.settings.get(name) for name in names)].append(run)
    by_headline = defaultdict(list)
    for settings, members in by_settings.items():
        by_headline[headline(members[0])].append(settings)
    ordered = []
    for head in sorted(by_headline):
        siblings = sorted(by_headline[head], key=lambda settings: [sortable(v) for v in settings])
        for settings, setting in zip(siblings, setting_labels(names, siblings)):
            ordered.append(Group(sorted(by_settings[settings], key=lambda run: run.values["seed"]), setting))
    return ordered


def setting_labels(names, siblings):
    """For each settings tuple of groups sharing method, dataset and labels: "name=value, ..." of the
    options in which they differ."""
    differing = [i for i in range(len(names)) if len({settings[i] for settings in siblings}) > 1]
    return [", ".join(f"{names[i]}={shown(settings[i])}" for i in differing) for settings in siblings]


def warn_about_repeated_seeds(grouped):
    """Runs of one group sharing a seed repeat one sample rather than add one: their spread is not a
    spread over seeds."""
    for group in grouped:
        paths_by_seed = defaultdict(list)
        for run in group.members:
            paths_by_seed[run.values["seed"]].append(run.path)
        for seed, paths in paths_by_seed.items():
            if len(paths) > 1:
                print(f"warning: {group.name}: {len(paths)} runs share seed {seed} ({', '.join(paths)}); "
                      f"they are averaged as if they were different seeds", file=sys.stderr)


def group_table(grouped):
    header = ["method", "dataset", "labels", "setting", "runs", "seeds", "test @ best val", "median last 20",
              "mean last 20"]
    rows = []
    for group in grouped:
        members = group.members
        first, m = members[0].values, members[0].protocol.metric
        unfinished = sum(not run.finished for run in members)
        count = f"{len(members)} ({unfinished} unfinished)" if unfinished else str(len(members))
        rows.append([first["method"], first["dataset"], labels(first["n_labeled"]), group.setting, count,
                     ", ".join(str(run.values["seed"]) for run in members)]
                    + [mean_std([run.values[key] for run in members], m)
                       for key in ("test_at_best_val", "median_last20_test", "mean_last20_test")])
    return markdown(header, rows)


CSV_COLUMNS = ["run", "path", "method", "dataset", "n_labeled", "seed", "metric", "status", "epochs_done", "epochs",
               "best_epoch", "best_val", "test_at_best_val", "median_last20_test", "mean_last20_test", "wall_time_s",
               "note"]


def write_csv(path, runs):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for name, run in zip(display_names(runs), runs):
            v = run.values
            writer.writerow({**{key: v[key] for key in CSV_COLUMNS if key in v},
                             "run": name, "path": run.path, "status": run.status, "epochs_done": len(run.rows),
                             "epochs": run.args["epochs"], "wall_time_s": run.wall_time_s, "note": run.note})


def report(runs, grouped):
    metrics = sorted({(run.values["dataset"], run.protocol.metric) for run in runs})
    legend = "; ".join(f"{dataset}: {METRIC_NAMES[metric]}" for dataset, metric in metrics)
    return (f"### Runs\n\n{run_table(runs)}\n\n### Over seeds (mean ± sample std)\n\n{group_table(grouped)}\n\n"
            f"Values: {legend}. \"test @ best val\" is the test value at the first epoch with the best "
            f"validation value; \"last 20\" are the last 20 epochs (fewer in shorter runs). Runs are averaged "
            f"only when all their options agree; \"setting\" names the options that tell apart groups of the "
            f"same method, dataset and labels.")


def main(argv=None):
    p = argparse.ArgumentParser(description="Tables of the protocol values of run folders (docs/evaluation.md §3).")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help=f"run folders or glob patterns (default: every run folder under {DEFAULT_ROOT}/)")
    p.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
    args = p.parse_args(argv)
    runs = load_runs(args.runs or run_folders_under(DEFAULT_ROOT))
    if not runs:
        print(f"error: {nothing_read(args.runs)}", file=sys.stderr)
        return 1
    grouped = groups(runs)
    warn_about_repeated_seeds(grouped)
    print(report(runs, grouped))
    if args.csv:
        write_csv(args.csv, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
