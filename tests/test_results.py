"""utils.results: the run table and the table over seeds.

The run folders come from short real runs of the training scripts on a tiny CIFAR-10, plus copies made
to look interrupted, damaged, or run with other options; every number the tables show is checked against
log.txt parsed here. How runs ended (status.json), divergence and repeated seeds are checked on folders
written directly (tests/runfolders.py).
"""
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

from dataset.synthetic import make_cifar10
from tests.runfolders import age_files, make_run
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
    folders["mt-interrupted"] = copy_run(folders["mt-s0"], root / "mt-interrupted", older=True)
    os.remove(os.path.join(folders["mt-interrupted"], "summary.json"))
    with open(os.path.join(folders["mt-interrupted"], "log.txt")) as f:
        lines = f.readlines()
    with open(os.path.join(folders["mt-interrupted"], "log.txt"), "w") as f:
        f.writelines(lines[:-1])  # as if stopped before the last epoch finished
    folders["sl-damaged"] = copy_run(folders["sl-s0"], root / "sl-damaged", older=True)
    with open(os.path.join(folders["sl-damaged"], "summary.json"), "w") as f:
        f.write('{"method": "SL", "finis')
    return folders


def copy_run(source, target, older=False):
    """A run folder without its (large, unread) checkpoints; ``older``: also without status.json, as
    written before the scripts kept one (its status is then inferred from summary.json and log.txt)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.pth.tar", *(["status.json"] if older else [])))
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
    assert (groups["MT"]["n"], groups["MT"]["seeds"]) == ("2", "0, 1")
    for column, key in (("test @ best val", "test_at_best_val"), ("median last 20", "median_last20_test"),
                        ("mean last 20", "mean_last20_test")):
        values = [m[key] for m in mt]
        assert groups["MT"][column] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        assert groups["SL"][column] == f"{expected(runs['sl-s0'])[key]:.2f}"
    assert groups["SL"]["n"] == "1"


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


def test_runs_with_the_same_seed_in_one_group_count_once(runs, capsys, tmp_path):
    other_setting = variant(runs["mt-s0"], tmp_path / "other-setting", lambda_u=1.0)  # seed 0 too, another group
    status, out, err = run_results([runs["mt-interrupted"], runs["mt-s0"], runs["mt-s1"], other_setting], capsys)
    assert status == 0
    assert err.splitlines() == [
        f"warning: MT on cifar10 with 20 labels (lambda_u=50.0): 2 runs share seed 0 ({runs['mt-interrupted']}, "
        f"{runs['mt-s0']}); the seed counts once, with {runs['mt-s0']} (the finished one)"]
    group = tables(out)["Over seeds (mean ± sample std)"][1]
    assert (group["setting"], group["n"], group["seeds"]) == ("lambda_u=50.0", "2", "0, 1")
    values = [expected(runs[name])["test_at_best_val"] for name in ("mt-s0", "mt-s1")]  # not mt-interrupted's
    assert group["test @ best val"] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert len(tables(out)["Runs"]) == 4  # every run is still listed


def test_without_arguments_every_run_folder_under_runs_and_here_is_read(runs, capsys, tmp_path, monkeypatch):
    copy_run(runs["mt-s0"], tmp_path / "runs" / "cifar10MT@20-s0")
    copy_run(runs["sl-s0"], tmp_path / "runs" / "cifar10SL@20-s0")
    os.makedirs(tmp_path / "runs" / "slurm")  # the Slurm logs' folder, not a run: passed over silently
    (tmp_path / "runs" / "notes.txt").write_text("not a folder")
    copy_run(runs["mt-s1"], tmp_path / "cifar10MT@20")  # a training script's default --out, in the current folder
    os.makedirs(tmp_path / "data" / "cifar-10-batches-py")  # not a run either
    monkeypatch.chdir(tmp_path)
    status, out, err = run_results([], capsys)
    assert status == 0 and err == ""
    assert sorted(row["run"] for row in tables(out)["Runs"]) == ["cifar10MT@20", "cifar10MT@20-s0", "cifar10SL@20-s0"]
    monkeypatch.chdir(tmp_path / "runs" / "slurm")  # no runs/ and no run folder here
    assert run_results([], capsys) == (1, "", f"error: no run folder found directly under runs/ and in the current "
                                              f"folder ({tmp_path / 'runs' / 'slurm'}); name run folders or glob "
                                              f"patterns\n")
    monkeypatch.chdir(tmp_path / "runs")
    (tmp_path / "runs" / "cifar10MT@20-s0" / "args.json").write_text("{")
    (tmp_path / "runs" / "cifar10SL@20-s0" / "log.txt").write_text("")
    status, out, err = run_results([], capsys)
    assert status == 1 and out == "" and len(err.splitlines()) == 3
    assert err.splitlines()[-1] == (f"error: none of the 2 run folders found directly under runs/ and in the current "
                                    f"folder ({tmp_path / 'runs'}) could be read; name run folders or glob patterns")


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
    if os.path.exists(os.path.join(folder, "status.json")):
        os.remove(os.path.join(folder, "status.json"))  # as in a folder older than status.json
    run, _ = results.load_run(folder)
    assert run.values["best_epoch"] == 7 and run.values["test_at_best_val"] == 6.0
    assert run.values["median_last20_test"] == statistics.median(range(5, 25))
    assert run.values["mean_last20_test"] == statistics.mean(range(5, 25))
    assert run.status == "in progress 25/30 epochs"


# ----------------------------------------------------------------------------- how runs ended, divergence, seeds

def run_rows(out):
    return {row["run"]: row for row in tables(out)["Runs"]}


def test_status_json_says_how_each_run_ended(tmp_path, capsys):
    folders = [make_run(tmp_path / "done", status="finished"),
               make_run(tmp_path / "ctrl-c", logged=2, finished=False, seed=5,
                        status={"state": "interrupted", "detail": "Ctrl-C in epoch 3"}),
               make_run(tmp_path / "nan", logged=2, finished=False, seed=1,
                        status={"state": "stopped", "detail": "the training loss became nan in epoch 3, iteration 1"}),
               make_run(tmp_path / "killed", logged=2, finished=False, seed=2, status="running"),
               make_run(tmp_path / "new", logged=0, finished=False, seed=3, status="running"),
               make_run(tmp_path / "old", logged=2, finished=False, seed=4)]  # no status.json: an older run
    age_files(tmp_path / "killed", 2 * 3600)
    age_files(tmp_path / "new", 3 * 86400)
    status, out, err = run_results(folders, capsys)
    assert status == 0 and err == ""
    rows = run_rows(out)
    assert {name: row["status"] for name, row in rows.items()} == {
        "done": "finished",
        "ctrl-c": "interrupted after 2/3 epochs",
        "nan": "stopped: the training loss became nan in epoch 3, iteration 1; diverged in epoch 3",
        "killed": "running or killed, 2/3 epochs (last written 2 h ago)",
        "new": "running or killed, 0/3 epochs (last written 3 days ago)",
        "old": "in progress 2/3 epochs"}
    for name in ("ctrl-c", "killed", "old"):  # values so far, as for a finished run
        assert rows[name]["test @ best val (epoch)"] == "11.00 (2)" and rows[name]["median last 20"] == "10.50"
    assert [rows["new"][c] for c in ("test @ best val (epoch)", "median last 20", "mean last 20")] == ["", "", ""]
    assert {name: row["wall time"] for name, row in rows.items() if name != "done"} == {
        "ctrl-c": "not finished", "nan": "not finished", "killed": "in progress", "new": "in progress",
        "old": "in progress"}
    group = tables(out)["Over seeds (mean ± sample std)"][0]
    assert (group["n"], group["seeds"]) == ("4 (3 unfinished)",
                                            "0, 2, 4, 5; not averaged: 1 (diverged), 3 (no epoch yet)")


def test_a_run_that_never_finished_an_epoch_is_listed(tmp_path, capsys):
    folder = make_run(tmp_path / "first-epoch", epochs=2, logged=0, finished=False)  # header only, no status.json
    status, out, err = run_results([folder], capsys)
    assert status == 0 and err == ""
    row = run_rows(out)["first-epoch"]
    assert (row["status"], row["median last 20"]) == ("in progress 0/2 epochs", "")
    group = tables(out)["Over seeds (mean ± sample std)"][0]
    assert (group["n"], group["seeds"], group["median last 20"]) == ("0", "not averaged: 0 (no epoch yet)", "")


def test_diverged_runs_say_so_instead_of_their_values(tmp_path, capsys):
    fine = [make_run(tmp_path / f"fine-s{seed}", seed=seed, epochs=4, test=[50.0 + seed, 60.0, 70.0 + seed, 80.0])
            for seed in (0, 1)]
    blown = make_run(tmp_path / "blown", seed=2, epochs=4, loss=[2.0, 1.0, 3.5e19, 2e13], test=[50, 60, 10, 10],
                     status="finished")
    old_inf = make_run(tmp_path / "old-inf", seed=3, epochs=4, logged=2, loss=[2.0, float("inf")], finished=False)
    stopped = make_run(tmp_path / "stopped", seed=4, epochs=4, logged=2, finished=False,
                       status={"state": "stopped", "detail": "the training loss became inf in epoch 3, iteration 2"})
    rising = make_run(tmp_path / "rising", seed=5, epochs=4, loss=[0.5, 10.0, 1e3, 4.9e5])  # below 1e6 × 1: kept
    status, out, err = run_results([*fine, blown, old_inf, stopped, rising], capsys)
    assert status == 0 and err == ""
    rows = run_rows(out)
    for name, epoch in (("blown", 3), ("old-inf", 2), ("stopped", 3)):
        assert rows[name]["status"].endswith(f"; diverged in epoch {epoch}"), rows[name]
        assert [rows[name][c] for c in ("test @ best val (epoch)", "median last 20", "mean last 20")] == \
            ["diverged"] * 3
    assert rows["blown"]["status"] == "finished; diverged in epoch 3"
    assert rows["rising"]["status"] == "finished" and rows["rising"]["median last 20"] == "11.50"
    group = tables(out)["Over seeds (mean ± sample std)"][0]
    assert group["n"] == "3"
    assert group["seeds"] == "0, 1, 5; not averaged: 2 (diverged), 3 (diverged), 4 (diverged)"
    medians = [statistics.median([50.0 + seed, 60.0, 70.0 + seed, 80.0]) for seed in (0, 1)] + [11.5]
    assert group["median last 20"] == f"{statistics.mean(medians):.2f} ± {statistics.stdev(medians):.2f}"
    assert "above 1e6 × its first epoch's Train Loss (or × 1 if that is smaller)" in out

    status, out, _ = run_results([blown, stopped], capsys)  # only diverged runs
    group = tables(out)["Over seeds (mean ± sample std)"][0]
    assert (group["n"], group["test @ best val"], group["median last 20"]) == ("0", "diverged", "diverged")


def test_csv_flags_diverged_runs_and_keeps_their_values(tmp_path, capsys):
    blown = make_run(tmp_path / "blown", epochs=3, loss=[2.0, 3.5e19, 1.0], status="finished")
    path = tmp_path / "runs.csv"
    run_results([blown, make_run(tmp_path / "new", logged=0, finished=False, status="running"), "--csv", str(path)],
                capsys)
    with open(path, newline="") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    blown, new = rows["blown"], rows["new"]
    assert (blown["diverged"], blown["diverged_epoch"], blown["state"]) == ("true", "2", "finished")
    assert float(blown["median_last20_test"]) == 11.0
    assert (new["state"], new["diverged"], new["epochs_done"], new["median_last20_test"]) == \
        ("running", "false", "0", "")


def test_a_seed_run_twice_counts_once_with_the_finished_run_or_the_longest(tmp_path, capsys):
    longer = make_run(tmp_path / "a-longer", seed=0, epochs=5, logged=3, finished=False, test=[10.0, 20.0, 30.0])
    shorter = make_run(tmp_path / "b-shorter", seed=0, epochs=5, logged=2, finished=False, test=[90.0, 90.0])
    other = make_run(tmp_path / "c-other", seed=1, epochs=5, logged=1, finished=False, test=[40.0])
    status, out, err = run_results([shorter, longer, other], capsys)
    assert err.splitlines() == [f"warning: MT on cifar10 with 250 labels: 2 runs share seed 0 ({shorter}, {longer}); "
                                f"the seed counts once, with {longer} (the one with the most epochs, 3)"]
    group = tables(out)["Over seeds (mean ± sample std)"][0]
    assert (group["n"], group["seeds"]) == ("2 (2 unfinished)", "0, 1")
    assert group["median last 20"] == f"{statistics.mean([20.0, 40.0]):.2f} ± {statistics.stdev([20.0, 40.0]):.2f}"
    twin = make_run(tmp_path / "a-twin", seed=0, epochs=5, logged=3, finished=False)
    status, out, err = run_results([longer, twin], capsys)
    assert err.endswith(f"the seed counts once, with {longer} (the first by path of equally far runs)\n")
    assert tables(out)["Over seeds (mean ± sample std)"][0]["n"] == "1 (1 unfinished)"
    blown = make_run(tmp_path / "a-blown", seed=0, epochs=5, logged=3, finished=False, loss=[1.0, 1.0, 2e6])
    status, out, err = run_results([blown, longer], capsys)
    assert err.endswith(f"the seed counts once, with {longer} (the one that did not diverge)\n")
    assert tables(out)["Over seeds (mean ± sample std)"][0]["seeds"] == "0"


@pytest.mark.parametrize("module", ["utils.results", "utils.plot"])
def test_help_answers_fast_without_torch_or_matplotlib(module):
    code = (f"import sys, {module} as tool\ntry:\n    tool.main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(name for name in ('torch', 'matplotlib') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "RUN_DIR" in done.stdout and done.stdout.splitlines()[-1] == "[]", done.stderr
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, check=True, capture_output=True, timeout=60)
    assert time.perf_counter() - start < 5


def test_plural_and_age():
    assert [results.plural(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    assert [results.age(s) for s in (5, 600, 7200, 86400, 3 * 86400)] == ["5 s", "10 min", "2 h", "24 h", "3 days"]
