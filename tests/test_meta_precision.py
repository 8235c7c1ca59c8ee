"""The meta-gradient under ``--compile`` and ``--amp``, and AFLW's targets under ``--amp`` (docs/method.md §1.5,
§2.5, §5).

* ``--compile`` compiles the networks in place (``model.compile()``). The meta step's forward-mode JVP must
  still run eagerly: compiled graphs compute primal values only, so a compiled forward on dual tensors
  drops the tangent or fails (pytorch/pytorch#187284). Real WRN-28-2 and TCDCNN, L2I-O and L2I-L, fp32 on
  the CPU: the compiled student's meta-gradient equals the eager one's.
* ``--amp``: the JVP runs with autocast off on every device; under CPU bf16 autocast the meta-gradient
  stays close to the fp32 one.
* AFLW with ``--amp``: the shift-compensated targets (about 30 px before normalisation) stay fp32.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import utils.meta as meta
from models.tcdcnn import TCDCNN
from models.wideresnet import WideResNet
from utils.defaults import defaults
from utils.landmarks import NUM_POINTS, denormalise, normalise
from utils.meta import label_generator_output, meta_label_gradient, virtual_loss
from utils.tasks import AflwTask, Batch, Cifar10Task

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

BATCH = 2
LR = {"cifar10": 0.002, "aflw": 0.03}  # the tasks' default learning rates (docs/defaults.md)
# AFLW target statistics of the size the real ones have: coordinates about 30 px, spread a few px.
AFLW_MEAN = torch.tensor([21.3, 24.8, 38.6, 24.5, 30.1, 33.2, 23.0, 41.7, 37.2, 41.5])
AFLW_STD = torch.tensor([2.9, 3.1, 2.8, 3.0, 4.2, 4.0, 3.3, 3.5, 3.2, 3.6])


def make_task(dataset):
    task = Cifar10Task() if dataset == "cifar10" else AflwTask()
    if dataset == "aflw":  # what AflwTask.to sets from the data set
        task.mean, task.std = AFLW_MEAN, AFLW_STD
    return task


def make_batch(dataset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, 3, 32, 32) if dataset == "cifar10" else (BATCH, 1, 60, 60)
    u1, u2, x_m = (torch.rand(shape, generator=gen) for _ in range(3))
    if dataset == "cifar10":
        y_m = F.one_hot(torch.randint(0, 10, (BATCH,), generator=gen), 10).float()
        return Batch(x_l=x_m, y_l=y_m, u1=u1, u2=u2, x_m=x_m, y_m=y_m)
    y_m = 0.5 * torch.randn(BATCH, 2 * NUM_POINTS, generator=gen)
    shift = tuple(torch.randint(-3, 4, (BATCH,), generator=gen) for _ in range(4))
    return Batch(x_l=x_m, y_l=y_m, u1=u1, u2=u2, shift=shift, x_m=x_m, y_m=y_m)


def gradient(model, dataset, method, batch, labels):
    """One meta step as the L2I scripts run it (utils.meta.imputed_label_gradient with the method's defaults,
    docs/method.md §5.1): the student's view-1 forward with graph, then dM/dz."""
    task, args = make_task(dataset), defaults(dataset, method)
    student_out = model(batch.u1)
    return meta_label_gradient(
        model, student_out, batch.u1, labels,
        virtual_loss=lambda out, z: virtual_loss(task, batch, out, z, args["virtual_reduction"],
                                                 args["virtual_squash"]),
        meta_inputs=batch.x_m, meta_targets=batch.y_m, meta_loss=task.supervised_loss,
        virtual_step_size=args["virtual_step"] * LR[dataset], keep_graph=method == "L2I-L")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- 1. --compile --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_pairs():
    """Per task: an eager student and an in-place compiled copy with identical weights, as --compile builds
    them (utils/runtime.py). Shared by the cases below: torch.compile on the CPU takes tens of seconds."""
    torch.manual_seed(0)
    pairs = {}
    # The L2I-L meta step back-propagates the view-1 graph twice, which compiled backwards only allow
    # without buffer donation (set by --compile too).
    with torch._functorch.config.patch(donated_buffer=False):
        for dataset, build in (("cifar10", lambda: WideResNet(num_classes=10)), ("aflw", TCDCNN)):
            eager = build().train()
            compiled = copy.deepcopy(eager)
            compiled.compile()
            compiled_before = counters["frames"]["ok"]
            compiled(make_batch(dataset).u1)
            assert counters["frames"]["ok"] > compiled_before  # the copy really runs compiled code
            pairs[dataset] = eager, compiled
        yield pairs
    torch._dynamo.reset()


