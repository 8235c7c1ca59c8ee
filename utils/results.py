"""Tables over run folders: one row per run, then mean ± std over seeds.

    python -m utils.results                       # every run folder directly under runs/ and in the current folder
    python -m utils.results runs/cifar10MT@250-s* runs/cifar10L2IO@250-s* [--csv results.csv]

Every protocol value (docs/evaluation.md §3) is computed from ``log.txt`` with the training scripts' own
``summarize`` (utils/evaluation.py), so a run that has not finished is shown like a finished one, with its
values so far; where ``summary.json`` exists it must agree, and a disagreement is reported. How each run
ended comes from ``status.json`` (``run_state``). A run that diverged (``diverged_at``) shows "diverged"
instead of its values and is left out of the mean ± std. Two runs of one setting with the same seed count
once. Folders that cannot be read are named on stderr and skipped. Runs are averaged only when every
option that changes the experiment is the same (``NOT_SETTINGS`` lists the ones that do not).
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from utils.evaluation import PROTOCOLS, summarize
from utils.folder import ARGS, LOG, RUN_FILES, STATUS, SUMMARY

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
STATES = ("running", "finished", "interrupted", "stopped")  # status.json's "state"
# Divergence (``diverged_at``): a training loss in log.txt that is NaN or infinite, or larger than
# DIVERGED_FACTOR × the run's first-epoch "Train Loss" (× 1 when that is below 1), or a run that
# status.json says was stopped by a non-finite loss. The tasks' losses (cross-entropy, squared errors of
# probabilities or of normalised coordinates, weighted by λ_u ≤ 100) stay far below that bound.
DIVERGED_FACTOR = 1e6
DIVERGED_RULE = ("a training loss in its log.txt is NaN, infinite or above "
                 + f"{DIVERGED_FACTOR:.0e}".replace("e+0", "e")
                 + " × its first epoch's Train Loss (or × 1 if that is smaller), or it was stopped by a non-finite loss")
TRAIN_LOSS_COLUMNS = ("Train Loss", "Train Loss X", "Train Loss U")
NON_FINITE = re.compile(r"\b(nan|inf|infinite|infinity|non-finite|not finite)\b", re.I)


def plural(count, word, words=None):
    """``1 epoch``, ``2 epochs``: the count with its noun in the right number."""
    return f"{count} {word if count == 1 else words or word + 's'}"


class RunFolderError(Exception):
    """A folder that is not a readable run; the message says why."""


@dataclass
class RunRecord:
    path: str
    args: dict
    protocol: object           # the task's reporting protocol (utils.evaluation)
    columns: list              # log.txt's column names
    rows: list                 # log.txt rows as {column name: value}; empty before the first epoch ends
    values: dict               # summarize() over the log rows; empty without rows
    summary: Optional[dict]    # summary.json when present and readable
    status_record: Optional[dict] = None   # status.json when present and readable
    last_written: Optional[float] = None   # the newest modification time of the folder's files
    note: str = ""             # short remark on summary.json or status.json for the status column

    @property
    def name(self):
        return os.path.basename(os.path.normpath(self.path))

    @property
    def method(self):
        return self.args["method"]

    @property
    def dataset(self):
        return self.args["dataset"]

    @property
    def n_labeled(self):
        return self.args["n_labeled"]

    @property
    def seed(self):
        return self.args["manualSeed"]

    @property
    def has_values(self):
        return bool(self.rows)

    @property
    def state(self):
        """status.json's state; without it (older runs) "finished" when summary.json is there, else None."""
        if self.status_record is not None:
            return self.status_record["state"]
        return "finished" if self.summary is not None else None

    @property
    def finished(self):
        return self.state == "finished"

    @property
    def epochs(self):
        recorded = (self.status_record or {}).get("epochs")
        return recorded if isinstance(recorded, int) else self.args["epochs"]

    def epochs_done(self):
        """Epochs done: status.json's count for an attempt that ended, the log's rows otherwise (a running
        attempt wrote its status when it started)."""
        recorded = (self.status_record or {}).get("epochs_done")
        if self.state in ("interrupted", "stopped") and isinstance(recorded, int):
            return recorded
        return len(self.rows)

    @property
    def status(self):
        """How the run ended (README "Comparing runs"), with any remark on its files."""
        done = f"{self.epochs_done()}/{plural(self.epochs, 'epoch')}"
        state, detail = self.state, (self.status_record or {}).get("detail") or ""
        if state == "finished":
            return f"finished ({self.note})" if self.note else "finished"
        if state == "interrupted":
            text = f"interrupted after {done}"
        elif state == "stopped":
            text = f"stopped: {detail}" if detail else f"stopped after {done}"
        elif state == "running":
            text = f"running or killed, {done}"
            if self.last_written is not None:
                text += f" (last written {age(time.time() - self.last_written)} ago)"
        else:
            return f"{done}, {self.note}" if self.note else f"in progress {done}"
        return f"{text}, {self.note}" if self.note else text

    @property
    def diverged_at(self):
        """The 1-based epoch in which the run diverged (see ``DIVERGED_FACTOR``), or None. A run stopped by
        a non-finite loss before its bad epoch was logged diverged in the epoch after its last row."""
        if self.rows:
            first = self.rows[0].get("Train Loss", 0.0)
            limit = DIVERGED_FACTOR * max(1.0, first) if math.isfinite(first) else -math.inf
            for epoch, row in enumerate(self.rows, start=1):
                if any(not math.isfinite(row[c]) or abs(row[c]) > limit for c in TRAIN_LOSS_COLUMNS if c in row):
                    return epoch
        if self.state == "stopped" and NON_FINITE.search((self.status_record or {}).get("detail") or ""):
            return len(self.rows) + 1
        return None

    @property
    def diverged(self):
        return self.diverged_at is not None

    @property
    def averaged(self):
        """Whether the run's values enter a mean over seeds: it has some and did not diverge."""
        return self.has_values and not self.diverged

    @property
    def wall_time_s(self):
        return self.summary.get("wall_time_s") if self.finished and self.summary else None

    @property
    def settings(self):
        """The options that define the experiment, as {name: value} (see ``NOT_SETTINGS``)."""
        return {key: value for key, value in self.args.items()
                if key not in NOT_SETTINGS and not isinstance(value, (dict, list))}


