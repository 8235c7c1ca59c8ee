"""Variants made as a user makes them (README "Trying a variant"): a copy of a script in a copy of the
repository, edited in that one file, trains, logs and resumes exactly — no shared file changes.

(a) L2I-O with a label generator φ of its own and its own optimizer (README's worked example, applied from
    the README's diff itself): killed with SIGKILL mid-run and resumed, it is bit-identical to a run that
    was never interrupted; (b) extra scalars of any name, recorded in some iterations only, reach
    tensorboard and the epoch line as their means; (c) the mean teacher evaluated as well, logged;
(d) a per-iteration lr schedule: the logged lr is the one the optimizer used.
"""
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.test_scripts import (REPO, RUN_OPTIONS, SCRIPT_ENV, assert_ok, assert_same_run, load, read_log,
                                read_scalars)
from tests.test_usability import repository_copy
from utils.evaluation import PROTOCOLS

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

AFLW_COLUMNS = [name for name, _ in PROTOCOLS["aflw"].columns]
ITERATIONS = int(RUN_OPTIONS[RUN_OPTIONS.index("--val-iteration") + 1])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return repository_copy(tmp_path_factory.mktemp("variants") / "repo")


def make_variant(repo, base, name, edits):
    """``train-<name>.py``: a copy of ``train-<base>.py`` with each (old, new) text replaced once."""
    text = (repo / f"train-{base}.py").read_text()
    for old, new in edits:
        assert text.count(old) == 1, f"the edit's anchor is not unique in train-{base}.py:\n{old}"
        text = text.replace(old, new)
    (repo / f"train-{name}.py").write_text(text)


def run_variant(repo, name, aflw_root, out, *extra):
    proc = subprocess.run([sys.executable, f"train-{name}.py", "--data-root", aflw_root, "--n-labeled", "0.2",
                           "--out", str(out), *RUN_OPTIONS, *map(str, extra)],
                          cwd=repo, env=SCRIPT_ENV, capture_output=True, text=True, timeout=600)
    assert_ok(proc)
    return proc


# ----------------------------------------------------------------------------- (a) README's worked example

