"""What a new user meets first: a copied script is its own method, the README's quick try learns, the
progress output in and out of a terminal, a quiet and fast start, options and their errors, and resumes
that keep the run's history.
"""
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataset.synthetic import make_aflw_release, make_cifar10
from tests.test_scripts import (CIFAR_OPTIONS, REPO, SCRIPT_ENV, assert_ok, assert_one_error_line,
                                load_script, run_in_process, snapshot)
from utils.defaults import available_cpus, data_workers
from utils.logger import EpochProgress
from utils.options import infer_dataset, labeled_amount


@pytest.fixture(scope="module")
def roots(cifar10_root, aflw_root):
    return {"cifar10": cifar10_root, "aflw": aflw_root}


def read_json(path):
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- a copied script is a new method

def repository_copy(destination):
    """The repository's files (not git, data, run folders or caches), as a user's clone would hold them."""
    ignored = shutil.ignore_patterns(".git", "data", "runs", "__pycache__", ".pytest_cache", "*.pth.tar", ".whl")
    shutil.copytree(REPO, destination, ignore=ignored)
    return destination


@pytest.mark.slow
def test_a_copied_script_is_its_own_method(roots, tmp_path):
    repo = repository_copy(tmp_path / "repo")
    shutil.copy(repo / "train-MT.py", repo / "train-MYVAR.py")

    def run(*argv):
        return subprocess.run([sys.executable, *map(str, argv)], cwd=repo, env=SCRIPT_ENV, capture_output=True,
                              text=True, timeout=600)
    help_text = " ".join(run("train-MYVAR.py", "--help").stdout.split())
    assert "MYVAR: a variant of Mean Teacher (train-MT.py)" in help_text and "cifar10MYVAR@250" in help_text
    assert "cifar10MT@" not in help_text
    options = ["--data-root", roots["cifar10"], "--n-labeled", 40, *CIFAR_OPTIONS]
    proc = run("train-MYVAR.py", *options, "--epochs", 1)   # no --out: the default folder is the method's
    assert_ok(proc)
    folder = repo / "cifar10MYVAR@40"
    assert proc.stdout.startswith("MYVAR on cifar10"), proc.stdout.splitlines()[0]
    args = read_json(folder / "args.json")
    assert (args["method"], args["based_on"], Path(args["out"]).name) == ("MYVAR", "MT", "cifar10MYVAR@40")
    assert read_json(folder / "summary.json")["method"] == "MYVAR"

    before = snapshot(folder)
    refused = run("train-MT.py", "--resume", folder, "--epochs", 2, "--gpu", "cpu", "--workers", 0)
    assert refused.returncode == 2
    line = assert_one_error_line(refused.stderr)
    assert "MYVAR" in line and "MT" in line
    assert snapshot(folder) == before

    results = run("-m", "utils.results", folder)
    assert_ok(results)
    rows = [row for row in results.stdout.splitlines() if "cifar10MYVAR@40" in row]
    assert rows and "| MYVAR " in rows[0], results.stdout
    bench = run("-m", "utils.benchmark", "--methods", "MYVAR", "--tasks", "aflw", "--iters", "1", "--warmup", "0",
                "--batch-size", "2", "--threads", "1")
    assert_ok(bench)
    assert re.search(r"^\| MYVAR \| aflw \|", bench.stdout, re.M), bench.stdout


# ----------------------------------------------------------------------------- the README's quick try
QUICK_TRY_AFLW_ME = 0.06   # generated AFLW: the untrained TCDCNN scores 0.065, the recipe reaches 0.052 (measured)

def readme_quick_try_commands():
    """The ``python train-…`` lines of README's section whose title says "quick try"."""
    readme = (REPO / "README.md").read_text()
    sections = re.split(r"^## ", readme, flags=re.M)
    section = next(s for s in sections if "quick try" in s.splitlines()[0].lower())
    return [line for line in section.splitlines() if line.startswith("python train-")]


