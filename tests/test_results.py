"""utils.results: the run table and the table over seeds.

The run folders come from short real runs of the training scripts on a tiny CIFAR-10, plus copies made
to look interrupted, damaged, or run with other options; every number the tables show is checked against
log.txt parsed here.
"""
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import pytest

from dataset.synthetic import make_cifar10
from utils import results
from utils.logger import write_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, VAL_ITERATION = 3, 2


def train_command(script, data_root, out, seed):
    return [sys.executable, os.path.join(REPO, script), "--dataset", "cifar10", "--gpu", "cpu",
            "--data-root", data_root, "--n-labeled", "20", "--n-val", "10", "--batch-size", "8",
            "--val-iteration", str(VAL_ITERATION), "--epochs", str(EPOCHS), "--workers", "0", "--no-progress",
            "--out", out, "--manualSeed", str(seed)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real runs (trained in parallel), an interrupted copy and a copy with a damaged summary."""
    root = tmp_path_factory.mktemp("runs")
    data_root = make_cifar10(str(root / "data"), per_class_train=6, per_class_test=2)
    real = {"mt-s0": ("train-MT.py", 0), "mt-s1": ("train-MT.py", 1), "sl-s0": ("train-SL.py", 0)}
    env = dict(os.environ, OMP_NUM_THREADS="1")  # parallel runs on few cores: threads would only contend
    jobs = {name: subprocess.Popen(train_command(script, data_root, str(root / name), seed), cwd=REPO, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, (script, seed) in real.items()}
    for name, job in jobs.items():
        output = job.communicate()[0]
        assert job.returncode == 0, f"{name} failed:\n{output}"
    folders = {name: str(root / name) for name in real}
    folders["mt-interrupted"] = copy_run(folders["mt-s0"], root / "mt-interrupted")
    os.remove(os.path.join(folders["mt-interrupted"], "summary.json"))
    with open(os.path.join(folders["mt-interrupted"], "log.txt")) as f:
        lines = f.readlines()
    with open(os.path.join(folders["mt-interrupted"], "log.txt"), "w") as f:
        f.writelines(lines[:-1])  # as if stopped before the last epoch finished
    folders["sl-damaged"] = copy_run(folders["sl-s0"], root / "sl-damaged")
    with open(os.path.join(folders["sl-damaged"], "summary.json"), "w") as f:
        f.write('{"method": "SL", "finis')
    return folders


def copy_run(source, target):
    """A run folder without its (large, unread) checkpoints."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pth.tar"))
    return str(target)


def variant(source, target, **changes):
    """A copy of a run whose args.json has ``changes`` (None: the key removed, as in an older run), its
    summary.json kept consistent with them."""
    folder = copy_run(source, target)
    with open(os.path.join(folder, "args.json")) as f:
        args = json.load(f)
    args = {key: value for key, value in dict(args, **changes).items() if value is not None}
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(args, f)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(dict(summary, method=args["method"], seed=args["manualSeed"]), f)
    return folder


def expected(folder):
    """The protocol values, from log.txt parsed independently of utils.results."""
    with open(os.path.join(folder, "log.txt")) as f:
        header, *rows = [line.rstrip("\n").split("\t") for line in f]
    val, test = header.index("Valid Acc."), header.index("Test Acc.")
    vals, tests = [float(r[val]) for r in rows], [float(r[test]) for r in rows]
    best = vals.index(max(vals))  # the first epoch with the best validation value
    last = tests[-20:]
    return {"epochs": len(rows), "best_epoch": best + 1, "test_at_best_val": tests[best],
            "median_last20_test": statistics.median(last), "mean_last20_test": statistics.mean(last)}


def tables(output):
    """{section title: list of rows as {column: cell}} from the Markdown the tool prints."""
    parsed = {}
    for section in output.split("### ")[1:]:
        title, *lines = section.splitlines()
        cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
        parsed[title] = [dict(zip(cells[0], row)) for row in cells[2:]]
    return parsed


def run_results(argv, capsys):
    status = results.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


# ----------------------------------------------------------------------------- utils.results

def test_run_table_matches_each_runs_log(runs, capsys, tmp_path):
    names = ["mt-s0", "mt-s1", "sl-s0", "mt-interrupted"]
    status, out, err = run_results([runs[n] for n in names] + ["--csv", str(tmp_path / "runs.csv")], capsys)
    assert status == 0 and all(line.startswith("warning:") for line in err.splitlines())  # mt-s0's seed twice
    rows = {row["run"]: row for row in tables(out)["Runs"]}
    assert sorted(rows) == sorted(names)
    for name in names:
        row, want = rows[name], expected(runs[name])
        assert row["test @ best val (epoch)"] == f"{want['test_at_best_val']:.2f} ({want['best_epoch']})"
        assert row["median last 20"] == f"{want['median_last20_test']:.2f}"
        assert row["mean last 20"] == f"{want['mean_last20_test']:.2f}"
        assert (row["dataset"], row["labels"]) == ("cifar10", "20")
    assert [rows[n]["method"] for n in names] == ["MT", "MT", "SL", "MT"]
    assert [rows[n]["seed"] for n in names] == ["0", "1", "0", "0"]
    assert rows["mt-s0"]["status"] == "finished" and rows["mt-s0"]["wall time"] != "in progress"
    assert rows["mt-interrupted"]["status"] == f"in progress {EPOCHS - 1}/{EPOCHS} epochs"
    assert rows["mt-interrupted"]["wall time"] == "in progress"


