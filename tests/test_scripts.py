"""End-to-end tests of the training scripts through their real command line (docs/defaults.md §4, README "Monitoring and run folders").

Each script runs a few tiny epochs on the fixture datasets; the tests read back every file of the run
folder (docs/evaluation.md §1–§2: log.txt, tensorboard events, checkpoints; README "Monitoring and run folders": args.json, split.json,
summary.json), check that resuming (after a clean stop or a real Ctrl-C) reproduces the uninterrupted
run bit for bit on CPU (docs/faithfulness.md §2.13), and that user mistakes end in one line on stderr with nothing
created or changed on disk (docs/defaults.md §4).
"""
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dataset.cifar10 import read_cifar10
from models.tcdcnn import TCDCNN
from models.wideresnet import WideResNet
from utils.defaults import defaults

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
# One BLAS/OpenMP thread per script: on a busy 2-core machine more threads oversubscribe the cores and
# make these tiny batches many times slower. It also makes the CPU runs' reductions reproducible.
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")

BATCH, ITERATIONS = 8, 3
SAMPLES_PER_EPOCH = BATCH * ITERATIONS     # tensorboard x-axis step per epoch (docs/evaluation.md §1–§2)
RUN_OPTIONS = ["--batch-size", str(BATCH), "--val-iteration", str(ITERATIONS), "--gpu", "cpu", "--workers", "0",
               "--no-progress"]
CIFAR_OPTIONS = ["--n-val", "20"] + RUN_OPTIONS
CIFAR_EPOCHS, AFLW_EPOCHS = 3, 2
# Fixture sizes (tests/conftest.py): CIFAR 12 + 4 images per class; AFLW 60 train lines (54 + 6 validation).
CIFAR_TRAIN, CIFAR_TEST, CIFAR_N_VAL, CIFAR_N_LABELED = 120, 40, 20, 40
AFLW_TRAIN, AFLW_VALIDATION, AFLW_TEST = 54, 6, 12
AFLW_N_LABELED = {"SL": "-1", "MT": "0.2", "PL": "0.2"}

CIFAR_COLUMNS = ["Train Loss", "Train Loss X", "Train Loss U", "Valid Loss", "Valid Acc.", "Test Loss", "Test Acc."]
AFLW_COLUMNS = ["Train Loss", "Train Loss X", "Train Loss U", "Train ME", "Train FR", "Valid Loss", "Valid ME.",
                "Valid FR", "Test Loss", "Test ME.", "Test FR"]
# tensorboard tag → log.txt column holding the same number (docs/evaluation.md §1, §2)
CIFAR_TAGS = {"losses/train_loss": "Train Loss", "losses/valid_loss": "Valid Loss", "losses/test_loss": "Test Loss",
              "accuracy/train_acc": None, "accuracy/val_acc": "Valid Acc.", "accuracy/test_acc": "Test Acc."}
AFLW_TAGS = {"losses/train_loss": "Train Loss", "losses/valid_loss": "Valid Loss", "losses/test_loss": "Test Loss",
             "accuracy/train_me": "Train ME", "accuracy/val_me": "Valid ME.", "accuracy/test_me": "Test ME.",
             "accuracy/train_fr": "Train FR", "accuracy/val_fr": "Valid FR", "accuracy/test_fr": "Test FR"}
RUN_FILES = {"args.json", "split.json", "log.txt", "status.json", "checkpoint.pth.tar", "model_best.pth.tar",
             "summary.json"}

SCRIPT_RUNS = [("SL", "cifar10"), ("MT", "cifar10"), ("MM", "cifar10"), ("SL", "aflw"), ("MT", "aflw")]
if (REPO / "train-PL.py").is_file():
    SCRIPT_RUNS.append(("PL", "aflw"))



# ----------------------------------------------------------------------------- helpers