@pytest.fixture(scope="module")
def quick_try_data(tmp_path_factory):
    """Generated data in the real formats with room for the README recipes: CIFAR-10 with 100 training
    images per class (250 labels, 500 validation images) and an AFLW release of 600 training lines."""
    root = tmp_path_factory.mktemp("quick-try")
    return {"cifar10": make_cifar10(str(root / "cifar10"), per_class_train=100, per_class_test=10),
            "aflw": str(make_aflw_release(root / "aflw", n_train=600, n_test=100))}


@pytest.mark.slow
def test_readme_quick_try_learns(quick_try_data, tmp_path):
    """The README's quick-try commands, as written except for where the data is and the run goes, learn on
    generated data: CIFAR-10 ends well above chance (10 %) — with the authors' batch-norm momentum the
    same short run would evaluate at chance, which is what the recipe exists to avoid — and AFLW's mean
    error ends below QUICK_TRY_AFLW_ME."""
    commands = readme_quick_try_commands()
    assert {infer_dataset(labeled_amount(shlex.split(c)[shlex.split(c).index("--n-labeled") + 1]))
            for c in commands} == {"cifar10", "aflw"}, commands
    for command in commands:
        argv = shlex.split(command)[1:]
        dataset = infer_dataset(labeled_amount(argv[argv.index("--n-labeled") + 1]))
        assert "--ema-decay" in argv and ("--bn-momentum" in argv) == (dataset == "cifar10")
        out = tmp_path / Path(argv[argv.index("--out") + 1]).name
        argv[argv.index("--out") + 1] = str(out)
        env = dict(SCRIPT_ENV, OMP_NUM_THREADS="2")   # the one long run of the suite: both cores
        proc = subprocess.run([sys.executable, *argv, "--data-root", quick_try_data[dataset]], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert_ok(proc)
        summary = read_json(out / "summary.json")
        if dataset == "cifar10":
            assert summary["metric"] == "acc" and summary["test_at_best_val"] >= 50.0, summary
            assert re.search(r"^epoch 3/3 .* test acc", proc.stdout, re.M), proc.stdout
        else:
            assert summary["metric"] == "me" and summary["test_at_best_val"] < QUICK_TRY_AFLW_ME, summary


# ----------------------------------------------------------------------------- seeing progress

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_fits_80_columns(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    # The widest labels with the longest run still ahead (1023 more epochs), as a conservative worst case.
    progress = EpochProgress(1024, 1024, 1024, enabled=True, later_iterations=1023 * 1024)
    assert progress.mode == "bar"
    for done, seconds, loss in ((1, 12.3, 123.456), (512, 0.123, 0.012345), (1024, 9.99, 1.5)):
        progress.show(done, seconds, loss)
    progress.finish()
    lines = [line for line in re.split(r"[\r\n]", terminal.getvalue().replace("\x1b[?25l", "")
                                       .replace("\x1b[?25h", "")) if line.strip()]
    assert len(lines) == 3 and all("Epoch 1024/1024" in line and " run " in line for line in lines), lines
    assert max(len(line.rstrip()) for line in lines) <= 80, max(lines, key=len)


def small_run(roots, out, *extra):
    return (["--data-root", roots["aflw"], "--n-labeled", "0.2", "--batch-size", 8, "--val-iteration", 3,
             "--gpu", "cpu", "--workers", 0, "--epochs", 2, "--out", out, *extra])


def test_every_mode_prints_two_lines_per_epoch(roots, tmp_path, capsys, monkeypatch):
    """A bar on a terminal; plain progress lines when stdout is not one (a log file), both with the time left
    in the epoch and the run; neither with --no-progress. Every finished epoch prints two lines in all three
    (README "Monitoring and run folders"): its timing and its metrics."""
    epoch_lines = re.compile(r"^epoch [12]/2  train loss \S+  valid me \S+  test me \S+$", re.M)
    monkeypatch.setattr(EpochProgress, "PLAIN_EVERY_S", 0.0)   # a progress line at every iteration
    monkeypatch.setattr(EpochProgress, "BAR_REFRESH_S", 0.0)
    outputs = {}
    for mode, extra in (("plain", []), ("none", ["--no-progress"]), ("bar", [])):
        if mode == "bar":
            monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
        code, outputs[mode], err = run_in_process("MT", small_run(roots, tmp_path / mode, *extra), capsys)
        assert code == 0, err
    for mode, out in outputs.items():
        assert len(epoch_lines.findall(out)) == 2, (mode, out)
    progress_lines = r"^  epoch 1/2: iteration (\d)/3, .*, run in \S+$"
    assert re.findall(progress_lines, outputs["plain"], re.M) == ["1", "2", "3"]
    lines = outputs["none"].splitlines()
    first_summary = next(i for i, line in enumerate(lines) if line.startswith("Test "))
    assert len(lines[1:first_summary]) == 2 * 2, lines   # after the run's first line: two per epoch
    assert all(re.match(r"^  \S+ s per iteration, of which waiting for data", line) for line in lines[1:first_summary:2])
    assert "\r" not in outputs["plain"] and "\r" not in outputs["none"]
    assert not re.search(r"iteration \d/3", outputs["none"])
    assert "Epoch 1/2 |" in outputs["bar"] and "\r" in outputs["bar"]


def test_losses_are_read_from_the_device_once_per_epoch_without_progress(roots, tmp_path, capsys, monkeypatch):
    """Reading a loss makes the CPU wait for a GPU: with no progress shown the epoch's losses are read once."""
    from utils import bookkeeping
    reads = []
    real_means = bookkeeping.EpochScalars.means
    monkeypatch.setattr(bookkeeping.EpochScalars, "means",
                        lambda self, done: reads.append(done) or real_means(self, done))
    code, _, err = run_in_process("MT", small_run(roots, tmp_path / "run", "--no-progress"), capsys)
    assert code == 0, err
    assert reads == [3, 3]   # two epochs of three iterations: one read at the end of each


# ----------------------------------------------------------------------------- quiet, fast start

def test_workers_never_exceed_the_cpus():
    cpus = available_cpus()
    assert data_workers(16, False, "aflw", on_gpu=False) == min(16, cpus)
    assert data_workers(0, False, "cifar10", on_gpu=False) == 0            # the authors' in-process loading
    assert data_workers(0, False, "cifar10", on_gpu=True) == min(4, cpus)  # a GPU would wait for it
    assert data_workers(0, True, "cifar10", on_gpu=True) == 0              # what the user asked for
    assert data_workers(10 * cpus, True, "aflw", on_gpu=False) == cpus


def test_an_l2i_run_with_default_workers_is_quiet(roots, tmp_path):
    """No DataLoader warning about too many workers, no deprecation warning from inside PyTorch's
    forward-mode AD; args.json records the workers used."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train-L2I-O.py", "--data-root", roots["aflw"], "--n-labeled", "0.2",
                           "--batch-size", "8", "--val-iteration", "2", "--epochs", "1", "--gpu", "cpu",
                           "--no-progress", "--out", str(out)], cwd=REPO, env=SCRIPT_ENV, capture_output=True,
                          text=True, timeout=600)
    assert_ok(proc)
    assert proc.stderr == "", proc.stderr
    assert read_json(out / "args.json")["workers"] == min(8, available_cpus())


PROBE = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("PyTorch imported" if "torch" in sys.modules else "PyTorch not imported", file=sys.stderr)
"""


@pytest.mark.parametrize("method", ["SL", "PL", "MT", "MM", "L2I-O", "L2I-L"])
@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["--n-labeled", "7"], 2), (["--n-labeled", "1.5"], 2),
                                          (["--no-such-option"], 2)])
