"""The opt-in speed features (README "Speed"): ``--amp``, ``--channels-last``, ``--compile``, ``--data-on-device``
and ``python -m utils.benchmark``.

* The whole-batch device data path (``augment_batch``, ``DeviceBatches``) draws the augmentation of docs/data.md §1
  with the same distribution as the numpy per-image path (``augment``), from bit-identical normalised pixels.
* Every flag runs on the CPU and stays close to the fp32 default from an identical state.
* Without a flag nothing changes: the default is the faithful fp32, contiguous, eager path.
* The flags work through the real command line, and the benchmark writes the table it documents.
"""
import contextlib
import io
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.cifar10 import CifarImages, DeviceBatches, augment, augment_batch, normalise
from tests.test_scripts import main_exit_code
from utils.benchmark import make_config, random_batch
from utils.options import SPEED_FLAGS, common_parser, finalize
from utils.scripts import load_script
from utils.tasks import TASKS, Cifar10Task

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
CPU = torch.device("cpu")



@pytest.fixture
def global_rng_restored():
    """Tests that seed python, numpy or torch globally leave those generators as they found them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@pytest.fixture(scope="module", autouse=True)
def background_runs(request, tmp_path_factory):
    """The subprocess runs of this module's selected end-to-end tests, started when the module starts and
    run one after another on a background thread: each is a fresh interpreter (5 s to import torch alone)
    on one core while the in-process tests use the other, which saves ~25 s of this module's time.
    Returns {test name: (output path, Future of the CompletedProcess)}; the tests check the results."""
    selected = {item.originalname for item in request.session.items if item.path == request.path}
    runs = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        if "test_data_on_device_trains_mt_on_cifar10" in selected:
            folder = tmp_path_factory.mktemp("data-on-device") / "run"
            runs["test_data_on_device_trains_mt_on_cifar10"] = folder, pool.submit(
                cli, "MT", "--data-root", request.getfixturevalue("cifar10_root"), "--n-labeled", 40,
                "--n-val", 20, *RUN_OPTIONS, "--data-on-device", "--out", folder)
        if "test_benchmark_prints_a_table_and_writes_json" in selected:
            out = tmp_path_factory.mktemp("benchmark") / "bench.json"
            runs["test_benchmark_prints_a_table_and_writes_json"] = out, pool.submit(
                subprocess.run, [sys.executable, "-m", "utils.benchmark", *BENCHMARK_ARGS, "--json", str(out)],
                cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
        yield runs


# ============================================================================ 1. the data paths (docs/data.md §1)
#
# Test images encode where each pixel comes from: channel 0 = 8·row, channel 1 = 8·column, channel 2 = the
# image's id (uint8, HWC as CIFAR-10 is stored). Every normalised value is one of 256 per-channel values
# of ``normalise``; looking them up exactly recovers the levels (and proves the device path normalises
# bit-identically), the levels give the source pixel of every output pixel, hence each draw's crop
# offsets and flip, and the whole output can be checked against the reflect-padded crop they imply.

SIZE, PAD = 32, 4
PADDED_INDEX = np.pad(np.arange(SIZE), PAD, mode="reflect")   # padded position → source row/column
DRAWS = 4000


def encoded_images(ids):
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    images = np.empty((len(ids), SIZE, SIZE, 3), np.uint8)
    images[..., 0], images[..., 1] = 8 * rows, 8 * cols
    images[..., 2] = np.asarray(ids, np.uint8)[:, None, None]
    return images


def normalised_levels():
    """The float32 value ``normalise`` gives each uint8 level, per channel: 3×256, increasing in the level."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], 3, axis=2)   # 256×1×3 "image"
    return normalise(levels)[:, :, 0]


LEVELS = normalised_levels()


def decode(x):
    """B×3×32×32 normalised images → B×3×32×32 uint8 levels; each value must be exactly a level's value."""
    x = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    assert x.dtype == np.float32 and x.shape[1:] == (3, SIZE, SIZE), (x.dtype, x.shape)
    levels = np.empty(x.shape, np.int64)
    for c in range(3):
        levels[:, c] = np.clip(np.searchsorted(LEVELS[c], x[:, c]), 0, 255)
        exact = LEVELS[c][levels[:, c]] == x[:, c]
        assert exact.all(), (f"channel {c}: {np.count_nonzero(~exact)} values are not exactly the float32 "
                             f"``normalise`` gives any uint8 level (the normalisation differs)")
    return levels