def test_log_values_agree_with_the_scripts_summary(runs):
    for name in ("mt-s0", "mt-s1", "sl-s0"):
        run, remark = results.load_run(runs[name])
        with open(os.path.join(runs[name], "summary.json")) as f:
            summary = json.load(f)
        assert remark is None and run.finished
        assert run.values["best_epoch"] == summary["best_epoch"] == expected(runs[name])["best_epoch"]
        for key in ("test_at_best_val", "median_last20_test", "mean_last20_test", "best_val"):
            assert math.isclose(run.values[key], summary[key], abs_tol=1e-6)


def test_csv_holds_the_per_run_table(runs, capsys, tmp_path):
    path = tmp_path / "runs.csv"
    run_results([runs["mt-s0"], runs["mt-interrupted"], "--csv", str(path)], capsys)
    with open(path, newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["mt-interrupted", "mt-s0"]
    for name, row in rows.items():
        want = expected(runs[name])
        assert int(row["epochs_done"]) == want["epochs"] and int(row["best_epoch"]) == want["best_epoch"]
        for key in ("test_at_best_val", "median_last20_test", "mean_last20_test"):
            assert math.isclose(float(row[key]), want[key], abs_tol=1e-9)
        assert (row["method"], row["dataset"], row["metric"], row["seed"]) == ("MT", "cifar10", "acc", "0")
    with open(os.path.join(runs["mt-s0"], "summary.json")) as f:
        assert math.isclose(float(rows["mt-s0"]["wall_time_s"]), json.load(f)["wall_time_s"])
    assert rows["mt-interrupted"]["wall_time_s"] == "" and rows["mt-interrupted"]["status"].startswith("in progress")


def test_grouped_table_is_mean_and_std_over_seeds(runs, capsys):
    status, out, _ = run_results([runs["mt-s0"], runs["mt-s1"], runs["sl-s0"]], capsys)
    groups = {row["method"]: row for row in tables(out)["Over seeds (mean ± sample std)"]}
    assert list(groups) == ["SL", "MT"]  # the paper's method order
    mt = [expected(runs["mt-s0"]), expected(runs["mt-s1"])]
    assert (groups["MT"]["runs"], groups["MT"]["seeds"]) == ("2", "0, 1")
    for column, key in (("test @ best val", "test_at_best_val"), ("median last 20", "median_last20_test"),
                        ("mean last 20", "mean_last20_test")):
        values = [m[key] for m in mt]
        assert groups["MT"][column] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert groups["SL"][column] == f"{expected(runs['sl-s0'])[key]:.2f}"
    assert groups["SL"]["runs"] == "1"


def test_runs_are_averaged_only_when_every_option_that_changes_the_experiment_agrees(runs, capsys, tmp_path):
    # Not options of the experiment: seed, run folder, device, workers, progress display, bookkeeping.
    moved = variant(runs["mt-s1"], tmp_path / "moved", manualSeed=2, out="elsewhere", gpu="cpu", workers=7,
                    no_progress=False, resume="elsewhere/checkpoint.pth.tar", git_commit="abc", command="x",
                    versions={"torch": "0"}, resumes=[{"epoch": 1}], started="2025-01-01", timings={"a": 1})
    longer_epochs = variant(runs["mt-s0"], tmp_path / "longer-epochs", val_iteration=10)
    extra_key = variant(runs["mt-s0"], tmp_path / "extra-key", mixup_beta=0.5)  # added by a copied script
    copied_script = variant(runs["mt-s0"], tmp_path / "copied-script", method="MYVAR", based_on="MT")
    status, out, err = run_results([runs["mt-s0"], runs["mt-s1"], moved, longer_epochs, extra_key, copied_script,
                                    runs["sl-s0"]], capsys)
    assert status == 0 and err == ""  # no seed repeats within a group
    rows = tables(out)["Over seeds (mean ± sample std)"]
    assert [(r["method"], r["setting"], r["seeds"]) for r in rows] == [
        ("SL", "", "0"),
        ("MT", "val_iteration=2, mixup_beta=0.5", "0"),
        ("MT", "val_iteration=2, mixup_beta=not recorded", "0, 1, 2"),
        ("MT", "val_iteration=10, mixup_beta=not recorded", "0"),
        ("MYVAR", "", "0")]  # methods of copied scripts after the paper's
    values = [expected(folder)["test_at_best_val"] for folder in (runs["mt-s0"], runs["mt-s1"], moved)]
    assert rows[2]["test @ best val"] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_runs_with_the_same_seed_in_one_group_are_named_on_stderr(runs, capsys, tmp_path):
    other_setting = variant(runs["mt-s0"], tmp_path / "other-setting", lambda_u=1.0)  # seed 0 too, another group
    status, _, err = run_results([runs["mt-s0"], runs["mt-s1"], runs["mt-interrupted"], other_setting], capsys)
    assert status == 0
    assert err.splitlines() == [
        f"warning: MT on cifar10 with 20 labels (lambda_u=50.0): 2 runs share seed 0 ({runs['mt-s0']}, "
        f"{runs['mt-interrupted']}); they are averaged as if they were different seeds"]


def test_without_arguments_every_run_folder_under_runs_is_read(runs, capsys, tmp_path, monkeypatch):
    copy_run(runs["mt-s0"], tmp_path / "runs" / "cifar10MT@20-s0")
    copy_run(runs["sl-s0"], tmp_path / "runs" / "cifar10SL@20-s0")
    os.makedirs(tmp_path / "runs" / "slurm")  # the Slurm logs' folder, not a run: passed over silently
    (tmp_path / "runs" / "notes.txt").write_text("not a folder")
    monkeypatch.chdir(tmp_path)
    status, out, err = run_results([], capsys)
    assert status == 0 and err == ""
    assert sorted(row["run"] for row in tables(out)["Runs"]) == ["cifar10MT@20-s0", "cifar10SL@20-s0"]
    monkeypatch.chdir(tmp_path / "runs")  # no runs/ here
    assert run_results([], capsys) == (1, "", "error: no run folder could be read under runs/; name run folders "
                                              "or glob patterns\n")


def test_damaged_folders_are_named_and_skipped(runs, capsys, tmp_path):
    no_args = tmp_path / "no-args"
    shutil.copytree(runs["mt-s0"], no_args, ignore=shutil.ignore_patterns("*.pth.tar", "args.json"))
    bad_args = tmp_path / "bad-args"
    shutil.copytree(runs["mt-s0"], bad_args, ignore=shutil.ignore_patterns("*.pth.tar"))
    (bad_args / "args.json").write_text("{not json")
    empty_log = tmp_path / "empty-log"
    shutil.copytree(runs["mt-s0"], empty_log, ignore=shutil.ignore_patterns("*.pth.tar", "summary.json"))
    (empty_log / "log.txt").write_text("")
    folders = [str(no_args), str(bad_args), str(empty_log), runs["sl-damaged"], runs["mt-s0"],
               str(tmp_path / "missing-*")]
    status, out, err = run_results(folders, capsys)
    assert status == 0
    rows = {row["run"]: row for row in tables(out)["Runs"]}
    assert sorted(rows) == ["mt-s0", "sl-damaged"]
    assert rows["sl-damaged"]["status"] == f"{EPOCHS}/{EPOCHS} epochs, summary.json damaged"
    want = expected(runs["sl-damaged"])
    assert rows["sl-damaged"]["test @ best val (epoch)"] == f"{want['test_at_best_val']:.2f} ({want['best_epoch']})"
    lines = err.splitlines()
    for folder in (no_args, bad_args, empty_log, tmp_path / "missing-*"):
        assert any(line.startswith(f"skipped {folder}:") for line in lines), err
    assert any(line.startswith(f"note on {runs['sl-damaged']}:") for line in lines), err


def test_no_readable_run_is_an_error(tmp_path, capsys):
    status, out, err = run_results([str(tmp_path)], capsys)
    assert status == 1 and out == "" and "no run folder could be read" in err


def test_glob_patterns_are_expanded_by_the_tool(runs, capsys):
    pattern = os.path.join(os.path.dirname(runs["mt-s0"]), "mt-s[0-9]")
    status, out, _ = run_results([pattern], capsys)
    assert status == 0
    assert sorted(row["run"] for row in tables(out)["Runs"]) == ["mt-s0", "mt-s1"]


def test_last_twenty_epochs_and_first_best_epoch(runs, tmp_path):
    folder = copy_run(runs["mt-s0"], tmp_path / "long")
    os.remove(os.path.join(folder, "summary.json"))
    with open(os.path.join(folder, "args.json")) as f:
        args = json.load(f)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump(dict(args, epochs=30), f)
    val = [10.0 + (e % 7) for e in range(25)]          # the maximum 16 first at epoch 7, again at 14 and 21
    test = [float(e) for e in range(25)]
    columns = ["Train Loss", "Train Loss X", "Train Loss U", "Valid Loss", "Valid Acc.", "Test Loss", "Test Acc."]
    write_log(folder, columns, [dict({c: 1.0 for c in columns}, **{"Valid Acc.": v, "Test Acc.": t})
                                for v, t in zip(val, test)])
    run, _ = results.load_run(folder)
    assert run.values["best_epoch"] == 7 and run.values["test_at_best_val"] == 6.0
    assert run.values["median_last20_test"] == statistics.median(range(5, 25))
    assert run.values["mean_last20_test"] == statistics.mean(range(5, 25))
    assert run.status == "in progress 25/30 epochs"