def test_help_and_option_errors_answer_before_pytorch_loads(method, argv, status, tmp_path):
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, str(REPO / f"train-{method}.py"), *argv], cwd=tmp_path,
                          env=dict(SCRIPT_ENV, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == "PyTorch not imported", proc.stderr
    if status:
        assert len(lines) == 2 and lines[0].startswith("error:"), proc.stderr
    else:
        assert proc.stdout.startswith("usage:")
    assert seconds < 3.0, seconds   # importing PyTorch alone takes 2-4 s here; this takes ~0.1 s
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- options and their errors

def test_n_labeled_integer_is_a_count_and_decimal_a_fraction():
    assert labeled_amount("250") == 250 and isinstance(labeled_amount("250"), int)
    assert labeled_amount("-1") == -1
    assert labeled_amount("0.01") == 0.01
    assert labeled_amount("1.0") == -1     # the whole training set, as -1
    for bad in ("0", "-5", "1.5", "0.0", "-0.5", "nan", "many"):
        with pytest.raises(Exception):
            labeled_amount(bad)


def test_n_labeled_one_point_zero_is_all_of_aflw():
    from utils.options import finalize
    args = finalize(load_script("MT").parse_args(["--n-labeled", "1.0"]), "MT", "cifar10")
    assert (args.dataset, args.n_labeled, args.out) == ("aflw", -1, "aflwMT@-1")


def help_entries(method):
    """``--help`` of a script as {option: its help text}."""
    text = subprocess.run([sys.executable, f"train-{method}.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60).stdout
    entries = {}
    for match in re.finditer(r"^  (--[\w-]+)(.*?)(?=^  -|^\S|\Z)", text, re.M | re.S):
        entries[match.group(1)] = " ".join(match.group(2).split())
    return entries


def test_help_shows_each_default_per_task():
    mt = help_entries("MT")
    assert "(default 1024 on CIFAR-10, 150 on AFLW)" in mt["--epochs"]
    assert "(default 250 on CIFAR-10, 0.01 on AFLW)" in mt["--n-labeled"]
    assert "(default 50 on CIFAR-10, 75 on AFLW)" in mt["--lambda-u"]
    assert "decimal point is a fraction" in mt["--n-labeled"] and "1.0 = all" in mt["--n-labeled"]
    for option in ("--n-labeled", "--data-root", "--epochs", "--val-iteration", "--batch-size", "--lr",
                   "--ema-decay", "--ema-shrink", "--lambda-u", "--rampup-length", "--eval-model", "--manualSeed",
                   "--workers", "--n-val", "--bn-momentum"):
        assert "default" in mt[option], option
    l2io = help_entries("L2I-O")
    assert "(default 50 on CIFAR-10, 10 on AFLW)" in l2io["--virtual-step"]
    assert "(default 0.75)" in help_entries("MM")["--alpha"]


def test_options_a_method_does_not_use_are_not_offered():
    sl = help_entries("SL")
    assert "--lambda-u" not in sl and "--rampup-length" not in sl
    assert "--lambda-u" in help_entries("PL")
    assert "--virtual-step" not in help_entries("MT")


# ----------------------------------------------------------------------------- resume keeps history

def test_resume_accepts_any_spelling_of_the_data_root_and_keeps_args_json_history(roots, tmp_path, capsys,
                                                                                     monkeypatch):
    data = Path(roots["aflw"])
    monkeypatch.chdir(data.parent)
    folder = tmp_path / "run"
    commands = [["train-MT.py", *small_run(roots, folder)[:-2], "--epochs", 1, "--out", folder],
                ["train-MT.py", "--resume", folder, "--epochs", 2, "--data-root", f"{data}/"],
                ["train-MT.py", "--resume", folder, "--epochs", 3, "--data-root", f"./{data.name}"]]
    for command in commands:
        monkeypatch.setattr(sys, "argv", [str(a) for a in command])
        code, _, err = run_in_process("MT", command[1:], capsys)
        assert code == 0, err
    args = read_json(folder / "args.json")
    assert args["command"] == " ".join(map(str, commands[0]))
    assert [r["command"] for r in args["resumes"]] == [" ".join(map(str, c)) for c in commands[1:]]
    for record in args["resumes"]:
        assert set(record) == {"command", "git_commit", "time"} and re.match(r"\d{4}-\d\d-\d\dT", record["time"])
    assert args["started"] <= args["resumes"][0]["time"] <= args["resumes"][1]["time"]
    assert args["epochs"] == 3 and args["data_root"] == str(data)