def cli(method, *args, timeout=600):
    """``python train-<method>.py ARGS`` from the repository root, as a user types it."""
    return subprocess.run([sys.executable, f"train-{method}.py", *map(str, args)], cwd=REPO, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def load_script(method):
    spec = importlib.util.spec_from_file_location(f"scripts_train_{method.replace('-', '_')}",
                                                  REPO / f"train-{method}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(method, argv, capsys, module=None):
    """Run ``main(argv)`` in-process; return (exit status, stdout, stderr). Status 0 when main returns."""
    module = module or load_script(method)
    capsys.readouterr()
    try:
        module.main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def main_exit_code(method, argv, capsys, module=None):
    """Run ``main(argv)`` in-process; return (exit status, stderr)."""
    code, _, err = run_in_process(method, argv, capsys, module)
    return code, err


def assert_one_error_line(stderr):
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(root):
    """Every file and folder under ``root`` with its size and modification time."""
    root = Path(root)
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def data_options(dataset, method, roots):
    if dataset == "cifar10":
        return ["--data-root", roots["cifar10"], "--n-labeled", str(CIFAR_N_LABELED)] + CIFAR_OPTIONS
    return ["--data-root", roots["aflw"], "--n-labeled", AFLW_N_LABELED[method]] + RUN_OPTIONS


def read_log(folder, columns):
    """log.txt in the authors' format; returns the rows as {column: value}."""
    text = (Path(folder) / "log.txt").read_text()
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert lines[0] == "".join(f"{c}\t" for c in columns), repr(lines[0])
    row_pattern = re.compile(r"^(-?\d+\.\d{6}\t){%d}$" % len(columns))
    rows = []
    for line in lines[1:]:
        assert row_pattern.match(line), repr(line)
        rows.append(dict(zip(columns, map(float, line.split("\t")[:-1]))))
    return rows


def read_scalars(folder):
    """Scalars as tensorboard itself reads the run folder: {tag: [(step, value), …]}."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a, b, where="state"):
    """Exact equality of nested checkpoint content (tensors with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(reference, other):
    """``other`` (stopped and resumed) reproduces ``reference`` (uninterrupted) exactly."""
    ref, res = load(reference / "checkpoint.pth.tar"), load(other / "checkpoint.pth.tar")
    for key in ("epoch", "step", "kept", "history", "best", "rng"):
        assert key in ref, key
        assert_identical(ref[key], res[key], key)
    assert_identical(load(reference / "model_best.pth.tar")["kept"],
                     load(other / "model_best.pth.tar")["kept"], "model_best")
    assert (reference / "log.txt").read_text() == (other / "log.txt").read_text()
    assert (reference / "split.json").read_text() == (other / "split.json").read_text()
    assert read_scalars(reference) == read_scalars(other)
    summaries = [json.loads((f / "summary.json").read_text()) for f in (reference, other)]
    for s in summaries:
        s.pop("wall_time_s")
    assert summaries[0] == summaries[1]


class Runs:
    """Uninterrupted reference runs, made once per module and shared by the tests that read them."""

    def __init__(self, base, roots):
        self.base, self.roots, self.done = base, roots, {}

    def options(self, method, dataset):
        return data_options(dataset, method, self.roots)

    def uninterrupted(self, method, dataset, epochs=None):
        epochs = epochs or (CIFAR_EPOCHS if dataset == "cifar10" else AFLW_EPOCHS)
        key = (method, dataset, epochs)
        if key not in self.done:
            folder = self.base / f"{dataset}{method}-{epochs}epochs"
            proc = cli(method, *self.options(method, dataset), "--epochs", epochs, "--out", folder)
            assert_ok(proc)
            self.done[key] = (folder, proc)
        return self.done[key][0]

    def stdout(self, method, dataset):
        self.uninterrupted(method, dataset)
        return self.done[(method, dataset, CIFAR_EPOCHS if dataset == "cifar10" else AFLW_EPOCHS)][1].stdout


@pytest.fixture(scope="module")
def roots(cifar10_root, aflw_root):
    return {"cifar10": cifar10_root, "aflw": aflw_root}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, roots):
    return Runs(tmp_path_factory.mktemp("runs"), roots)


def expected_epochs(dataset):
    return CIFAR_EPOCHS if dataset == "cifar10" else AFLW_EPOCHS


def columns_of(dataset):
    return CIFAR_COLUMNS if dataset == "cifar10" else AFLW_COLUMNS


# ----------------------------------------------------------------------------- the run folder

@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_run_folder_holds_exactly_the_documented_files(runs, method, dataset):
    folder = runs.uninterrupted(method, dataset)
    names = {p.name for p in folder.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == 1, names
    assert names - events == RUN_FILES, names
    epochs = expected_epochs(dataset)
    lines = [line for line in runs.stdout(method, dataset).splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == [f"{e}/{epochs}" for e in range(1, epochs + 1)]


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_args_json_records_the_resolved_options(runs, roots, method, dataset):
    folder = runs.uninterrupted(method, dataset)
    args = json.loads((folder / "args.json").read_text())
    expected = defaults(dataset, method)
    assert args["method"] == method and args["dataset"] == dataset
    assert args["n_labeled"] == float(CIFAR_N_LABELED if dataset == "cifar10" else AFLW_N_LABELED[method])
    assert (args["epochs"], args["batch_size"], args["val_iteration"]) == (expected_epochs(dataset), BATCH, ITERATIONS)
    assert args["data_root"] == roots[dataset] and Path(args["out"]) == folder
    for key in ("lr", "lambda_u", "rampup_length", "ema_decay", "ema_shrink", "eval_model", "manualSeed"):
        assert args[key] == expected[key], key
    if dataset == "cifar10":
        assert args["n_val"] == CIFAR_N_VAL
    if method == "MM":
        assert (args["alpha"], args["T"]) == (0.75, 0.5)
    assert args["versions"]["torch"] == torch.__version__
    assert args["versions"]["python"] == platform.python_version()
    assert "git_commit" in args
    assert args["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", args["git_commit"])


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_split_json_lists_the_split(runs, roots, method, dataset):
    split = json.loads((runs.uninterrupted(method, dataset) / "split.json").read_text())
    labeled, unlabeled, validation = split["labeled"], split["unlabeled"], split["validation"]
    if dataset == "cifar10":
        assert (len(labeled), len(unlabeled), len(validation)) == (40, 60, 20)
        assert sorted(labeled + unlabeled + validation) == list(range(CIFAR_TRAIN))   # disjoint, complete
        labels = read_cifar10(roots["cifar10"])[1]
        assert np.bincount(labels[labeled], minlength=10).tolist() == [4] * 10
        assert np.bincount(labels[validation], minlength=10).tolist() == [2] * 10
        assert split["test"] == CIFAR_TEST
    else:
        assert validation == list(range(AFLW_TRAIN, AFLW_TRAIN + AFLW_VALIDATION))    # the last 10 % of the list
        assert split["test"] == AFLW_TEST
        assert sorted(unlabeled) == list(range(AFLW_TRAIN))   # the unlabeled set is the whole training split
        if AFLW_N_LABELED[method] == "-1":
            assert labeled == list(range(AFLW_TRAIN))
        else:
            assert len(labeled) == round(0.2 * AFLW_TRAIN) == 11
            assert labeled == unlabeled[:11]                   # the first n of one permutation (docs/data.md §2)


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_log_txt_has_the_authors_columns_and_one_row_per_epoch(runs, method, dataset):
    rows = read_log(runs.uninterrupted(method, dataset), columns_of(dataset))
    assert len(rows) == expected_epochs(dataset)
    for row in rows:
        assert all(np.isfinite(v) for v in row.values())
        assert row["Train Loss"] > 0
        if dataset == "cifar10":
            assert 0 <= row["Valid Acc."] <= 100 and 0 <= row["Test Acc."] <= 100
        else:
            assert row["Valid ME."] > 0 and 0 <= row["Test FR"] <= 1
        if method == "SL":
            assert row["Train Loss U"] == 0 and row["Train Loss"] == row["Train Loss X"]


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_tensorboard_scalars_one_per_epoch(runs, method, dataset):
    folder = runs.uninterrupted(method, dataset)
    epochs = expected_epochs(dataset)
    rows = read_log(folder, columns_of(dataset))
    scalars = read_scalars(folder)
    tags = CIFAR_TAGS if dataset == "cifar10" else AFLW_TAGS
    schedules = ["train/lr"] + ([] if method == "SL" else ["train/lambda_u"])
    assert set(tags) | set(schedules) <= set(scalars), sorted(scalars)
    steps = [SAMPLES_PER_EPOCH * (e + 1) for e in range(epochs)]
    for tag in list(tags) + schedules:
        assert [step for step, _ in scalars[tag]] == steps, tag
    for tag, column in tags.items():
        if column is not None:
            assert [v for _, v in scalars[tag]] == pytest.approx([r[column] for r in rows], rel=1e-5, abs=2e-6), tag
    if dataset == "cifar10":
        assert all(0 <= v <= 100 for _, v in scalars["accuracy/train_acc"])
    args = json.loads((folder / "args.json").read_text())
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([args["lr"]] * epochs)
    if method == "SL":   # no unsupervised term, so no weight to log
        assert "train/lambda_u" not in scalars and "losses/train_loss_u" not in scalars
        return
    # λ_u logged for epoch e (the mean of its iterations' weights) lies between the weights at the start and
    # the end of that epoch (docs/method.md §2.2)
    for e, (_, value) in enumerate(scalars["train/lambda_u"]):
        if dataset == "cifar10":
            low, high = e, e + 1                                     # fractional epochs
        else:
            low, high = ITERATIONS * e, ITERATIONS * (e + 1)         # global iterations
        ramp = [min(max(p / args["rampup_length"], 0), 1) if args["rampup_length"] else 1 for p in (low, high)]
        assert args["lambda_u"] * ramp[0] - 1e-6 <= value <= args["lambda_u"] * ramp[1] + 1e-6, (e, value)
    assert scalars["train/lambda_u"][-1][1] > 0


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_checkpoints_load_with_weights_only(runs, method, dataset):
    folder = runs.uninterrupted(method, dataset)
    state = load(folder / "checkpoint.pth.tar")
    assert {"args", "epoch", "kept"} <= set(state)
    kept = state["kept"]
    # Each script keeps the networks its method uses, and only those (SL, PL and MM have no mean teacher).
    assert set(kept) == ({"student", "ema_eval", "mean_teacher", "optimizer"} if method in ("MT", "L2I-O", "L2I-L")
                         else {"student", "ema_eval", "optimizer"})
    assert state["epoch"] == expected_epochs(dataset)
    assert state["args"]["method"] == method
    model = WideResNet() if dataset == "cifar10" else TCDCNN()
    for name in set(kept) - {"optimizer"}:
        model.load_state_dict(kept[name])
    first = next(iter(kept["student"]))
    assert not torch.equal(kept["student"][first], kept["ema_eval"][first])  # trained, EMA lags
    best = load(folder / "model_best.pth.tar")
    model.load_state_dict(best["kept"]["student"])
    summary = json.loads((folder / "summary.json").read_text())
    assert best["epoch"] == summary["best_epoch"]


@pytest.mark.parametrize("method, dataset", SCRIPT_RUNS)
def test_summary_json_agrees_with_log_txt(runs, method, dataset):
    folder = runs.uninterrupted(method, dataset)
    summary = json.loads((folder / "summary.json").read_text())
    rows = read_log(folder, columns_of(dataset))
    if dataset == "cifar10":
        metric, val, test = "acc", [r["Valid Acc."] for r in rows], [r["Test Acc."] for r in rows]
        best = int(np.argmax(val))          # the first of equal values: a later one must be strictly better
    else:
        metric, val, test = "me", [r["Valid ME."] for r in rows], [r["Test ME."] for r in rows]
        best = int(np.argmin(val))
    assert (summary["method"], summary["dataset"], summary["metric"]) == (method, dataset, metric)
    assert summary["epochs"] == len(rows) and summary["finished"] is True
    assert summary["best_epoch"] == best + 1
    assert summary["best_val"] == pytest.approx(val[best], abs=1e-6)
    assert summary["test_at_best_val"] == pytest.approx(test[best], abs=1e-6)
    assert summary["median_last20_test"] == pytest.approx(float(np.median(test[-20:])), abs=1e-6)
    assert summary["mean_last20_test"] == pytest.approx(float(np.mean(test[-20:])), abs=1e-6)
    assert summary["wall_time_s"] > 0


# ----------------------------------------------------------------------------- resume (docs/faithfulness.md §2.13)

@pytest.mark.parametrize("method", ["SL", "MM"])   # MT: the real Ctrl-C test below
def test_stop_and_resume_reproduces_the_uninterrupted_run(runs, tmp_path, method):
    """Run B stops cleanly after 1 of 3 epochs and is resumed to 3: identical to the uninterrupted run A."""
    reference = runs.uninterrupted(method, "cifar10")
    folder = tmp_path / "resumed"
    assert_ok(cli(method, *runs.options(method, "cifar10"), "--epochs", 1, "--out", folder))
    assert load(folder / "checkpoint.pth.tar")["epoch"] == 1
    assert len(read_log(folder, CIFAR_COLUMNS)) == 1
    proc = cli(method, "--resume", folder, "--epochs", CIFAR_EPOCHS, "--gpu", "cpu", "--workers", 0, "--no-progress")
    assert_ok(proc)
    assert_same_run(reference, folder)


def as_earlier_layout(state):
    """A checkpoint as versions before the scripts owned their loops wrote it: four objects under fixed keys
    (a mean teacher even for SL, PL and MM), epoch records with ``lr``, ``lambda_u`` and ``other_…`` keys."""
    old = {k: v for k, v in state.items() if k not in ("format", "kept")}
    kept = state["kept"]
    old.update(state_dict=kept["student"], ema_state_dict=kept["ema_eval"], optimizer=kept["optimizer"],
               teacher_state_dict=kept.get("mean_teacher", kept["student"]))
    renamed = {"train_lr": "lr", "train_lambda_u": "lambda_u"}
    old["history"] = [{renamed.get(k, k.replace("other_model/", "other_")): v for k, v in row.items()}
                      for row in state["history"]]
    return old


@pytest.mark.parametrize("method", ["SL", "MT"])
def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(runs, tmp_path, method):
    """Runs started before the scripts owned their loops continue: their checkpoint's objects are taken by
    name (SL's unused mean teacher is dropped) and the resumed run equals the uninterrupted one."""
    reference = runs.uninterrupted(method, "aflw")
    folder = tmp_path / "earlier"
    assert_ok(cli(method, *runs.options(method, "aflw"), "--epochs", 1, "--out", folder))
    torch.save(as_earlier_layout(load(folder / "checkpoint.pth.tar")), folder / "checkpoint.pth.tar")
    assert_ok(cli(method, "--resume", folder, "--epochs", AFLW_EPOCHS, "--gpu", "cpu", "--no-progress"))
    assert_same_run(reference, folder)


def test_resume_refuses_a_script_that_keeps_other_objects(runs, tmp_path, capsys):
    """A script edited after its run started (here: it keeps one more tensor) cannot resume it exactly:
    one line, and the run folder is untouched."""
    folder = tmp_path / "run"
    assert_ok(cli("MT", *runs.options("MT", "aflw"), "--epochs", 1, "--out", folder))
    script = load_script("MT")
    real_build = script.build

    def build_with_an_extra_tensor(args, task, device):
        nets = real_build(args, task, device)
        nets.extra = torch.zeros(3)
        return nets
    script.build = build_with_an_extra_tensor
    before = snapshot(folder)
    code, err = main_exit_code("MT", ["--resume", folder, "--epochs", 2, "--gpu", "cpu", "--no-progress"], capsys,
                               module=script)
    assert code == 2
    line = assert_one_error_line(err)
    assert "extra" in line and "changed" in line
    assert snapshot(folder) == before


def test_ctrl_c_keeps_a_checkpoint_that_resumes_exactly(runs, tmp_path):
    """MT on CIFAR-10, interrupted by a real SIGINT in epoch 2 and resumed: identical to the uninterrupted
    run (this is also MT's resume bit-identity test, the harder variant of a clean stop after epoch 1)."""
    folder = tmp_path / "interrupted"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "train-MT.py", *runs.options("MT", "cifar10"), "--epochs", "50",
                                 "--out", str(folder)], cwd=REPO, env=SCRIPT_ENV, stdout=stdout, stderr=stderr)
        try:
            deadline = time.time() + 300
            # Wait until epoch 1 is complete: its log.txt row and its progress line (printed after the
            # checkpoint, the log and the tensorboard scalars are written) are there.
            while not ((folder / "log.txt").is_file() and len(read_log(folder, CIFAR_COLUMNS)) >= 1
                       and "epoch 1/50" in out.read_text()):
                assert proc.poll() is None, f"the run ended early:\n{err.read_text()}"
                assert time.time() < deadline, "no epoch finished within 300 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    message = err.read_text()
    assert code == 130, message
    assert "--resume" in message and "Traceback" not in message
    done = load(folder / "checkpoint.pth.tar")["epoch"]
    assert 1 <= done < 50
    status = json.loads((folder / "status.json").read_text())
    assert (status["state"], status["epochs_done"], status["epochs"]) == ("interrupted", done, 50)
    assert status["detail"] == f"Ctrl-C in epoch {done + 1}" and len(status["attempts"]) == 1
    assert len(read_log(folder, CIFAR_COLUMNS)) == done
    assert not (folder / "summary.json").exists()
    target = max(done + 1, CIFAR_EPOCHS)    # reuse the 3-epoch reference when it is long enough
    assert_ok(cli("MT", "--resume", folder, "--epochs", target, "--gpu", "cpu", "--workers", 0, "--no-progress"))
    reference = runs.uninterrupted("MT", "cifar10", epochs=target)
    assert_same_run(reference, folder)


def test_ctrl_c_between_the_logs_and_the_checkpoint_loses_and_doubles_no_scalars(roots, tmp_path, capsys,
                                                                                   monkeypatch):
    """An epoch's log row and scalars are written before its checkpoint; Ctrl-C in between leaves the
    previous checkpoint, so the resumed run redoes the epoch and must end with one value per epoch."""
    import utils.bookkeeping
    folder = tmp_path / "run"
    argv = data_options("aflw", "SL", roots) + ["--epochs", 2, "--out", folder]
    real_save = utils.bookkeeping.save_checkpoint
    calls = []

    def interrupted(state, *args, **kwargs):
        calls.append(state["epoch"])
        if state["epoch"] == 1:
            raise KeyboardInterrupt   # the signal lands as epoch 1's checkpoint is about to be written
        return real_save(state, *args, **kwargs)

    monkeypatch.setattr(utils.bookkeeping, "save_checkpoint", interrupted)
    code, err = main_exit_code("SL", argv, capsys)
    assert code == 130 and "--resume" in err
    assert calls == [0, 1]
    assert load(folder / "checkpoint.pth.tar")["epoch"] == 0
    assert set(s for values in read_scalars(folder).values() for s, _ in values) == {SAMPLES_PER_EPOCH}
    monkeypatch.setattr(utils.bookkeeping, "save_checkpoint", real_save)
    code, err = main_exit_code("SL", ["--resume", folder, "--gpu", "cpu", "--workers", 0, "--no-progress"],
                               capsys)
    assert code == 0, err
    scalars = read_scalars(folder)
    missing = {tag: [s for s, _ in values] for tag, values in scalars.items()
               if [s for s, _ in values] != [SAMPLES_PER_EPOCH, 2 * SAMPLES_PER_EPOCH]}
    assert not missing, f"tensorboard steps per tag after the resume (expected [24, 48]): {missing}"


# ----------------------------------------------------------------------------- refusing bad input (docs/defaults.md §4)

def test_without_cuda_the_note_comes_when_training_starts(roots, tmp_path):
    """No --gpu on a machine without CUDA: a data error is still one line; a run says CUDA is missing once,
    and its first line names the labeled images as a fraction and a count."""
    options = [o for o in RUN_OPTIONS if o != "--gpu" and o != "cpu"]
    missing = cli("MT", "--data-root", tmp_path / "nowhere", "--n-labeled", "0.2", *options)
    assert missing.returncode == 2 and "CUDA" not in missing.stderr
    assert_one_error_line(missing.stderr)
    proc = cli("MT", "--data-root", roots["aflw"], "--n-labeled", "0.2", *options, "--epochs", 1,
               "--out", tmp_path / "run")
    assert_ok(proc)
    assert proc.stderr.count("CUDA is not available: running on the CPU.") == 1
    assert proc.stdout.startswith(f"MT on aflw, 20 % labels ({round(0.2 * AFLW_TRAIN)} images), cpu"), proc.stdout


def test_refuses_to_overwrite_an_existing_run(runs, tmp_path):
    folder = tmp_path / "existing"
    shutil.copytree(runs.uninterrupted("MT", "aflw"), folder)
    before = snapshot(folder)
    proc = cli("MT", *runs.options("MT", "aflw"), "--epochs", AFLW_EPOCHS, "--out", folder)
    assert proc.returncode == 2
    line = assert_one_error_line(proc.stderr)
    assert str(folder) in line and "--resume" in line
    assert snapshot(folder) == before


def test_bad_input_is_one_line_on_stderr(roots, tmp_path):
    """Through the real command line (the in-process cases below cover the other mistakes)."""
    method, argv, says = "MT", ["--n-labeled", "45"], "--n-labeled"
    before = snapshot(roots["cifar10"])
    out = tmp_path / "run"
    proc = cli(method, "--data-root", roots["cifar10"], *CIFAR_OPTIONS, *argv, "--epochs", 1, "--out", out)
    assert proc.returncode != 0 and proc.returncode == 2
    assert says in assert_one_error_line(proc.stderr)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert snapshot(roots["cifar10"]) == before


BAD_INPUTS = {   # id: (script, dataset whose fixture is --data-root, argv, a word the message must contain)
    "n-labeled-zero": ("MT", "cifar10", ["--n-labeled", "0"], "--n-labeled"),
    "n-labeled-negative": ("MT", "cifar10", ["--n-labeled", "-5"], "--n-labeled"),
    "n-labeled-negative-aflw": ("SL", "aflw", ["--n-labeled", "-5"], "--n-labeled"),
    "n-labeled-more-than-train": ("MT", "cifar10", ["--n-labeled", "110"], "--n-labeled"),
    "n-labeled-more-than-train-aflw": ("MT", "aflw", ["--n-labeled", "100", "--dataset", "aflw"], "--n-labeled"),
    "n-labeled-not-divisible": ("MT", "cifar10", ["--n-labeled", "45"], "--n-labeled"),
    "unknown-dataset": ("MT", "cifar10", ["--dataset", "mnist", "--n-labeled", "40"], "mnist"),
    # (the later --data-root wins over the fixture's)
    "missing-cifar10": ("MT", "cifar10", ["--n-labeled", "40", "--data-root", "{tmp}/no-such-data"], "no-such-data"),
    "missing-aflw": ("SL", "aflw", ["--n-labeled", "-1", "--data-root", "{tmp}/no-aflw_release-2"],
                     "no-aflw_release-2"),
    "mixmatch-on-aflw": ("MM", "aflw", ["--dataset", "aflw", "--n-labeled", "0.2"], "aflw"),
    "mixmatch-inferred-aflw": ("MM", "aflw", ["--n-labeled", "0.2"], "aflw"),
    "zero-epochs": ("MT", "cifar10", ["--n-labeled", "40", "--epochs", "0"], "--epochs"),
    "batch-larger-than-labeled": ("MT", "cifar10", ["--n-labeled", "40", "--batch-size", "64"], "--batch-size"),
    "n-val-on-aflw": ("MT", "aflw", ["--n-labeled", "0.2", "--n-val", "10"], "--n-val"),
    "n-labeled-decimal-above-one": ("MT", "cifar10", ["--n-labeled", "1.5"], "fraction"),
    "bn-momentum-on-aflw": ("MT", "aflw", ["--n-labeled", "0.2", "--bn-momentum", "0.1"], "--bn-momentum"),
    "bn-momentum-out-of-range": ("MT", "cifar10", ["--n-labeled", "40", "--bn-momentum", "2"], "--bn-momentum"),
    "data-on-device-on-aflw": ("MT", "aflw", ["--n-labeled", "0.2", "--data-on-device"], "--data-on-device"),
    "sl-has-no-lambda-u": ("SL", "aflw", ["--n-labeled", "-1", "--lambda-u", "1"], "--lambda-u"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_and_touches_nothing(roots, tmp_path, capsys, monkeypatch, case):
    method, dataset, argv, says = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)   # anything written to a default path would land here and be seen
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    options = CIFAR_OPTIONS if dataset == "cifar10" else RUN_OPTIONS
    data_root = ["--data-root", roots[dataset]]
    before = {name: snapshot(root) for name, root in roots.items()}
    code, err = main_exit_code(method, data_root + options + ["--epochs", 1, "--out", tmp_path / "run"] + argv, capsys)
    assert code == 2, err
    assert says in assert_one_error_line(err)
    assert list(tmp_path.iterdir()) == []
    assert {name: snapshot(root) for name, root in roots.items()} == before


@pytest.fixture
def run_copy(runs, tmp_path):
    """A private copy of the finished MT AFLW run folder (small checkpoints, quick to load)."""
    folder = tmp_path / "copy"
    shutil.copytree(runs.uninterrupted("MT", "aflw"), folder)
    return folder


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_is_refused(run_copy, tmp_path, capsys, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    path = run_copy / "checkpoint.pth.tar"
    data = path.read_bytes()
    path.write_bytes(os.urandom(4096) if damage == "garbage" else data[:len(data) // 2])
    before = snapshot(tmp_path)
    code, err = main_exit_code("MT", ["--resume", run_copy, "--epochs", 5, "--gpu", "cpu", "--workers", 0], capsys)
    assert code == 2
    assert "checkpoint" in assert_one_error_line(err)
    assert snapshot(tmp_path) == before


RESUME_MISTAKES = {   # id: (script, extra argv, word in the message)
    "other-script": ("SL", ["--epochs", "5"], "MT"),
    "changed-option": ("MT", ["--epochs", "5", "--lr", "0.1"], "--lr"),
    "already-finished": ("MT", [], "--epochs"),
    "other-out": ("MT", ["--epochs", "5", "--out", "elsewhere"], "--out"),
    "no-checkpoint": ("MT", ["--epochs", "5", "--resume", "{tmp}/nothing-here"], "nothing-here"),
    "from-best-epoch": ("MT", ["--epochs", "5", "--resume", "{tmp}/copy/model_best.pth.tar"], "rewind"),
}


@pytest.mark.parametrize("case", RESUME_MISTAKES)
def test_mismatched_resume_is_refused(run_copy, tmp_path, capsys, monkeypatch, case):
    method, argv, says = RESUME_MISTAKES[case]
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    code, err = main_exit_code(method, ["--resume", run_copy, "--gpu", "cpu", "--workers", 0] + argv, capsys)
    assert code == 2, err
    assert says in assert_one_error_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name, content", [("random.bin", "random"), ("renamed.pth.tar", "checkpoint")])
def test_resume_of_a_file_that_is_not_the_runs_checkpoint_says_so(run_copy, tmp_path, capsys, monkeypatch, name,
                                                                    content):
    """Random bytes or a renamed copy of a checkpoint: "not a checkpoint of this repository's runs", not a
    rewind, and no suggested folder (the file's folder need not be a run)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_bytes(os.urandom(4096) if content == "random" else (Path(run_copy) / "checkpoint.pth.tar").read_bytes())
    before = snapshot(tmp_path)
    code, err = main_exit_code("MT", ["--resume", path, "--epochs", 5, "--gpu", "cpu"], capsys)
    line = assert_one_error_line(err)
    assert code == 2 and "not a checkpoint of this repository" in line and "rewind" not in line, line
    assert snapshot(tmp_path) == before


def test_resume_keeps_script_specific_options(runs, tmp_path, capsys, monkeypatch):
    """A MixMatch run started with ``--T 0.4`` must resume without repeating ``--T``: options the user
    does not give on ``--resume`` are taken from the run (README "Monitoring and run folders")."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mm"
    shutil.copytree(runs.uninterrupted("MM", "cifar10"), folder)
    state = load(folder / "checkpoint.pth.tar")
    state["args"]["T"] = 0.4          # as written by: train-MM.py --T 0.4 …
    torch.save(state, folder / "checkpoint.pth.tar")
    code, err = main_exit_code("MM", ["--resume", folder, "--epochs", CIFAR_EPOCHS + 1, "--gpu", "cpu",
                                      "--workers", 0, "--no-progress"], capsys)
    assert code == 0, f"resuming a run made with --T 0.4 was refused: {err.strip()}"
    resumed = load(folder / "checkpoint.pth.tar")
    assert resumed["epoch"] == CIFAR_EPOCHS + 1 and resumed["args"]["T"] == 0.4


# ----------------------------------------------------------------------------- non-finite loss

def test_exploding_loss_stops_with_epoch_and_iteration(roots, tmp_path):
    folder = tmp_path / "nan"
    proc = cli("SL", *data_options("aflw", "SL", roots), "--lr", "1e30", "--epochs", 2, "--out", folder)
    assert proc.returncode == 1, proc.stderr
    line = assert_one_error_line(proc.stderr)
    assert re.search(r"epoch \d+, iteration \d+", line), line
    assert str(folder) in line
    state = load(folder / "checkpoint.pth.tar")      # the last good checkpoint is intact
    assert state["epoch"] == 0
    TCDCNN().load_state_dict(state["kept"]["student"])
    assert all(torch.isfinite(t).all() for t in state["kept"]["student"].values())
    assert not (folder / "summary.json").exists()


def test_a_non_finite_loss_stops_the_run_at_the_next_check_even_without_progress(roots, tmp_path, capsys,
                                                                                  monkeypatch):
    """With --no-progress the losses are read at the latest every NONFINITE_CHECK_S seconds (set to 0 here):
    the run stops right after the iteration whose loss is NaN, not at the end of its epoch."""
    import utils.bookkeeping
    monkeypatch.setattr(utils.bookkeeping, "NONFINITE_CHECK_S", 0.0)
    script = load_script("MT")
    real_step, steps = script.train_step, []

    def nan_in_iteration_2(nets, batch, task, args, weight, step):
        steps.append(step)
        losses = real_step(nets, batch, task, args, weight, step)
        if step == 1:
            losses["loss"] = torch.tensor(float("nan"))
        return losses
    monkeypatch.setattr(script, "train_step", nan_in_iteration_2)
    code, err = main_exit_code("MT", data_options("aflw", "MT", roots) + ["--epochs", 1, "--val-iteration", 10,
                                                                          "--out", tmp_path / "run"],
                               capsys, module=script)
    assert code == 1 and "epoch 1, iteration 2" in assert_one_error_line(err)
    assert steps == [0, 1]


def test_a_run_that_takes_more_than_a_day_says_so_at_the_start(roots, tmp_path, capsys, monkeypatch):
    """After its first timed iterations, a run whose training left exceeds a day prints one line projecting
    it (here 10 million epochs of 3 iterations, projected after the first iteration; Ctrl-C in the third)."""
    import utils.bookkeeping
    monkeypatch.setattr(utils.bookkeeping, "PROJECTION_AFTER_S", 0.0)
    script = load_script("MT")
    real_step = script.train_step

    def interrupted_later(nets, batch, task, args, weight, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(nets, batch, task, args, weight, step)
    monkeypatch.setattr(script, "train_step", interrupted_later)
    options = data_options("aflw", "MT", roots) + ["--epochs", 10_000_000, "--out", tmp_path / "run"]
    code, _, err = run_in_process("MT", options, capsys, module=script)
    assert code == 130
    notes = [line for line in err.splitlines() if line.startswith("note: the ")]
    assert len(notes) == 1 and "29,999,999 training iterations left take about" in notes[0], err
    assert re.search(r"about \d+d\d\dh on this CPU", notes[0]), notes[0]


def test_no_non_finite_value_reaches_tensorboard(roots, tmp_path, capsys, monkeypatch):
    """A scalar that is not finite (here a recorded one) stays out of the events: tensorboardX would print
    "NaN or Inf found in input tensor" for it."""
    script = load_script("MT")
    real_step = script.train_step
    monkeypatch.setattr(script, "train_step", lambda *args: dict(real_step(*args), spread=torch.tensor(float("inf"))))
    folder = tmp_path / "run"
    code, out, err = run_in_process("MT", data_options("aflw", "MT", roots) + ["--epochs", 1, "--out", folder], capsys,
                                    module=script)
    assert code == 0, err
    assert "spread inf" in out and "NaN or Inf" not in out + err
    scalars = read_scalars(folder)
    assert "train/spread" not in scalars and "losses/train_loss" in scalars


def test_nan_loss_keeps_the_last_epoch_and_resumes_exactly(runs, roots, tmp_path, capsys, monkeypatch):
    """A NaN in epoch 2, iteration 2 stops the run; the epoch-1 checkpoint continues to the same result
    as a run that never failed."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "nan"
    script = load_script("MT")
    real_step = script.train_step

    def nan_in_epoch_2_iteration_2(nets, batch, task, args, weight, step):
        losses = real_step(nets, batch, task, args, weight, step)
        if step == ITERATIONS + 1:   # the global counter of epoch 2, iteration 2
            losses["loss"] = torch.tensor(float("nan"))
        return losses

    monkeypatch.setattr(script, "train_step", nan_in_epoch_2_iteration_2)
    code, err = main_exit_code("MT", data_options("aflw", "MT", roots) + ["--epochs", AFLW_EPOCHS, "--out", folder],
                               capsys, module=script)
    assert code == 1
    line = assert_one_error_line(err)
    assert "epoch 2, iteration 2" in line
    assert load(folder / "checkpoint.pth.tar")["epoch"] == 1
    assert len(read_log(folder, AFLW_COLUMNS)) == 1
    assert not (folder / "summary.json").exists()
    status = json.loads((folder / "status.json").read_text())
    assert (status["state"], status["epochs_done"]) == ("stopped", 1)
    assert "became nan in epoch 2, iteration 2" in status["detail"]
    code, err = main_exit_code("MT", ["--resume", folder, "--gpu", "cpu", "--workers", 0, "--no-progress"], capsys)
    assert code == 0, err
    assert_same_run(runs.uninterrupted("MT", "aflw"), folder)
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "finished" and [a["state"] for a in status["attempts"]] == ["stopped", "finished"]
