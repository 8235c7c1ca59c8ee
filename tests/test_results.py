"""The tools that show results: run tables, learning curves, the method diagram, the experiment grid.

The run folders come from short real runs of the training scripts on a tiny CIFAR-10, plus copies made
to look interrupted or damaged; every number the table shows is checked against log.txt parsed here.
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
from utils import experiments, plot, results
from utils.checkpoint import CHECKPOINT
from utils.logger import write_log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS, VAL_ITERATION = 3, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    assert status == 0 and err == ""
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


# ----------------------------------------------------------------------------- utils.plot, utils.diagram

def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000


def test_plot_draws_finished_and_in_progress_runs(runs, tmp_path, capsys):
    out = tmp_path / "figure" / "curves.png"
    status = plot.main([runs["mt-s0"], runs["mt-s1"], runs["sl-s0"], runs["mt-interrupted"], "-o", str(out)])
    assert status == 0 and "4 runs" in capsys.readouterr().out
    assert_png(out)
    only_in_progress = tmp_path / "in-progress.png"
    assert plot.main([runs["mt-interrupted"], "-o", str(only_in_progress)]) == 0
    assert_png(only_in_progress)


def test_plot_with_no_readable_run_is_an_error(tmp_path, capsys):
    assert plot.main([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()


def test_diagram_command_writes_a_png(tmp_path):
    out = tmp_path / "diagram.png"
    subprocess.run([sys.executable, "-m", "utils.diagram", "-o", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    assert_png(out)


# ----------------------------------------------------------------------------- utils.experiments

def printed_commands(*argv):
    done = subprocess.run([sys.executable, "-m", "utils.experiments", *argv], cwd=REPO, check=True,
                          capture_output=True, text=True)
    assert done.stderr == ""
    return [line.split() for line in done.stdout.splitlines()]


def option(command, flag):
    return command[command.index(flag) + 1]


def test_experiment_grid_has_the_papers_commands():
    commands = printed_commands()
    assert len(commands) == 4 * 5 + (1 + 5 * 4)
    assert len({option(c, "--out") for c in commands}) == len(commands)
    assert {c[1] for c in commands} == {"train-SL.py", "train-PL.py", "train-MT.py", "train-MM.py",
                                        "train-L2I-O.py", "train-L2I-L.py"}
    assert all(c[0] == "python" and option(c, "--gpu") == "0" and option(c, "--manualSeed") == "0" for c in commands)
    assert sum(option(c, "--n-labeled") == "-1" for c in commands) == 1
    assert ["python", "train-L2I-O.py", "--gpu", "0", "--n-labeled", "250", "--manualSeed", "0",
            "--out", "runs/cifar10L2IO@250-s0"] in commands
    assert {option(c, "--n-labeled") for c in commands if c[1] == "train-PL.py"} == {"0.01", "0.05", "0.1", "0.2"}


def test_experiment_grid_per_seed_gpu_and_filter():
    two_seeds = printed_commands("--print", "--seeds", "0", "1", "--gpu", "3")
    assert len(two_seeds) == 2 * 41 and len({option(c, "--out") for c in two_seeds}) == 2 * 41
    assert sum(option(c, "--n-labeled") == "-1" for c in two_seeds) == 2
    assert all(option(c, "--gpu") == "3" for c in two_seeds)
    l2io = printed_commands("--filter", "L2I-O")
    assert len(l2io) == 5 + 4 and all(c[1] == "train-L2I-O.py" for c in l2io)


def test_run_skips_finished_resumes_checkpointed_and_starts_the_rest(tmp_path):
    grid = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "cifar10MT@")
    finished, checkpointed, fresh = grid[0], grid[1], grid[2:]
    for e, name in ((finished, "summary.json"), (checkpointed, experiments.CHECKPOINT)):
        os.makedirs(e.out)
        open(os.path.join(e.out, name), "w").close()
    calls = []
    status = experiments.main(["--run", "--gpu", "1", "--root", str(tmp_path), "--filter", "cifar10MT@"],
                              runner=lambda command: calls.append(command) or 0)
    assert status == 0 and len(calls) == 1 + len(fresh)
    assert calls[0][1:] == [os.path.join(experiments.REPO, "train-MT.py"), "--resume", checkpointed.out,
                            "--gpu", "1"]
    assert [option(c, "--out") for c in calls[1:]] == [e.out for e in fresh]
    assert all(finished.out not in c and option(c, "--gpu") == "1" for c in calls)


def test_run_stops_when_a_run_is_interrupted_and_counts_failures(tmp_path):
    grid = experiments.select(experiments.grid([0], root=str(tmp_path)), "0", "cifar10MM@")
    calls = []
    assert experiments.run_all(grid, "0", runner=lambda c: calls.append(c) or 130) == 1 and len(calls) == 1
    assert experiments.run_all(grid, "0", runner=lambda c: 1) == len(grid)


def test_the_runner_returns_the_scripts_exit_status():
    assert experiments.run_child([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


def test_run_folder_file_names_match_the_training_code():
    assert (experiments.CHECKPOINT, experiments.SUMMARY) == (CHECKPOINT, results.SUMMARY)
