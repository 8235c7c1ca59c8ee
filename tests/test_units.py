"""Unit facts of docs/ (docs/method.md §2, docs/models.md §1, docs/data.md §1) for the shared training machinery.

WRN-28-2 size and its dead BN parameters, the BN interleave, both EMA models, the ramp-up of the
unsupervised weight at the real per-task defaults, the CIFAR-10 split and augmentation, the
``--dataset`` inference and default run-folder names, and atomic checkpoints.
"""
import importlib.util
import os
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataset.cifar10 import augment, split_indices
from models.wideresnet import WideResNet
from utils.checkpoint import BEST, CHECKPOINT, load_checkpoint, save_checkpoint
from utils.defaults import defaults
from utils.ema import EvalEMA
from utils.errors import UserError
from utils.interleave import interleave, interleave_offsets, interleaved_forward
from utils.options import SPEED_FLAGS, finalize, infer_dataset
from utils.schedules import linear_rampup
from utils.tasks import AflwTask, Cifar10Task
from utils.schedules import unsup_weight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def load_script(method):
    """A ``train-<method>.py`` as a module (importing it must run nothing)."""
    spec = importlib.util.spec_from_file_location(f"units_train_{method.replace('-', '_')}",
                                                  os.path.join(REPO, f"train-{method}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defaults_run(task, method):
    """The networks the script of ``method`` builds (its own ``build``) from the task's real defaults (speed
    flags off, as ``utils.options.finalize`` leaves them)."""
    args = SimpleNamespace(**defaults(task.name, method), **dict.fromkeys(SPEED_FLAGS, False))
    torch.manual_seed(0)
    return load_script(method).build(args, task, torch.device("cpu"))


# --- WRN-28-2 (docs/models.md §1) ----------------------------------------------------------------------

def test_wrn_28_2_size():
    model = WideResNet(num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 1_469_626
    assert len(list(model.parameters())) == 107
    assert len(list(model.buffers())) == 75


def test_wrn_exactly_the_four_dead_bn_tensors_get_no_gradient():
    torch.manual_seed(0)
    model = WideResNet(num_classes=10).train()
    model(torch.randn(2, 3, 32, 32)).logsumexp(dim=1).sum().backward()
    no_grad = sorted(name for name, p in model.named_parameters() if p.grad is None)
    assert no_grad == sorted(f"block{b}.layer.0.bn1.{w}" for b in (2, 3) for w in ("weight", "bias"))
    assert all(p.grad.abs().sum() > 0 for name, p in model.named_parameters() if name not in no_grad)


# --- BN interleave (docs/method.md §2.3) -------------------------------------------------------------------

@pytest.mark.parametrize("k, groups", [(2, [32, 32]), (3, [21, 21, 22])])
def test_interleave_groups_and_round_trip(k, groups):
    batch_size = 64
    offsets = interleave_offsets(batch_size, k)
    assert [b - a for a, b in zip(offsets, offsets[1:])] == groups
    # Row r of batch j holds the value 1000·j + r, so every row says where it came from.
    batches = [torch.arange(batch_size, dtype=torch.float32)[:, None].repeat(1, 3) + 1000 * j for j in range(k)]
    mixed = interleave(batches, batch_size)
    for j in range(k):
        for p in range(k):
            rows = mixed[j][offsets[p]:offsets[p + 1], 0]
            if j == 0:
                source = p            # batch 0 received group p of batch p
            else:
                source = 0 if p == j else j   # batch j gave its group j to batch 0
            assert torch.equal(rows, batches[source][offsets[p]:offsets[p + 1], 0]), (j, p)
    restored = interleave(mixed, batch_size)
    assert all(torch.equal(a, b) for a, b in zip(restored, batches))
    # Through k separate forwards of a row-wise model, the outputs come back in the original order.
    outputs = interleaved_forward(lambda x: 2 * x + 1, batches)
    assert all(torch.equal(o, 2 * b + 1) for o, b in zip(outputs, batches))


# --- EMA-T, the mean teacher (docs/method.md §2.1) ---------------------------------------------------------

def test_mean_teacher_decay_sequence():
    teacher = defaults_run(Cifar10Task(), "MT").mean_teacher
    assert [teacher.decay_at(t) for t in range(4)] == pytest.approx([0.0, 0.5, 2 / 3, 0.75])
    assert teacher.decay_at(998) == pytest.approx(1 - 1 / 999) and teacher.decay_at(998) < 0.999
    for t in (999, 1000, 5000, 10 ** 6):
        assert teacher.decay_at(t) == pytest.approx(0.999, abs=1e-12)


def test_mean_teacher_equals_student_after_first_update():
    run = defaults_run(Cifar10Task(), "MT")
    with torch.no_grad():
        for p in run.student.parameters():
            p.add_(torch.randn_like(p))
    teacher_before = [p.clone() for p in run.mean_teacher.model.parameters()]
    run.mean_teacher.update(run.student, 0)
    for t, s, before in zip(run.mean_teacher.model.parameters(), run.student.parameters(), teacher_before):
        assert torch.equal(t, s)
        assert not torch.equal(t, before)
    # t = 1: β = 0.5, half way towards the student.
    with torch.no_grad():
        for p in run.student.parameters():
            p.add_(1.0)
    teacher_before = [p.clone() for p in run.mean_teacher.model.parameters()]
    run.mean_teacher.update(run.student, 1)
    for t, s, before in zip(run.mean_teacher.model.parameters(), run.student.parameters(), teacher_before):
        torch.testing.assert_close(t, 0.5 * before + 0.5 * s)


# --- EMA-E, the evaluated model (docs/method.md §2.1, docs/faithfulness.md §1.1) ---------------------------------------------

def test_eval_ema_starts_with_student_parameters_and_fresh_bn_buffers():
    student = WideResNet()
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(3.0)
                m.running_var.mul_(2.0)
    ema = EvalEMA(student, 0.999, 4e-5)
    for a, b in zip(ema.model.parameters(), student.parameters()):
        assert torch.equal(a, b) and not a.requires_grad
    for name, buf in ema.model.named_buffers():
        expected = {"running_mean": 0.0, "running_var": 1.0, "num_batches_tracked": 0}[name.rsplit(".", 1)[1]]
        assert torch.all(buf == expected), name


def test_eval_ema_update_and_student_shrink_on_cifar10_defaults():
    expected = defaults("cifar10", "MT")
    assert expected["lr"] == 0.002 and expected["ema_shrink"] == 0.02 and expected["ema_decay"] == 0.999
    run = defaults_run(Cifar10Task(), "MT")
    with torch.no_grad():
        for p in run.student.parameters():
            p.add_(torch.randn_like(p))
    ema_before = [p.clone() for p in run.ema_eval.model.parameters()]
    student_before = [p.clone() for p in run.student.parameters()]
    run.ema_eval.update(run.student)
    for e, e0, s0 in zip(run.ema_eval.model.parameters(), ema_before, student_before):
        torch.testing.assert_close(e, e0 + (1 - 0.999) * (s0 - e0), rtol=1e-5, atol=1e-6)
        assert not torch.equal(e, e0)
    for s, s0 in zip(run.student.parameters(), student_before):
        assert torch.equal(s, s0 * (1 - 0.02 * 0.002))  # = 1 - 4e-5, every parameter incl. BN and biases


def test_eval_ema_never_shrinks_the_student_on_aflw():
    run = defaults_run(AflwTask(), "MT")
    with torch.no_grad():
        for p in run.student.parameters():
            p.add_(torch.randn_like(p))
    student_before = [p.clone() for p in run.student.parameters()]
    run.ema_eval.update(run.student)
    assert all(torch.equal(s, s0) for s, s0 in zip(run.student.parameters(), student_before))


def test_eval_ema_copy_buffers_copies_bn_buffers_only():
    run = defaults_run(Cifar10Task(), "MT")
    with torch.no_grad():
        for p in run.student.parameters():
            p.add_(1.0)
        for m in run.student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    ema_params = [p.clone() for p in run.ema_eval.model.parameters()]
    run.ema_eval.copy_buffers(run.student)
    student_buffers = dict(run.student.named_buffers())
    for name, buf in run.ema_eval.model.named_buffers():
        assert torch.equal(buf, student_buffers[name]), name
    assert all(torch.equal(a, b) for a, b in zip(run.ema_eval.model.parameters(), ema_params))
    assert not any(torch.equal(a, b) for a, b in zip(run.ema_eval.model.parameters(), run.student.parameters()))


# --- ramp-up of the unsupervised weight (docs/method.md §2.2), at the real defaults -------------------

def weight_at(task, method, epoch=0, iteration=0, step=0):
    return unsup_weight(task, SimpleNamespace(**defaults(task.name, method)), epoch, iteration, step)


def test_ramp_defaults_per_task_and_method():
    for method in ("MT", "L2I-O", "L2I-L"):
        d = defaults("cifar10", method)
        assert (d["lambda_u"], d["rampup_length"], d["val_iteration"]) == (50.0, pytest.approx(409.6), 1024)
    d = defaults("cifar10", "MM")
    assert (d["lambda_u"], d["rampup_length"]) == (75.0, 16.0)
    for method in ("PL", "MT", "L2I-O", "L2I-L"):
        d = defaults("aflw", method)
        assert (d["lambda_u"], d["rampup_length"]) == (75.0, 9000.0)


def test_ramp_values_classification_mt():
    d = defaults("cifar10", "MT")
    assert d["lambda_u"] * linear_rampup(204.8, d["rampup_length"]) == pytest.approx(25.0)
    # e + i/1024 with i = 819: 204.7998… epochs of progress.
    assert weight_at(Cifar10Task(), "MT", epoch=204, iteration=819) == pytest.approx(25.0, abs=1e-3)
    assert weight_at(Cifar10Task(), "MT", epoch=204, iteration=819) < 25.0
    assert weight_at(Cifar10Task(), "MT", epoch=0, iteration=0) == 0.0
    assert weight_at(Cifar10Task(), "MT", epoch=409, iteration=615) == 50.0      # 409.6006 ≥ 409.6: clipped
    assert weight_at(Cifar10Task(), "MT", epoch=1023, iteration=1023) == 50.0


def test_ramp_values_classification_mm():
    assert weight_at(Cifar10Task(), "MM", epoch=8) == pytest.approx(37.5)
    assert weight_at(Cifar10Task(), "MM", epoch=16) == 75.0
    assert weight_at(Cifar10Task(), "MM", epoch=4, iteration=512) == pytest.approx(75 * 4.5 / 16)


def test_ramp_values_regression():
    assert weight_at(AflwTask(), "MT", step=4500) == pytest.approx(37.5)
    assert weight_at(AflwTask(), "PL", step=4500) == pytest.approx(37.5)
    assert weight_at(AflwTask(), "MT", step=0) == 0.0   # first iteration: t read before it advances
    assert weight_at(AflwTask(), "MT", step=9000) == 75.0
    # progress is global iterations, not epochs: the epoch/iteration fields do not matter
    assert weight_at(AflwTask(), "MT", epoch=30, iteration=10, step=4500) == pytest.approx(37.5)
    assert weight_at(AflwTask(), "SL", step=4500) == 0.0


def test_linear_rampup_clips_and_handles_zero_length():
    assert linear_rampup(-3, 10) == 0.0
    assert linear_rampup(5, 10) == 0.5
    assert linear_rampup(30, 10) == 1.0
    assert linear_rampup(5, 0) == 1.0


# --- CIFAR-10 split (docs/data.md §1.2) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_labels():
    """50 000 labels, 5 000 per class, in a fixed shuffled order (as torchvision's training set)."""
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 5000))


def seeded_split(labels, n_labeled, n_val, seed):
    np.random.seed(seed)
    return split_indices(labels, n_labeled, n_val)


def test_cifar_split_sizes_per_class_and_disjointness(cifar_labels):
    split = seeded_split(cifar_labels, 250, 5000, seed=0)
    labeled, unlabeled, validation = split["labeled"], split["unlabeled"], split["validation"]
    assert (len(labeled), len(unlabeled), len(validation)) == (250, 44_750, 5000)
    assert Counter(cifar_labels[labeled].tolist()) == {c: 25 for c in range(10)}
    assert Counter(cifar_labels[validation].tolist()) == {c: 500 for c in range(10)}
    assert Counter(cifar_labels[unlabeled].tolist()) == {c: 4475 for c in range(10)}
    assert not set(labeled) & set(unlabeled) and not set(labeled) & set(validation)
    assert not set(unlabeled) & set(validation)
    assert sorted(labeled + unlabeled + validation) == list(range(50_000))
    assert all(isinstance(i, int) for i in labeled[:5])  # json-serialisable for split.json


def test_cifar_split_is_deterministic_per_seed_and_differs_across_seeds(cifar_labels):
    a = seeded_split(cifar_labels, 250, 5000, seed=0)
    b = seeded_split(cifar_labels, 250, 5000, seed=0)
    c = seeded_split(cifar_labels, 250, 5000, seed=1)
    assert a == b
    assert a["labeled"] != c["labeled"] and set(a["labeled"]) != set(c["labeled"])
    assert set(a["validation"]) != set(c["validation"])


@pytest.mark.parametrize("n_labeled", [45, 5, 0, 44_001])
def test_cifar_split_labeled_count_must_divide_into_classes_and_fit(cifar_labels, n_labeled):
    np.random.seed(0)
    with pytest.raises(UserError, match="n-labeled"):
        split_indices(cifar_labels, n_labeled, 5000)


def test_cifar_split_all_labels(cifar_labels):
    split = seeded_split(cifar_labels, -1, 5000, seed=0)
    assert len(split["labeled"]) == 45_000 and set(split["unlabeled"]) == set(split["labeled"])
    assert len(split["validation"]) == 5000


# --- CIFAR-10 augmentation (docs/data.md §1.4): crop offsets 0…7, flip p = 0.5 ----------------------------

def test_cifar_augmentation_offsets_and_flips():
    image = np.arange(3 * 32 * 32, dtype=np.float32).reshape(3, 32, 32)  # every pixel distinct
    padded = np.pad(image, [(0, 0), (4, 4), (4, 4)], mode="reflect")
    assert padded[0, 0, 4] == image[0, 4, 0]  # reflect = mirror without repeating the edge pixel
    candidates = {}
    for top in range(9):
        for left in range(9):
            crop = padded[:, top:top + 32, left:left + 32]
            for flipped, view in ((False, crop), (True, crop[:, :, ::-1])):
                key = np.ascontiguousarray(view).tobytes()
                assert key not in candidates
                candidates[key] = (top, left, flipped)
    np.random.seed(0)
    draws = [candidates[augment(image).tobytes()] for _ in range(3000)]
    tops, lefts, flips = zip(*draws)
    assert set(tops) == set(range(8)) and set(lefts) == set(range(8))  # 8 never drawn
    assert 0.45 < np.mean(flips) < 0.55
    assert augment(image).shape == (3, 32, 32)


# --- --dataset inference and default run-folder names (docs/defaults.md §4) ----------------------------------

def test_dataset_inference():
    assert infer_dataset(250) == "cifar10"
    assert infer_dataset(0.01) == "aflw"
    assert infer_dataset(-1) == "aflw"
    assert infer_dataset(None) is None


@pytest.mark.parametrize("method, argv, default_dataset, dataset, out", [
    ("MT", ["--n-labeled", "250"], "cifar10", "cifar10", "cifar10MT@250"),
    ("MT", ["--n-labeled", "0.01"], "cifar10", "aflw", "aflwMT@0.01"),
    ("MT", [], "cifar10", "cifar10", "cifar10MT@250"),
    ("SL", ["--n-labeled", "-1"], "aflw", "aflw", "aflwSL@-1"),
    ("SL", [], "aflw", "aflw", "aflwSL@-1"),
    ("SL", ["--n-labeled", "0.01"], "aflw", "aflw", "aflwSL@0.01"),
    ("SL", ["--n-labeled", "250"], "aflw", "cifar10", "cifar10SL@250"),
    ("MM", ["--n-labeled", "250"], "cifar10", "cifar10", "cifar10MM@250"),
])
def test_default_dataset_and_out_names(method, argv, default_dataset, dataset, out):
    script = load_script(method)
    args = finalize(script.parse_args(argv + ["--gpu", "cpu"]), script.METHOD, default_dataset)
    assert (args.dataset, args.out, args.method) == (dataset, out, method)
    assert args.lambda_u == defaults(dataset, method)["lambda_u"]


# --- atomic checkpoints (README "Monitoring and run folders") ----------------------------------------------------------------

def test_checkpoint_write_failing_midway_keeps_the_previous_one(tmp_path, monkeypatch):
    good = {"args": {"method": "MT"}, "epoch": 1, "weights": torch.arange(100.0)}
    save_checkpoint(good, str(tmp_path), is_best=True)
    for name in (CHECKPOINT, BEST):
        assert load_checkpoint(str(tmp_path / name))["epoch"] == 1
    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)   # most of the bytes …
        f.seek(f.tell() // 2)
        f.truncate()
        raise OSError("No space left on device")  # … then the disk fills up

    monkeypatch.setattr(torch, "save", dies_midway)
    newer = {"args": {"method": "MT"}, "epoch": 2, "weights": torch.arange(100.0) * 2}
    with pytest.raises(OSError):
        save_checkpoint(newer, str(tmp_path), is_best=True)
    monkeypatch.undo()
    for name in (CHECKPOINT, BEST):
        state = torch.load(tmp_path / name, map_location="cpu", weights_only=True)
        assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(100.0))
    # and a later successful save replaces it
    save_checkpoint(newer, str(tmp_path), is_best=False)
    assert load_checkpoint(str(tmp_path / CHECKPOINT))["epoch"] == 2
    assert load_checkpoint(str(tmp_path / BEST))["epoch"] == 1


def test_a_resumed_writer_within_the_same_second_keeps_the_earlier_events(tmp_path, monkeypatch):
    """tensorboardX names events files after the current second: without the writer's own suffix, an
    attempt resumed within the second its predecessor started overwrote the predecessor's events (it
    happened in the NaN-resume test on a fast machine). The clock is frozen to force that case."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import utils.logger
    monkeypatch.setattr(time, "time", lambda: 1795597725.5)   # the clock tensorboardX names files by
    first = utils.logger.open_writer(str(tmp_path), first_step=24)
    first.add_scalar("loss", 1.0, 24)
    first.close()
    resumed = utils.logger.open_writer(str(tmp_path), first_step=48)
    resumed.add_scalar("loss", 2.0, 48)
    resumed.close()
    assert len(list(tmp_path.glob("events.out.tfevents.1795597725.*"))) == 2
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(24, 1.0), (48, 2.0)]