def draws_of(x):
    """(ids, top, left, flip) of each augmented image, after checking that the image is exactly the
    32×32 crop at (top, left) of its source reflect-padded by 4, mirrored left-right when flip."""
    levels = decode(x)
    rows, cols, ids = levels[:, 0] // 8, levels[:, 1] // 8, levels[:, 2]
    top = rows[:, 16, 16] - 12                      # output row 16 shows padded row top+16 = source top+12
    flip = cols[:, 16, 16] < cols[:, 16, 15]
    left = np.minimum(cols[:, 16, 15], cols[:, 16, 16]) - 11
    assert ((top >= 0) & (top <= 2 * PAD) & (left >= 0) & (left <= 2 * PAD)).all()
    steps = np.arange(SIZE)
    expected_rows = PADDED_INDEX[top[:, None] + steps][:, :, None]
    column_steps = np.where(flip[:, None], SIZE - 1 - steps, steps)
    expected_cols = PADDED_INDEX[left[:, None] + column_steps][:, None, :]
    assert (rows == expected_rows).all(), "rows are not a reflect-padded crop"
    assert (cols == expected_cols).all(), "columns are not a (flipped) reflect-padded crop"
    assert (ids == ids[:, :1, :1]).all(), "an output image mixes pixels of different images"
    return ids[:, 0, 0], top, left, flip


def assert_uniform_draws(top, left, flip, where):
    """Offsets uniform on 0…7 (never 8, docs/data.md §1), flips with p = 1/2, top and left independent.

    Bound: every count within 5 binomial standard deviations of its expectation (normal approximation: a
    correct sampler fails one of these 19 checks with probability ≈ 1e-5). A sampler over 0…8 puts ≈ 444
    of 4000 draws on 8; one that reuses the top offset as the left one has top == left always instead of
    1/8 of the time; a flip probability of 0.45 is 6 standard deviations off."""
    n = len(top)

    def within_5_sigma(count, p, what):
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(count - n * p) <= 5 * sigma, f"{where}: {what} occurs {count} times in {n}, expected {n * p:g}"
    for name, offsets in (("top", top), ("left", left)):
        counts = np.bincount(offsets, minlength=2 * PAD + 1)
        assert counts[2 * PAD] == 0, f"{where}: {name} offset 8 was drawn {counts[8]} times (docs/data.md §1.4: never)"
        for k in range(2 * PAD):
            within_5_sigma(counts[k], 1 / 8, f"{name} offset {k}")
    within_5_sigma(int(flip.sum()), 1 / 2, "a flip")
    within_5_sigma(int((top == left).sum()), 1 / 8, "top == left")
    within_5_sigma(int(((top < 4) == flip).sum()), 1 / 2, "top < 4 together with a flip")


def test_numpy_augment_draws_uniform_offsets_0_to_7_and_fair_flips(global_rng_restored):
    np.random.seed(0)
    image = normalise(encoded_images([7])[0])
    out = np.stack([augment(image) for _ in range(DRAWS)])
    ids, top, left, flip = draws_of(out)
    assert (ids == 7).all()
    assert_uniform_draws(top, left, flip, "augment (numpy)")