def graph_breaks():
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("method", ["L2I-O", "L2I-L"])
@pytest.mark.parametrize("dataset", ["cifar10", "aflw"])
def test_compiled_student_gives_the_eager_meta_gradient(compiled_pairs, dataset, method):
    """fp32, same weights and labels; the compiled student runs its view-1 forward and backward and the
    meta-batch forward compiled, as under --compile. Its kernels round differently (fused ops, other
    summation orders): measured relative differences 1.4e-7 to 2.5e-7 on torch 2.14, up to 3.0e-5 on
    torch 2.6 (WRN, L2I-O; the others 1.4e-7 to 2.8e-7). Bound 1e-3: 30× the largest, and 1000× below
    what a lost or wrong tangent gives (relative error ~1)."""
    eager, compiled = compiled_pairs[dataset]
    batch = make_batch(dataset)
    with torch.no_grad():
        labels = label_generator_output(eager, batch.u2)
    expected = gradient(eager, dataset, method, batch, labels)
    breaks = graph_breaks()
    got = gradient(compiled, dataset, method, batch, labels)
    # The JVP never reaches Dynamo: dual inputs traced by this torch would show up as graph breaks.
    assert graph_breaks() == breaks
    assert expected.norm() > 0
    assert rel_err(got, expected) <= 1e-3


class TinyLandmarkNet(nn.Module):
    """A small N×1×60×60 → N×10 net of its own class: its compiled code cache is its own, whatever ran before."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=4)
        self.fc = nn.Linear(4 * 14 * 14, 2 * NUM_POINTS)

    def forward(self, x):
        return self.fc(F.hardtanh(self.conv(x)).flatten(1))


def test_jvp_skips_a_graph_already_compiled_for_its_guards():
    """A graph compiled for plain tensors with the JVP's guards (parameters without requires_grad, train
    mode, grad enabled) would run its kernels on the dual inputs and drop or refuse the tangent, on every
    torch release including this one (which only falls back to eager while tracing a new graph). The JVP
    must not use it."""
    torch.manual_seed(0)
    eager = TinyLandmarkNet().train()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    batch = make_batch("aflw", seed=1)
    detached = {n: p.detach() for n, p in compiled.named_parameters()}
    torch.func.functional_call(compiled, detached, (batch.u1,))  # compiles and caches that graph
    with torch.no_grad():
        labels = eager(batch.u2)
    expected = gradient(eager, "aflw", "L2I-O", batch, labels)
    assert rel_err(gradient(compiled, "aflw", "L2I-O", batch, labels), expected) <= 1e-3


def test_missing_tangent_is_an_error(monkeypatch):
    """If the forward-mode pass loses its tangent, the meta step fails loudly instead of returning zeros
    (L2I would silently become Mean Teacher with a second step)."""
    def no_tangent(tensor, *args, **kwargs):
        return torch.autograd.forward_ad.UnpackedDualTensor(tensor, None)

    torch.manual_seed(0)
    model, batch = TCDCNN().train(), make_batch("aflw")
    with torch.no_grad():
        labels = model(batch.u2)
    monkeypatch.setattr(meta.fwAD, "unpack_dual", no_tangent)
    with pytest.raises(RuntimeError, match="tangent"):
        gradient(model, "aflw", "L2I-L", batch, labels)


# --- 2. --amp: the JVP in fp32 ------------------------------------------------------------------------
class AutocastRecorder:
    """Stands in for torch.autocast: records (device_type, enabled) and returns the real context."""

    def __init__(self, calls, real):
        self.calls, self.real = calls, real

    def __call__(self, device_type, *args, enabled=True, **kwargs):
        self.calls.append((device_type, enabled))
        return self.real(device_type, *args, enabled=enabled, **kwargs)


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
def test_jvp_turns_autocast_off_for_the_tensors_device(monkeypatch, device_type):
    calls = []
    monkeypatch.setattr(torch, "autocast", AutocastRecorder(calls, torch.autocast))
    meta._jvp_precision(device_type)
    assert calls == [(device_type, False)]


def test_meta_step_asks_for_autocast_off_on_its_inputs_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "autocast", AutocastRecorder(calls, torch.autocast))
    torch.manual_seed(0)
    model, batch = TCDCNN().train(), make_batch("aflw")
    with torch.no_grad():
        labels = model(batch.u2)
    gradient(model, "aflw", "L2I-L", batch, labels)
    assert calls == [("cpu", False)]


@pytest.mark.parametrize("dataset", ["cifar10", "aflw"])
def test_jvp_under_bf16_autocast_is_the_fp32_jvp(dataset):
    """Under CPU bf16 autocast the JVP's output and tangent are fp32 and bit-identical to the JVP without
    autocast: autocast is really off inside it."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=10).train() if dataset == "cifar10" else TCDCNN().train()
    inputs = make_batch(dataset).u1
    named = list(model.named_parameters())
    names, params = [n for n, _ in named], [p for _, p in named]
    directions = [torch.randn_like(p) for p in params]
    buffers = dict(model.named_buffers())

    def jvp():
        return meta._jvp(model, names, params, directions, buffers, inputs)

    fp32 = jvp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = jvp()
    assert under_amp.dtype == torch.float32 and torch.equal(under_amp, fp32)