def readme_variant_edits():
    """The (old, new) edits of the ``diff`` block in README's "Trying a variant": hunks separated by ``@@``
    lines; in each, lines starting with a space are context, ``-`` removed, ``+`` added."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Trying a variant"):]
    block = re.search(r"```diff\n(.*?)```", section, re.S).group(1)
    edits = []
    for hunk in re.split(r"^@@.*\n", block, flags=re.M):
        lines = hunk.splitlines()
        if not lines:
            continue
        old = "\n".join(line[1:] for line in lines if line[0] in " -")
        new = "\n".join(line[1:] for line in lines if line[0] in " +")
        edits.append((old, new))
    assert len(edits) >= 3
    return edits


def test_a_label_generator_of_its_own_resumes_exactly_after_sigkill(repo, aflw_root, tmp_path):
    make_variant(repo, "L2I-O", "PHI", readme_variant_edits())
    epochs = 3
    reference = tmp_path / "straight"
    run_variant(repo, "PHI", aflw_root, reference, "--epochs", epochs)
    state = load(reference / "checkpoint.pth.tar")
    assert {"label_generator", "label_optimizer"} <= set(state["kept"])
    assert state["kept"]["label_optimizer"]["state"], "φ's optimizer never stepped: no meta-gradient reached φ"

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train-PHI.py", "--data-root", aflw_root, "--n-labeled", "0.2",
                             "--out", str(killed), *RUN_OPTIONS, "--epochs", "50"],
                            cwd=repo, env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:   # the epoch line comes after the epoch's checkpoint
            if line.startswith("epoch 1/50"):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = load(killed / "checkpoint.pth.tar")["epoch"]
    assert 1 <= done < epochs
    run_variant(repo, "PHI", aflw_root, killed, "--resume", killed, "--epochs", epochs)
    assert_same_run(reference, killed)


# ----------------------------------------------------------------------------- (b), (c), (d) in one variant

K = ITERATIONS
EXTRA_EDITS = [
    # (b) a scalar of any name, recorded in odd iterations only, and one that first appears in iteration 2
    ("                book.record(**losses, lr=lr, lambda_u=weight)",
     "                book.record(**losses, lr=lr, lambda_u=weight)\n"
     "                if iteration % 2 == 1:\n"
     "                    book.record(odd_count=float(iteration))\n"
     "                if iteration >= 2:\n"
     "                    book.record(**{'labels/late': losses['loss_u'] * 0 + 7.0})"),
    # (c) the mean teacher evaluated too
    ("            book.evaluate_epoch(nets.student, nets.ema_eval.model)",
     "            book.evaluate_epoch(nets.student, nets.ema_eval.model)\n"
     "            book.evaluate(nets.mean_teacher.model, prefix='teacher')"),
    # (d) lr decays linearly within each epoch, set at every iteration
    ("                weight = unsup_weight(task, args, epoch, iteration, book.step)",
     "                lr = task.lr_at(epoch, args) * (1 - iteration / args.val_iteration)\n"
     "                set_lr(nets.optimizer, lr)\n"
     "                weight = unsup_weight(task, args, epoch, iteration, book.step)"),
]


@pytest.fixture(scope="module")
def extras_run(repo, aflw_root, tmp_path_factory):
    make_variant(repo, "MT", "EXTRAS", EXTRA_EDITS)
    folder = tmp_path_factory.mktemp("extras") / "run"
    proc = run_variant(repo, "EXTRAS", aflw_root, folder, "--epochs", 2)
    return folder, proc.stdout


def test_an_extra_scalar_of_any_name_is_logged_as_its_mean(extras_run):
    folder, stdout = extras_run
    scalars = read_scalars(folder)
    odd = [i for i in range(K) if i % 2 == 1]
    assert [v for _, v in scalars["train/odd_count"]] == [pytest.approx(np.mean(odd))] * 2
    assert [v for _, v in scalars["labels/late"]] == [pytest.approx(7.0)] * 2   # appeared in iteration 2
    assert len(re.findall(rf"^epoch \d/2 .*  odd_count {np.mean(odd):.4g}", stdout, re.M)) == 2, stdout


def test_the_mean_teacher_evaluated_as_well_is_logged(extras_run, aflw_root):
    folder, _ = extras_run
    scalars = read_scalars(folder)
    for split in ("val", "test"):
        for metric in ("loss", "me", "fr"):
            assert len(scalars[f"teacher/{split}_{metric}"]) == 2
    # It is the teacher's own evaluation: the last value equals evaluating the checkpoint's teacher.
    import torch
    from dataset.aflw import load_aflw
    from models.tcdcnn import TCDCNN
    from utils.tasks import AflwTask
    state = load(folder / "checkpoint.pth.tar")
    task = AflwTask()
    task.data = load_aflw(aflw_root, 0.2, rng_generator=torch.Generator().manual_seed(0))
    task.to(torch.device("cpu"))
    teacher = TCDCNN()
    teacher.load_state_dict(state["kept"]["mean_teacher"])
    args = type("Args", (), {"workers": 0, "batch_size": state["args"]["batch_size"]})
    expected = task.evaluate(teacher, task.eval_loader(task.data.test, args), torch.device("cpu"))["me"]
    assert scalars["teacher/test_me"][-1][1] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(read_log(folder, AFLW_COLUMNS)[-1]["Test ME."], rel=1e-6)


def test_a_per_iteration_lr_is_logged_as_used(extras_run):
    folder, _ = extras_run
    lr = load(folder / "checkpoint.pth.tar")["args"]["lr"]
    used = [lr * (1 - i / K) for i in range(K)]
    assert [v for _, v in read_scalars(folder)["train/lr"]] == [pytest.approx(np.mean(used))] * 2
    # The optimizer kept the last iteration's lr: nothing reset it at the epoch's start or end.
    groups = load(folder / "checkpoint.pth.tar")["kept"]["optimizer"]["param_groups"]
    assert groups[0]["lr"] == pytest.approx(used[-1])