def test_device_augment_batch_draws_the_same_distribution(global_rng_restored):
    image = torch.from_numpy(normalise(encoded_images([7])[0]))
    batch = image.expand(DRAWS, -1, -1, -1)
    out = augment_batch(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == (DRAWS, 3, SIZE, SIZE) and out.dtype == torch.float32 and out.is_contiguous()
    ids, top, left, flip = draws_of(out)
    assert (ids == 7).all()
    assert_uniform_draws(top, left, flip, "augment_batch (device)")
    # The global stream serves --data-on-device; two calls give independent draws.
    torch.manual_seed(0)
    first, second = draws_of(augment_batch(batch[:64])), draws_of(augment_batch(batch[:64]))
    assert any(not np.array_equal(a, b) for a, b in zip(first[1:], second[1:]))


def test_both_paths_normalise_bit_identically():
    """The device path's normalisation of every uint8 value is the numpy path's, to the bit."""
    images = np.random.default_rng(0).integers(0, 256, size=(16, SIZE, SIZE, 3), dtype=np.uint8)
    images[0] = np.arange(SIZE * SIZE * 3).reshape(SIZE, SIZE, 3) % 256   # every level in every channel
    dataset = CifarImages(images, np.zeros(16, np.int64), np.arange(16), views=1)
    loader = DeviceBatches(dataset, batch_size=16, device=CPU)
    device_normalised = ((loader.images.float() - loader.mean) * loader.inv_std).permute(0, 3, 1, 2)
    numpy_normalised = torch.from_numpy(np.stack([normalise(image) for image in images]))
    assert device_normalised.dtype == numpy_normalised.dtype == torch.float32
    assert torch.equal(device_normalised, numpy_normalised)
    decode(next(iter(loader))[0])   # and what DeviceBatches yields holds exactly those values


N_SOURCE, N_DATASET, BATCH = 60, 44, 8


@pytest.fixture
def encoded_dataset():
    """44 of 60 encoded images (at shuffled indices, so ``indices`` matters) with random labels."""
    rng = np.random.default_rng(1)
    images = encoded_images(np.arange(N_SOURCE))
    labels = rng.integers(0, 10, size=N_SOURCE)
    indices = rng.permutation(N_SOURCE)[:N_DATASET]
    return images, labels, indices


def structure(batch):
    """Nested (type-free) shapes and dtypes: DataLoader collates into lists, DeviceBatches yields tuples."""
    if isinstance(batch, torch.Tensor):
        return tuple(batch.shape), batch.dtype
    assert isinstance(batch, (list, tuple)), type(batch)
    return [structure(b) for b in batch]


@pytest.mark.parametrize("views", [1, 2])
def test_device_batches_yield_what_the_data_loader_yields(encoded_dataset, global_rng_restored, views):
    images, labels, indices = encoded_dataset
    dataset = CifarImages(images, labels, indices, views=views)
    torch.manual_seed(0)
    np.random.seed(0)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=0)
    device_batches = DeviceBatches(dataset, BATCH, CPU)
    assert len(device_batches) == len(loader) == N_DATASET // BATCH

    first = next(iter(loader))
    expected = structure(first)
    view = ((BATCH, 3, SIZE, SIZE), torch.float32)
    assert expected == [view if views == 1 else [view, view], ((BATCH,), torch.int64)]
    for x in ([first[0]] if views == 1 else first[0]):   # the numpy path: the same kind of draws
        assert np.array_equal(first[1].numpy(), labels[draws_of(x)[0]])
    passes = []
    for _ in range(2):
        batches = list(device_batches)
        assert len(batches) == N_DATASET // BATCH
        ids_of_pass = []
        for batch in batches:
            assert structure(batch) == expected
            x, y = batch
            if views == 1:
                ids = draws_of(x)[0]
            else:
                (ids, *first), (ids_2, *second) = draws_of(x[0]), draws_of(x[1])
                assert np.array_equal(ids, ids_2), "the two views are not of the same images"
                assert any(not np.array_equal(a, b) for a, b in zip(first, second)), "the two views are equal"
            assert np.array_equal(y.numpy(), labels[ids]), "labels do not belong to their images"
            ids_of_pass.extend(ids.tolist())
        assert len(set(ids_of_pass)) == len(ids_of_pass) == BATCH * (N_DATASET // BATCH), "an image repeats"
        assert set(ids_of_pass) <= set(indices.tolist()), "an image from outside the dataset's indices"
        passes.append(ids_of_pass)
    assert passes[0] != passes[1], "every pass draws the same order"

    # The task turns both into the same Batch.
    task = Cifar10Task()
    made = []
    for batch in (next(iter(loader)), next(iter(device_batches))):
        if views == 1:   # labeled and meta batches
            made.append(task.make_batch(batch, None, batch, CPU))
        else:            # unlabeled views, next to a labeled batch
            made.append(task.make_batch((batch[0][0], batch[1]), batch, None, CPU))
    for field in ("x_l", "y_l", "u1", "u2", "x_m", "y_m"):
        a, b = getattr(made[0], field), getattr(made[1], field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert (a.shape, a.dtype) == (b.shape, b.dtype), field


# ============================================================================ 2. each flag stays close to fp32
#
# Both arms start from the same state: the same seed before ``make_config`` (same initial weights; a flag
# only changes memory layout, autocast or compilation) and the same random batches. We compare the losses
# of every iteration and, for the student, EMA-E and the mean teacher, the parameters and BN buffers
# afterwards, as norms relative to how far the fp32 run moved them ("the update").
#
# Full consistency weight from the first iteration (``--rampup-length 0``; on AFLW with ``--lambda-u 1``,
# since 75 at lr 0.03 without the ramp makes L2I-O blow up), so the unlabeled branch's gradient is compared
# too: through ``make_config`` the ramp would weight it ~0 in these few iterations. Two more choices keep
# the comparison well-posed:
# * ``--ema-decay 0.9``: with the default 0.999 the EMAs move ~1e-3 of the student's step per iteration,
#   which is at the fp32 rounding level of their values, so any two runs would look "different".
# * On CIFAR-10, plain SGD at the same lr replaces Adam in both arms. Adam's first steps are
#   ≈ lr·sign(g) per weight: a gradient whose exact value is zero (every WRN conv bias sits in front of a
#   BN that removes it, so its computed gradient is ~1e-8 rounding noise) gets a full ±lr step in a
#   random direction, and a mere reordering of sums (channels-last) then changes the weights by 5 % of
#   the step. SGD's step is linear in the gradient: weight error = lr × gradient error. The flags do not
#   touch the optimizer (parameters, gradients and optimizer state stay fp32, checked below); Adam runs
#   with a flag in the end-to-end test of --data-on-device and in the benchmark.
#
# Tolerances (observed in brackets, on the AVX2 CPU these were first measured on; an AVX-512/AVX512-BF16 CPU
# passes them too):
# * channels-last, compile: the same fp32 operations with sums in another order, ≈ 1e-7 relative per
#   op. How much that grows depends on the conditioning of the problem, so the yardstick is the fp32
#   default's own rounding error, measured against the same run in float64: the flagged run may be at
#   most 4× fp32's distance from float64 away from fp32 (two independent roundings of equal size are
#   at most 2× apart; 4× leaves headroom), plus 1e-5 of the update. On CIFAR-10 random images through a
#   freshly initialised WRN with BN over 4 images make the early layers' gradients cancel heavily: fp32
#   itself is ~1.5e-3 of the update away from float64, and channels-last about as far from fp32
#   [≤ 1.0× fp32's error]; on AFLW's TCDCNN fp32's error is ~1e-5 and the flags' ~3e-6
#   [≤ 0.3×]. Losses: 1e-4 relative [≤ 4e-6]. A real layout or graph bug moves either by O(1).
# * amp (bf16 autocast): bf16 has an 8-bit mantissa, ≈ 4e-3 relative rounding per op. The losses stay
#   within ~1e-3 [≤ 1e-3; on the CPU, autocast runs softmax and log_softmax in bf16, so the CIFAR-10
#   loss has bf16 resolution, e.g. 2.7109375]: bound 2e-2. The consistency loss is a mean of squared
#   differences of two nearly equal predictions, so its relative error is that of those differences,
#   ~10× larger [≤ 1.2e-2]: bound 0.1. The update follows gradients that went through bf16 forward and
#   backward passes (for L2I-O also a second-order meta-gradient). On AFLW it stays within a few 1e-2
#   of fp32's [≤ 4.3e-2]: bound 0.1. On CIFAR-10 the ill-conditioned early-layer gradients above (where
#   fp32 rounding alone costs 1.5e-3) take the bf16 error to ~0.15 of the update, nearly all of it in
#   the first WRN layers [≤ 0.16]: bound 0.3, i.e. the update keeps a cosine ≥ 0.95 with fp32's.
#   Dropping the update (error 1), stepping the wrong way (2), or keeping weights in bf16 are caught
#   here or by the dtype checks below.
LOSS_RTOL = {"--channels-last": (1e-4, 1e-4), "--compile": (1e-4, 1e-4), "--amp": (2e-2, 0.1)}  # (losses, loss_u)
FP64_MULTIPLE, UPDATE_FLOOR = 4.0, 1e-5     # channels-last, compile: ≤ 4·‖fp32 − fp64‖ + 1e-5·update
AMP_UPDATE_RTOL = {"cifar10": 0.3, "aflw": 0.1}
BATCH_SIZE = {"cifar10": 4, "aflw": 8}
# On a CPU without bf16 instructions (AVX2 only) bf16 convolutions take PyTorch's slow reference path: one
# WRN iteration takes 5 s (MT) to 15 s (L2I-O). One iteration already holds the teacher's forward, the
# interleaved student forward and backward, the optimizer step(s) and both EMA updates (and, in L2I-O, a
# second optimizer step from weights the first one changed), so CIFAR-10 runs one, AFLW two.
ITERATIONS = {"cifar10": 1, "aflw": 2}
FULL_WEIGHT = {"cifar10": ["--rampup-length", "0"], "aflw": ["--rampup-length", "0", "--lambda-u", "1"]}


def networks(run):
    """The networks a script built: student, evaluation EMA and, where the method has one, the mean teacher."""
    found = {"student": run.student, "ema_eval": run.ema_eval.model}
    if hasattr(run, "mean_teacher"):
        found["mean_teacher"] = run.mean_teacher.model
    return found


def model_states(run):
    return {name: {k: v.detach().clone() for k, v in model.state_dict().items()}
            for name, model in networks(run).items()}


def train_from_seed(method, task, flags, iterations, dtype=torch.float32):
    """``iterations`` train_steps (under ``run.autocast()``, as the scripts' loops run them) from seed 0;
    ``dtype`` float64 runs the same in double precision (models, task statistics and batches)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        full_weight = FULL_WEIGHT[task] if method != "SL" else []  # SL has no unsupervised term
        train_step, run = make_config(method, task, CPU, ["--gpu", "cpu", "--batch-size", str(BATCH_SIZE[task]),
                                                          "--ema-decay", "0.9", *full_weight, *flags])
        for model in networks(run).values():
            model.to(dtype)   # in place: the optimizer keeps the same parameters
        run.task.mean, run.task.std = run.task.mean.to(dtype), run.task.std.to(dtype)
        if task == "cifar10":
            run.optimizer = torch.optim.SGD(run.student.parameters(), lr=run.args.lr)
        initial = model_states(run)
        torch.manual_seed(1)
        batches = [random_batch(run, dtype) for _ in range(iterations)]
        losses = []
        for batch in batches:
            with run.autocast():
                losses.append({k: float(v) for k, v in train_step(run, batch).items()})
            run.step += 1
    return run, initial, losses, model_states(run), batches


_REFERENCES = {}


def reference(method, task, iterations, dtype):
    """(initial states, losses, final states) of the run without a flag, computed once per module."""
    key = (method, task, iterations, dtype)
    if key not in _REFERENCES:
        _, initial, losses, final, _ = train_from_seed(method, task, [], iterations, dtype)
        _REFERENCES[key] = initial, losses, final
    return _REFERENCES[key]


def distance(a, b, keys):
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys) ** 0.5)


def assert_close_to_fp32(flag, method, task, iterations):
    loss_rtol, loss_u_rtol = LOSS_RTOL[flag]
    run, initial, losses, final, batches = train_from_seed(method, task, [flag], iterations)
    ref_initial, ref_losses, ref_final = reference(method, task, iterations, torch.float32)
    exact_final = None if flag == "--amp" else reference(method, task, iterations, torch.float64)[2]
    for name in ref_initial:   # identical starting state
        for k, v in ref_initial[name].items():
            assert torch.equal(initial[name][k], v), f"{name}.{k} differs before training"

    for i, (got, want) in enumerate(zip(losses, ref_losses)):
        assert set(got) == set(want)
        for k, value in want.items():
            rtol = loss_u_rtol if k == "loss_u" else loss_rtol
            assert np.isfinite(got[k]) and abs(got[k] - value) <= rtol * abs(value), \
                f"iteration {i + 1} {k}: {got[k]!r} with {flag}, {value!r} in fp32 (rtol {rtol:g})"

    params = {k for k, _ in run.student.named_parameters()}
    for name in ref_final:
        for part, keys in (("parameters", params), ("buffers", set(ref_final[name]) - params)):
            integers = [k for k in keys if not ref_final[name][k].is_floating_point()]   # num_batches_tracked
            assert all(torch.equal(final[name][k], ref_final[name][k]) for k in integers), (name, integers)
            keys = [k for k in keys if ref_final[name][k].is_floating_point()]
            moved = distance(ref_final[name], ref_initial[name], keys)
            diff = distance(final[name], ref_final[name], keys)
            if name == "student" and part == "parameters":
                assert moved > 0, "the fp32 reference did not train"
            if moved == 0:   # EMA-E's BN buffers only change at the end of an epoch
                assert diff == 0, f"{name} {part} changed with {flag} but not in fp32"
                continue
            if exact_final is None:
                bound, why = AMP_UPDATE_RTOL[task] * moved, f"{AMP_UPDATE_RTOL[task]:g} of the update"
            else:
                fp32_error = distance(ref_final[name], exact_final[name], keys)
                bound = FP64_MULTIPLE * fp32_error + UPDATE_FLOOR * moved
                why = (f"{FP64_MULTIPLE:g}× fp32's own error vs float64 ({fp32_error / moved:.3g} of the update) "
                       f"+ {UPDATE_FLOOR:g}")
            assert diff <= bound, (f"{name} {part}: ‖{flag} − fp32‖ is {diff / moved:.3g} of their update "
                                   f"({moved:.3g}); bound {why}")
    for model in networks(run).values():
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in run.student.parameters())
    assert all(v.dtype == torch.float32 for s in run.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())
    return run, losses, ref_losses, batches


def channels_last_weights(model):
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("task", ["cifar10", "aflw"])
@pytest.mark.parametrize("method", ["MT", "L2I-O"])
def test_channels_last_trains_like_fp32(method, task):
    run, *_ = assert_close_to_fp32("--channels-last", method, task, ITERATIONS[task])
    assert run.args.channels_last
    for model in networks(run).values():
        weights = channels_last_weights(model)
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@pytest.mark.parametrize("task", ["cifar10", "aflw"])
@pytest.mark.parametrize("method", ["MT", "L2I-O"])
def test_amp_trains_like_fp32(method, task):
    run, losses, ref_losses, batches = assert_close_to_fp32("--amp", method, task, ITERATIONS[task])
    assert run.args.amp
    assert losses != ref_losses, "--amp gave the fp32 numbers bit for bit: autocast is not on"
    with torch.no_grad(), run.autocast():
        assert run.student(batches[0].x_l).dtype == torch.bfloat16
    with torch.no_grad():
        assert run.student(batches[0].x_l).dtype == torch.float32   # only inside run.autocast()


def test_compile_trains_like_fp32(monkeypatch):
    """AFLW's small TCDCNN with SL: compiling takes ~20 s here, a WRN or more graphs much longer."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)   # no worker pool to start: ~4 s less
    # compile_networks switches buffer donation off process-wide for compiled L2I; restore it afterwards.
    monkeypatch.setattr(torch._functorch.config, "donated_buffer", torch._functorch.config.donated_buffer)
    try:
        run, *_ = assert_close_to_fp32("--compile", "SL", "aflw", iterations=3)
        assert run.args.compile
        assert not hasattr(run, "mean_teacher")   # SL builds no mean teacher
        for model in (run.student, run.ema_eval.model):
            assert getattr(model, "_compiled_call_impl", None) is not None, "model not compiled"
        # compiled in place: the state dict keeps the plain model's names (checkpoints stay loadable)
        reference = TASKS["aflw"]().build_model(run.args)
        reference.load_state_dict(run.student.state_dict())
    finally:
        torch._dynamo.reset()


# ============================================================================ 3. the default is unchanged

@pytest.mark.parametrize("task", ["cifar10", "aflw"])
def test_no_flag_means_fp32_contiguous_eager(task, global_rng_restored):
    for method in ("SL", "MT", "L2I-O"):
        args = finalize(load_script(method).parse_args(["--dataset", task]), method, task)
        for flag in SPEED_FLAGS:
            assert getattr(args, flag) is False, (method, flag)
    args = finalize(common_parser("x", "MT", ("cifar10", "aflw")).parse_args([]), "MT", "cifar10")
    assert [getattr(args, f) for f in SPEED_FLAGS] == [False] * len(SPEED_FLAGS)

    def one_step(autocast):
        torch.manual_seed(0)
        train_step, run = make_config("MT", task, CPU, ["--gpu", "cpu", "--batch-size", str(BATCH_SIZE[task])])
        torch.manual_seed(1)
        batch = random_batch(run)
        if autocast:
            with run.autocast():
                losses = train_step(run, batch)
        else:
            losses = train_step(run, batch)
        return run, {k: v.clone() for k, v in losses.items()}, model_states(run)

    run, losses, states = one_step(autocast=True)
    assert not any(getattr(run.args, f) for f in SPEED_FLAGS)
    for model in networks(run).values():
        assert getattr(model, "_compiled_call_impl", None) is None
        weights = channels_last_weights(model)
        assert weights and all(p.is_contiguous() for p in weights)
        # (a 1-channel or 1×1 kernel is both; the others must not be channels-last)
        assert not any(p.is_contiguous(memory_format=torch.channels_last) for p in weights
                       if p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1)
    _, plain_losses, plain_states = one_step(autocast=False)
    for k in plain_losses:
        assert losses[k].dtype == plain_losses[k].dtype and torch.equal(losses[k], plain_losses[k]), k
    for name in states:
        for k in states[name]:
            assert torch.equal(states[name][k], plain_states[name][k]), f"{name}.{k}"


def test_only_data_on_device_swaps_the_data_loader():
    task = Cifar10Task()
    task.to(CPU)
    dataset = CifarImages(encoded_images(np.arange(16)), np.zeros(16, np.int64), np.arange(16), views=1)
    for argv, kind in (([], DataLoader), (["--data-on-device"], DeviceBatches)):
        args = finalize(common_parser("x", "MT", ("cifar10", "aflw")).parse_args(["--batch-size", "8", *argv]), "MT", "cifar10")
        assert type(task.train_loader(dataset, args)) is kind, argv
        assert type(task.eval_loader(dataset, args)) is DataLoader   # evaluation keeps the plain loader


# ``keep_freed_memory`` (called by every script and the benchmark) only changes where glibc puts tensors.
# Two fresh interpreters, one with it and one without, train L2I-O on AFLW from the same seed and batch: the
# weights must be bit-identical, and once the heap has grown to its peak (two iterations) the one that
# keeps its freed memory must page-fault far less. At the paper's batch of 128 the MT step's activations of
# the 256 joint images (64 MB) exceed glibc's 32 MiB ceiling for its adaptive mmap threshold, so by
# default they are mapped afresh in every iteration: observed ~310 000 faults per iteration by default,
# 0 with it (medians of iterations 3-5); the bound is 10×. (At small batches the default's count depends
# on where glibc's adaptive thresholds settle and varies from process to process.)
ALLOCATOR_CHILD = """
import json, resource, sys, torch
from utils.benchmark import make_config, random_batch
from utils.runtime import keep_freed_memory
torch.set_num_threads(1)
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
train_step, run = make_config("L2I-O", "aflw", torch.device("cpu"), ["--gpu", "cpu"])
batch = random_batch(run)
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_step(run, batch)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
torch.save(run.student.state_dict(), sys.argv[2])
print(json.dumps({"applied": applied, "faults": faults}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keeping_freed_memory_changes_page_faults_not_numbers(tmp_path):
    children = {arm: subprocess.Popen([sys.executable, "-c", ALLOCATOR_CHILD, arm, str(tmp_path / arm)],
                                      cwd=REPO, env=SCRIPT_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
                for arm in ("default", "keep")}
    reports = {}
    for arm, child in children.items():
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-3000:]
        reports[arm] = json.loads(stdout.strip().splitlines()[-1])
    assert reports["keep"]["applied"] is True
    default, keep = (torch.load(tmp_path / arm) for arm in ("default", "keep"))
    assert default.keys() == keep.keys()
    for name in default:
        assert torch.equal(default[name], keep[name]), name
    steady = {arm: int(np.median(r["faults"][2:])) for arm, r in reports.items()}
    assert steady["keep"] * 10 <= steady["default"], reports



@pytest.mark.parametrize("native", [True, False])
def test_amp_warns_on_a_cpu_without_bf16_instructions(native, monkeypatch, capsys):
    from utils.runtime import warn_if_slow_bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    warn_if_slow_bf16(CPU)
    err = capsys.readouterr().err
    assert (err == "") if native else (err.startswith("warning: this CPU has no bf16 instructions") and
                                      err.count("\n") == 1)


# ============================================================================ 4. end to end

def cli(method, *args, timeout=300):
    return subprocess.run([sys.executable, f"train-{method}.py", *map(str, args)], cwd=REPO, env=SCRIPT_ENV,
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(proc):
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def assert_finished_run(folder, epochs, flag):
    lines = (folder / "log.txt").read_text().splitlines()
    assert len(lines) == 1 + epochs
    assert all(np.isfinite(float(v)) for line in lines[1:] for v in line.split("\t") if v)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["finished"] is True and summary["epochs"] == epochs
    args = json.loads((folder / "args.json").read_text())
    assert args[flag] is True and [args[f] for f in SPEED_FLAGS].count(True) == 1


RUN_OPTIONS = ["--batch-size", "8", "--val-iteration", "2", "--epochs", "2", "--gpu", "cpu", "--workers", "0",
               "--no-progress"]


def test_data_on_device_trains_mt_on_cifar10(background_runs):
    """``train-MT.py --data-root CIFAR --n-labeled 40 --n-val 20 … --data-on-device`` (started by background_runs)."""
    folder, run = background_runs["test_data_on_device_trains_mt_on_cifar10"]
    assert_ok(run.result(timeout=600))
    assert_finished_run(folder, 2, "data_on_device")


def test_data_on_device_is_refused_for_aflw(aflw_root, tmp_path, capsys, monkeypatch, global_rng_restored):
    monkeypatch.chdir(tmp_path)   # anything written to a default path would land here and be seen
    code, err = main_exit_code("SL", ["--data-root", aflw_root, "--n-labeled", "-1", *RUN_OPTIONS, "--data-on-device",
                                "--out", tmp_path / "run"], capsys)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--data-on-device" in lines[0], err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_amp_trains_sl_on_aflw(aflw_root, tmp_path, capsys, global_rng_restored):
    folder = tmp_path / "run"
    code, err = main_exit_code("SL", ["--data-root", aflw_root, "--n-labeled", "-1", *RUN_OPTIONS, "--amp",
                                "--out", folder], capsys)
    assert code == 0, err
    assert_finished_run(folder, 2, "amp")


# ============================================================================ 5. the benchmark

BENCHMARK_KEYS = {"method", "task", "flags", "median_s", "min_s", "max_s", "peak_mem_mb", "ratio_to_mt"}
BENCHMARK_ARGS = ["--methods", "SL", "MT", "--tasks", "aflw", "--iters", "2", "--warmup", "1", "--threads", "1"]


def assert_benchmark_rows(rows, flags):
    assert isinstance(rows, list) and len(rows) == 2
    assert {r["method"] for r in rows} == {"SL", "MT"} and {r["task"] for r in rows} == {"aflw"}
    for r in rows:
        assert set(r) == BENCHMARK_KEYS, sorted(r)
        assert r["flags"] == flags
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert r["peak_mem_mb"] > 0
        assert r["ratio_to_mt"] > 0 and np.isfinite(r["ratio_to_mt"])
    assert next(r for r in rows if r["method"] == "MT")["ratio_to_mt"] == 1.0


def test_benchmark_prints_a_table_and_writes_json(background_runs):
    """``python -m utils.benchmark BENCHMARK_ARGS --json F`` (started by background_runs)."""
    out, run = background_runs["test_benchmark_prints_a_table_and_writes_json"]
    proc = run.result(timeout=600)
    assert_ok(proc)
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| method | task | flags |") and len(table) == 2 + 2
    assert {line.split("|")[1].strip() for line in table[2:]} == {"SL", "MT"}
    assert_benchmark_rows(json.loads(out.read_text()), flags=[])


def test_benchmark_records_its_speed_flags(tmp_path, global_rng_restored):
    import utils.benchmark
    out, printed = tmp_path / "bench.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        utils.benchmark.main(["--methods", "SL", "MT", "--tasks", "aflw", "--iters", "1", "--warmup", "0",
                              "--threads", "1", "--channels-last", "--json", str(out)])
    assert_benchmark_rows(json.loads(out.read_text()), flags=["channels-last"])
    assert "1 thread, " in printed.getvalue() and "1 timed iteration after 0 warm-up rounds" in printed.getvalue()
    # The table follows a redirection of sys.stdout made after import (redirect_stdout, pytest's capture,
    # a notebook), like the line above it: print_table looks sys.stdout up when it prints.
    assert "| MT | aflw | channels-last |" in printed.getvalue(), "the table bypassed the redirected sys.stdout"