def age(seconds):
    """``40 s``, ``12 min``, ``3 h``, ``2 days``."""
    seconds = max(0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return plural(round(seconds / 86400), "day")


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
    """``log.txt`` as (columns, rows as {column: value}): a header, then one tab-terminated row per finished
    epoch; a run that has not finished its first epoch has the header only. Values may be huge, ``inf`` or
    ``nan`` (a diverging run)."""
    try:
        with open(path) as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as exc:
        raise RunFolderError(f"cannot read {LOG} ({exc.strerror})") from None
    if not lines:
        raise RunFolderError(f"{LOG} is empty (not even its header line)")
    columns = lines[0].rstrip("\t").split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            values = [float(v) for v in line.rstrip("\t").split("\t")]
        except ValueError:
            raise RunFolderError(f"{LOG} line {number} holds a value that is not a number") from None
        if len(values) != len(columns):
            raise RunFolderError(f"{LOG} line {number} has {plural(len(values), 'value')} for "
                                 f"{plural(len(columns), 'column')}")
        rows.append(dict(zip(columns, values)))
    return columns, rows


def protocol_values(protocol, args, columns, rows, wall_time):
    """The log rows as the training loop's history, through the scripts' own ``summarize``; {} without rows."""
    m = protocol.metric
    names = {key: name for name, key in protocol.columns}
    if names[f"val_{m}"] not in columns or names[f"test_{m}"] not in columns:
        raise RunFolderError(f"{LOG} lacks the {args['dataset']} columns for validation and test {m}")
    if not rows:
        return {}
    history = [{key: row[name] for name, key in protocol.columns if name in row} for row in rows]
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


def read_optional(path, valid, problem):
    """(the JSON object at ``path`` or None, what is wrong with it or None): a missing file is no problem,
    and a damaged one is not fatal when log.txt is fine."""
    if not os.path.exists(path):
        return None, None
    try:
        value = read_json(path)
    except RunFolderError as exc:
        return None, str(exc)
    if not isinstance(value, dict) or not valid(value):
        return None, problem
    return value, None


def read_summary(path):
    return read_optional(path, lambda summary: summary.get("finished") is True,
                         f"{SUMMARY} does not record a finished run")


def read_status(path):
    """status.json; older run folders have none."""
    return read_optional(path, lambda status: status.get("state") in STATES,
                         f"{STATUS} records no state ({', '.join(STATES)})")


def newest_write(path):
    """The latest modification time of the files in ``path`` (a running run rewrites some every epoch)."""
    times = []
    for entry in os.scandir(path):
        try:
            if entry.is_file():
                times.append(entry.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=None)


def load_run(path):
    """The run in ``path``, and a remark for stderr about its summary.json or status.json (or None)."""
    args = read_json(os.path.join(path, ARGS))
    if not isinstance(args, dict) or any(key not in args for key in REQUIRED_ARGS):
        raise RunFolderError(f"{ARGS} lacks one of {', '.join(REQUIRED_ARGS)}")
    if args["dataset"] not in PROTOCOLS:
        raise RunFolderError(f"{ARGS} names an unknown dataset {args['dataset']!r}")
    protocol = PROTOCOLS[args["dataset"]]
    columns, rows = read_log(os.path.join(path, LOG))
    summary, problem = read_summary(os.path.join(path, SUMMARY))
    status, status_problem = read_status(os.path.join(path, STATUS))
    values = protocol_values(protocol, args, columns, rows, summary.get("wall_time_s") if summary else None)
    run = RunRecord(path=path, args=args, protocol=protocol, columns=columns, rows=rows, values=values,
                    summary=summary, status_record=status, last_written=newest_write(path))
    remarks, notes = [], []
    if status_problem:
        notes.append(f"{STATUS} damaged")
        remarks.append(f"{status_problem}; status inferred from {SUMMARY} and {LOG}")
    if problem:
        notes.append(f"{SUMMARY} damaged")
        remarks.append(f"{problem}; values from {LOG}")
    elif summary and not rows:
        notes.append(f"{SUMMARY} without log rows")
        remarks.append(f"{SUMMARY} records a finished run but {LOG} has no row")
    elif summary:
        key = disagreement(values, summary)
        if key:
            notes.append(f"{SUMMARY} disagrees on {key}")
            remarks.append(f"{SUMMARY} and {LOG} disagree on {key} ({summary.get(key)} vs {values[key]}); "
                           f"values from {LOG}")
    run.note = ", ".join(notes)
    return run, "; ".join(remarks) or None


# ----------------------------------------------------------------------------- which folders

def is_run_folder(path):
    """A folder holding any of the files a run writes."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


def run_folders_under(root):
    """The folders directly under ``root`` holding a run file; others there (such as a Slurm log folder)
    are not runs and are passed over without a remark."""
    if not os.path.isdir(root):
        return []
    children = [os.path.join(root, name) for name in sorted(os.listdir(root)) if not name.startswith(".")]
    return [path for path in children if is_run_folder(path)]


def default_folders():
    """Without arguments: the run folders directly under ``runs/`` (utils.experiments' grid) and directly in
    the current folder (the training scripts' default ``--out``)."""
    here = [os.path.relpath(path) for path in run_folders_under(os.curdir)]
    return run_folders_under(DEFAULT_ROOT) + [path for path in here if path not in (DEFAULT_ROOT,)]


def where_looked():
    return f"directly under {DEFAULT_ROOT}/ and in the current folder ({os.path.abspath(os.curdir)})"


def nothing_read(patterns, found=0):
    """The one-line reason for an empty table or figure; ``found``: the folders tried."""
    if patterns:
        return "no run folder could be read"
    if found:
        which = "the run folder" if found == 1 else f"none of the {found} run folders"
        return (f"{which} found {where_looked()} could {'not ' if found == 1 else ''}be read; "
                f"name run folders or glob patterns")
    return f"no run folder found {where_looked()}; name run folders or glob patterns"


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


def runs_or_error(patterns):
    """The runs the command line names (the default folders without any), or the one-line error."""
    folders = patterns or default_folders()
    runs = load_runs(folders)
    return runs, None if runs else nothing_read(patterns, len(folders))


# ----------------------------------------------------------------------------- tables

def labels(n_labeled):
    return "all" if n_labeled == -1 else f"{n_labeled:g}"


def number(value, metric):
    return f"{value:.2f}" if metric == "acc" else f"{value:.4f}"


def wall_time(run):
    """H:MM:SS of a finished run; an unfinished one has no total."""
    if not run.finished:
        if run.state in ("interrupted", "stopped"):
            return "not finished"
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


def shown_status(run):
    """The status column: how the run ended, and where it diverged."""
    return f"{run.status}; diverged in epoch {run.diverged_at}" if run.diverged else run.status


def value_cells(run):
    """test @ best val (epoch), median and mean of the last 20: "diverged" for a diverged run, empty before
    the first epoch."""
    if run.diverged:
        return ["diverged"] * 3
    if not run.has_values:
        return [""] * 3
    v, m = run.values, run.protocol.metric
    return [f"{number(v['test_at_best_val'], m)} ({v['best_epoch']})", number(v["median_last20_test"], m),
            number(v["mean_last20_test"], m)]


def run_table(runs):
    header = ["run", "method", "dataset", "labels", "seed", "status", "test @ best val (epoch)",
              "median last 20", "mean last 20", "wall time"]
    rows = [[name, run.method, run.dataset, labels(run.n_labeled), run.seed, shown_status(run), *value_cells(run),
             wall_time(run)] for name, run in zip(display_names(runs), runs)]
    return markdown(header, rows)


def mean_std(values, metric):
    """mean ± sample standard deviation; one run has no spread to show."""
    if len(values) == 1:
        return number(values[0], metric)
    return f"{number(statistics.mean(values), metric)} ± {number(statistics.stdev(values), metric)}"


@dataclass
class Group:
    members: list   # runs with the same settings, by seed (every run, repeats of a seed included)
    setting: str    # "name=value, ..." of the options that tell it from groups of the same method,
                    # dataset and labels; empty when there is no such group

    @property
    def name(self):
        run = self.members[0]
        name = f"{run.method} on {run.dataset} with {labels(run.n_labeled)} labels"
        return f"{name} ({self.setting})" if self.setting else name

    def by_seed(self):
        """{seed: the runs with that seed}, seeds in order."""
        seeds = defaultdict(list)
        for run in self.members:
            seeds[run.seed].append(run)
        return dict(seeds)

    def counted(self):
        """One run per seed: of runs sharing a seed, the finished one, else the one with the most epochs,
        else one that did not diverge, else the first by path."""
        return [min(runs, key=preference) for runs in self.by_seed().values()]


def preference(run):
    return not run.finished, -len(run.rows), run.diverged, os.path.normpath(run.path)


def headline(run):
    """Dataset, method and label count in table order: the paper's methods first, others after them."""
    method_rank = METHODS.index(run.method) if run.method in METHODS else len(METHODS)
    return run.dataset, method_rank, run.method, math.inf if run.n_labeled == -1 else run.n_labeled


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
            ordered.append(Group(sorted(by_settings[settings], key=lambda run: sortable(run.seed)), setting))
    return ordered


def setting_labels(names, siblings):
    """For each settings tuple of groups sharing method, dataset and labels: "name=value, ..." of the
    options in which they differ."""
    differing = [i for i in range(len(names)) if len({settings[i] for settings in siblings}) > 1]
    return [", ".join(f"{names[i]}={shown(settings[i])}" for i in differing) for settings in siblings]


def why_kept(kept, runs):
    others = [run for run in runs if run is not kept]
    if kept.finished and not any(run.finished for run in others):
        return "the finished one"
    alike = [run for run in others if run.finished == kept.finished]
    if all(len(kept.rows) > len(run.rows) for run in alike):
        return f"the one with the most epochs, {len(kept.rows)}"
    if not kept.diverged and any(run.diverged for run in alike if len(run.rows) == len(kept.rows)):
        return "the one that did not diverge"
    return "the first by path of equally far runs"


def warn_about_repeated_seeds(grouped):
    """Runs of one group sharing a seed repeat one sample rather than add one: the seed counts once, and
    stderr says which run stands for it."""
    for group in grouped:
        kept = group.counted()
        for run_list, chosen in zip(group.by_seed().values(), kept):
            if len(run_list) > 1:
                print(f"warning: {group.name}: {len(run_list)} runs share seed {chosen.seed} "
                      f"({', '.join(run.path for run in run_list)}); the seed counts once, with {chosen.path} "
                      f"({why_kept(chosen, run_list)})", file=sys.stderr)


def group_table(grouped):
    header = ["method", "dataset", "labels", "setting", "n", "seeds", "test @ best val", "median last 20",
              "mean last 20"]
    rows = []
    for group in grouped:
        counted = group.counted()
        averaged = [run for run in counted if run.averaged]
        first = group.members[0]
        unfinished = sum(not run.finished for run in averaged)
        n = f"{len(averaged)} ({unfinished} unfinished)" if unfinished else str(len(averaged))
        seeds = ", ".join(str(run.seed) for run in averaged)
        left_out = [f"{run.seed} ({'diverged' if run.diverged else 'no epoch yet'})"
                    for run in counted if not run.averaged]
        if left_out:
            seeds = f"{seeds}; not averaged: {', '.join(left_out)}" if seeds else f"not averaged: {', '.join(left_out)}"
        if averaged:
            m = first.protocol.metric
            cells = [mean_std([run.values[key] for run in averaged], m)
                     for key in ("test_at_best_val", "median_last20_test", "mean_last20_test")]
        else:
            cells = ["diverged" if any(run.diverged for run in counted) else ""] * 3
        rows.append([first.method, first.dataset, labels(first.n_labeled), group.setting, n, seeds, *cells])
    return markdown(header, rows)


CSV_COLUMNS = ["run", "path", "method", "dataset", "n_labeled", "seed", "metric", "status", "state", "diverged",
               "diverged_epoch", "epochs_done", "epochs", "best_epoch", "best_val", "test_at_best_val",
               "median_last20_test", "mean_last20_test", "wall_time_s", "note"]


def write_csv(path, runs):
    """The per-run table with full-precision values (also those of a diverged run, flagged in ``diverged``)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for name, run in zip(display_names(runs), runs):
            writer.writerow({**{key: run.values[key] for key in CSV_COLUMNS if key in run.values},
                             "run": name, "path": run.path, "method": run.method, "dataset": run.dataset,
                             "n_labeled": run.n_labeled, "seed": run.seed, "metric": run.protocol.metric,
                             "status": run.status, "state": run.state or "in progress",
                             "diverged": "true" if run.diverged else "false", "diverged_epoch": run.diverged_at,
                             "epochs_done": len(run.rows), "epochs": run.epochs, "wall_time_s": run.wall_time_s,
                             "note": run.note})


def report(runs, grouped):
    metrics = sorted({(run.dataset, run.protocol.metric) for run in runs})
    legend = "; ".join(f"{dataset}: {METRIC_NAMES[metric]}" for dataset, metric in metrics)
    return (f"### Runs\n\n{run_table(runs)}\n\n### Over seeds (mean ± sample std)\n\n{group_table(grouped)}\n\n"
            f"Values: {legend}. \"test @ best val\" is the test value at the first epoch with the best "
            f"validation value; \"last 20\" are the last 20 epochs (fewer in shorter runs). A run diverged when "
            f"{DIVERGED_RULE}; its values are not shown or averaged. Runs are averaged only when all their options "
            f"agree; \"setting\" names the options that tell apart groups of the same method, dataset and labels; "
            f"n counts distinct seeds, a seed run twice counting once.")


def main(argv=None):
    p = argparse.ArgumentParser(
        description="Tables of the protocol values of run folders (docs/evaluation.md §3), with how each run "
                    "ended (status.json) and whether it diverged.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help=f"run folders or glob patterns (default: every run folder directly under {DEFAULT_ROOT}/ "
                        f"and directly in the current folder, where the training scripts' default --out puts them)")
    p.add_argument("--csv", metavar="FILE", help="also write the per-run table as CSV")
    args = p.parse_args(argv)
    runs, error = runs_or_error(args.runs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    grouped = groups(runs)
    warn_about_repeated_seeds(grouped)
    try:
        print(report(runs, grouped), flush=True)
    except BrokenPipeError:  # a reader such as `head` stopped early: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.csv:
        write_csv(args.csv, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