@pytest.mark.parametrize("method", ["L2I-O", "L2I-L"])
@pytest.mark.parametrize("dataset", ["cifar10", "aflw"])
def test_bf16_autocast_meta_gradient_is_close_to_fp32(dataset, method):
    """The whole step under CPU bf16 autocast, as the scripts run it with --amp (label generator, view-1
    forward, virtual step, meta loss), against fp32. Only the JVP is fp32 there; the rest carries bf16's
    8-bit mantissa (relative rounding up to 2^-9 ≈ 2e-3 per op, accumulated over the layers). Measured
    relative errors over 5 seeds: CIFAR-10 0.006-0.021, AFLW L2I-L 0.005-0.009, AFLW L2I-O 0.018-0.062
    (the tanh squash on targets near ±1 amplifies the rounding); seed 0, tested here: 0.013, 0.006, 0.062,
    0.008. Bound 0.15. This guards the bf16 step against drifting from fp32; that the JVP itself is fp32
    is the test above (a bf16 JVP moves these errors by less than their spread)."""
    torch.manual_seed(0)
    model = WideResNet(num_classes=10).train() if dataset == "cifar10" else TCDCNN().train()
    batch = make_batch(dataset)
    results = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            labels = label_generator_output(model, batch.u2).detach()
            results[precision] = gradient(model, dataset, method, batch, labels)
    assert results["fp32"].dtype == torch.float32 and results["fp32"].norm() > 0
    assert rel_err(results["bf16"], results["fp32"]) <= 0.15


# --- 3. AFLW targets under --amp ----------------------------------------------------------------------
def test_aflw_targets_stay_fp32_under_bf16_autocast():
    """A bf16 teacher output (its values exactly representable in fp32) becomes fp32 targets equal to the
    fp32 computation, not the all-bf16 one, whose ~30 px intermediate values are rounded to 0.125 px."""
    task, batch = make_task("aflw"), make_batch("aflw")
    out_bf16 = (0.8 * torch.randn(BATCH, 2 * NUM_POINTS, generator=torch.Generator().manual_seed(3))).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        target = task.impute(out_bf16, batch)
    dx1, dy1, dx2, dy2 = batch.shift
    shift = torch.stack([dx1 - dx2, dy1 - dy2], dim=1).repeat(1, NUM_POINTS)

    def compensate(v, dtype):  # S of docs/method.md §2.5, written out in one dtype
        mean, std = AFLW_MEAN.to(dtype), AFLW_STD.to(dtype)
        return (v.to(dtype) * std + mean + shift.to(dtype) - mean) / std

    fp32, bf16 = compensate(out_bf16, torch.float32), compensate(out_bf16, torch.bfloat16)
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, fp32, rtol=1e-6, atol=1e-6)  # fp32 rounding only
    # The all-bf16 chain is off by up to ~0.1 px, i.e. ~0.03 in normalised units.
    assert (bf16.float() - fp32).abs().max() > 1e-2
    assert (target - bf16.float()).abs().max() > 1e-2


def test_landmark_arithmetic_never_rounds_the_statistics_to_bf16():
    """utils.landmarks on a bf16 input computes in the statistics' fp32 (fp64 inputs stay fp64)."""
    v = torch.randn(BATCH, 2 * NUM_POINTS).bfloat16()
    assert torch.equal(denormalise(v, AFLW_MEAN, AFLW_STD), v.float() * AFLW_STD + AFLW_MEAN)
    y = 30 + 3 * torch.randn(BATCH, 2 * NUM_POINTS)
    assert torch.equal(normalise(y.bfloat16(), AFLW_MEAN, AFLW_STD),
                       (y.bfloat16().float() - AFLW_MEAN) / AFLW_STD)
    assert normalise(y.double(), AFLW_MEAN, AFLW_STD).dtype == torch.float64
