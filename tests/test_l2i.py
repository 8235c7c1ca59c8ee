"""The L2I training scripts, train-L2I-O.py and train-L2I-L.py (docs/method.md §1–§5, docs/faithfulness.md §1).

* One full iteration of each script's ``train_step`` (CIFAR-10 and AFLW, L2I-O and L2I-L) equals an
  independent, literal re-implementation of docs/method.md §3.3, §3.4, §4.4 and §4.5 written below (the
  authors' unrolled route: deepcopy label generator, create_graph, functional forward at θ' with cloned
  buffers, backward through the backward), in float64. It does NOT use utils/meta.py.
* ``--meta-grad exact`` and ``unroll`` give the same training step (float32, real WRN-28-2 / TCDCNN).
* BN side effects (docs/method.md §2.4, docs/faithfulness.md §1.7), the zero virtual step, the facts of docs/method.md §2.4 and §5.2 on the functional
  forward and the non-zero meta-gradient, and end-to-end runs through the command line.

utils/meta.py's own exact-vs-unroll-vs-finite-difference tests live in tests/test_meta.py.
"""
import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.func import functional_call

from models.tcdcnn import TCDCNN
from tests.test_scripts import RUN_FILES
from models.wideresnet import WideResNet
from utils.benchmark import make_config, random_batch
from utils.schedules import unsup_weight
from utils.steps import consistency_update
from utils.tasks import TASKS

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BATCH = 4
CONFIGS = [("L2I-O", "cifar10"), ("L2I-L", "cifar10"), ("L2I-O", "aflw"), ("L2I-L", "aflw")]
CONFIG_IDS = [f"{task}-{method}" for method, task in CONFIGS]
# Counters at which the tested iteration runs, chosen so that nothing degenerates: a non-zero, not yet
# saturated unsupervised weight (CIFAR: epoch 100 → w ≈ 12.2; AFLW: t = 600 → w = 5) and a mean-teacher
# decay strictly between 0 and 0.999 (docs/method.md §2.1, §2.2).
COUNTERS = {"cifar10": dict(epoch=100, iteration=3, step=6), "aflw": dict(epoch=0, iteration=3, step=600)}
# AFLW runs at the decayed lr 0.003 (0-based epochs 99-149): the virtual step must follow the CURRENT lr.
AFLW_LR = 0.003
# DEAD_BN: the four WRN tensors that never receive a gradient (docs/models.md §1).
DEAD_BN = {f"block{s}.layer.0.bn1.{k}" for s in (2, 3) for k in ("weight", "bias")}



# ============================================================================ building runs and batches

def make_run(method, task_name, dtype):
    """A ``Run`` exactly as the benchmark builds it (the scripts' own options and ``build_run``), in
    ``dtype``, at the counters of COUNTERS."""
    torch.manual_seed(0)
    train_step, run = make_config(method, task_name, CPU,
                                  ["--gpu", "cpu", "--batch-size", str(BATCH)])
    if dtype != torch.float32:
        for model in (run.student, run.ema_eval.model, run.mean_teacher.model):
            model.to(dtype)
        # A fresh optimizer on the converted parameters (its state is still empty here).
        run.optimizer = run.task.make_optimizer(run.student.parameters(), run.args)
    if task_name == "aflw":
        run.task.mean, run.task.std = run.task.mean.to(dtype), run.task.std.to(dtype)
        for group in run.optimizer.param_groups:
            group["lr"] = AFLW_LR
    for key, value in COUNTERS[task_name].items():
        setattr(run, key, value)
    return train_step, run


def mt_update(run, batch):
    """MT's consistency update (steps 1-4, utils/steps.py), as the scripts call it."""
    weight = unsup_weight(run.task, run.args, run.epoch, run.iteration, run.step)
    consistency_update(run.student, run.optimizer, run.task, batch, run.mean_teacher.model, weight)


def make_batch(run, dtype, seed):
    torch.manual_seed(seed)
    return random_batch(run, dtype)


_PRIMED = {}


@pytest.fixture(scope="module", autouse=True)
def release_cached_runs():
    """The cached runs hold a few hundred MB of WRN-28-2 weights and optimizer state: free them after
    this module."""
    yield
    _PRIMED.clear()
    _SCRIPT_AFTER.clear()


def primed_run(method, task_name, dtype):
    """A run after one script iteration (non-trivial optimizer state, teacher ≠ student, BN statistics
    moved), at the COUNTERS. Cached; callers deepcopy it."""
    key = (method, task_name, dtype)
    if key not in _PRIMED:
        train_step, run = make_run(method, task_name, dtype)
        run.step -= 1
        run.iteration -= 1
        train_step(run, make_batch(run, dtype, seed=1))
        run.step += 1
        run.iteration += 1
        _PRIMED[key] = (train_step, run)
    return _PRIMED[key]


# ============================================================================ the independent reference
# Straight from docs/method.md §3.1/§3.3/§3.4 (CIFAR-10) and §4.3/§4.4/§4.5 (AFLW). Own code only.

def ref_ema_eval(run, shrink):
    """EMA-E: Ē ← 0.999·Ē + 0.001·θ; CIFAR-10 also shrinks the student by 1 − 0.02·0.002 (docs/method.md §2.1)."""
    with torch.no_grad():
        for ema, theta in zip(run.ema_eval.model.parameters(), run.student.parameters()):
            ema.mul_(0.999).add_(0.001 * theta)
        if shrink:
            for theta in run.student.parameters():
                theta.mul_(1.0 - 0.02 * 0.002)


def ref_mean_teacher(run):
    """EMA-T: β_t = min(1 − 1/(t+1), 0.999); T ← β_t·T + (1 − β_t)·θ (docs/method.md §2.1)."""
    beta = min(1.0 - 1.0 / (run.step + 1), 0.999)
    with torch.no_grad():
        for teacher, theta in zip(run.mean_teacher.model.parameters(), run.student.parameters()):
            teacher.mul_(beta).add_((1.0 - beta) * theta)


def ref_cifar_mt_part(run, batch):
    """docs/method.md §3.1 steps 1-4: teacher targets, 2-way interleaved student, L_x + w·L_u, Adam step #1."""
    student, optimizer = run.student, run.optimizer
    with torch.no_grad():
        q = torch.softmax(run.mean_teacher.model(batch.u2), dim=1)     # teacher in train mode
    h = len(batch.x_l) // 2                                            # groups [B/2, B/2] (docs/method.md §2.3)
    out_a = student(torch.cat([batch.x_l[:h], batch.u1[h:]]))
    out_b = student(torch.cat([batch.u1[:h], batch.x_l[h:]]))
    z_l = torch.cat([out_a[:h], out_b[h:]])
    z_u = torch.cat([out_b[:h], out_a[h:]])
    loss_x = -(batch.y_l * torch.log_softmax(z_l, dim=1)).sum(dim=1).mean()
    loss_u = ((torch.softmax(z_u, dim=1) - q) ** 2).mean()
    w = 50.0 * min(max((run.epoch + run.iteration / 1024) / 409.6, 0.0), 1.0)
    optimizer.zero_grad(set_to_none=True)
    (loss_x + w * loss_u).backward()
    optimizer.step()


def ref_cifar_iteration(run, batch, variant, eta):
    """docs/method.md §3.3 (variant "O", η = 0.1) and §3.4 (variant "L", η = 0.2, label step 1)."""
    student, optimizer = run.student, run.optimizer
    ref_cifar_mt_part(run, batch)
    # 5. zero grads; φ = a copy of the post-step student (own BN buffers, train mode).
    optimizer.zero_grad(set_to_none=True)
    phi = copy.deepcopy(student)
    phi_logits = phi(batch.u2)
    if variant == "L":
        r = phi_logits.detach().requires_grad_(True)        # free logits, no path back to φ
        q = torch.softmax(r, dim=1)
    else:
        q = torch.softmax(phi_logits, dim=1)                # 6. with graph to φ
    p = torch.softmax(student(batch.u1), dim=1)             # 7. extra non-interleaved student forward
    virtual = ((p - q) ** 2).sum()                          # 8. SSEsum
    names, params = zip(*student.named_parameters())
    g = torch.autograd.grad(virtual, params, create_graph=True, allow_unused=True)  # 9.
    theta_prime = {n: w.detach() - eta * (torch.zeros_like(w) if gi is None else gi)  # 10.
                   for n, w, gi in zip(names, params, g)}
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    meta_out = functional_call(student, (theta_prime, buffers), (batch.x_m,))       # 11.
    meta_loss = -(batch.y_m * torch.log_softmax(meta_out, dim=1)).sum(dim=1).mean()
    if variant == "O":
        big_g = torch.autograd.grad(meta_loss, list(phi.parameters()), allow_unused=True)  # 12.
        for w, gi in zip(params, big_g):                    # 13. undefined slots stay as they are
            if gi is not None:
                w.grad = gi.detach().clone()
    else:
        (dr,) = torch.autograd.grad(meta_loss, r, retain_graph=True)
        q_star = torch.softmax((r - 1.0 * dr).detach(), dim=1)          # 9-10.
        ((p - q_star) ** 2).mean().backward()                           # 11. L_r, no λ, no ramp
    optimizer.step()                                                    # step #2, shared Adam state
    ref_ema_eval(run, shrink=True)                                      # 14. / 12.
    ref_mean_teacher(run)


def ref_shift(v, batch, task):
    """S(v) = n(n⁻¹(v) + [dx1−dx2, dy1−dy2] for each of the 5 points) (docs/method.md §2.5)."""
    dx1, dy1, dx2, dy2 = batch.shift
    offset = torch.zeros_like(v)
    offset[:, 0::2] = (dx1 - dx2).to(v).unsqueeze(1)
    offset[:, 1::2] = (dy1 - dy2).to(v).unsqueeze(1)
    return ((v * task.std + task.mean) + offset - task.mean) / task.std


def ref_aflw_mt_part(run, batch):
    """docs/method.md §4.3 steps 1-4 with the authors' regression interleave (even / odd rows), SGD step #1."""
    student, optimizer = run.student, run.optimizer
    with torch.no_grad():
        q = ref_shift(run.mean_teacher.model(batch.u2), batch, run.task)
    both = torch.cat([batch.x_l, batch.u1])
    out_even, out_odd = student(both[0::2]), student(both[1::2])
    out = torch.stack([out_even, out_odd], dim=1).reshape(len(both), -1)
    n = len(batch.x_l)
    loss_x = ((out[:n] - batch.y_l) ** 2).mean()
    loss_u = ((out[n:] - q) ** 2).mean()
    w = 75.0 * min(max(run.step / 9000, 0.0), 1.0)
    optimizer.zero_grad(set_to_none=True)
    (loss_x + w * loss_u).backward()
    optimizer.step()


def ref_aflw_iteration(run, batch, variant, eta_factor):
    """docs/method.md §4.4 (variant "O": tanh, η = 10·lr) and §4.5 (variant "L": η = 1·lr, label step 1)."""
    student, optimizer = run.student, run.optimizer
    lr = optimizer.param_groups[0]["lr"]
    ref_aflw_mt_part(run, batch)
    ref_ema_eval(run, shrink=False)                                    # 4. EMA-E after step #1
    optimizer.zero_grad(set_to_none=True)
    n = len(batch.u1)
    out = student(torch.cat([batch.u1, batch.u2]))                     # 5. one joint forward
    o_u, p = out[:n], out[n:]
    q = ref_shift(p, batch, run.task)                                  # 6. with graph
    if variant == "O":
        virtual = ((torch.tanh(o_u) - torch.tanh(q)) ** 2).mean()     # 7.
    else:
        virtual = ((o_u - q) ** 2).mean()
    names, params = zip(*student.named_parameters())
    (ell,) = torch.autograd.grad(virtual, o_u, create_graph=True)      # 8. student path only
    g = torch.autograd.grad(o_u, params, grad_outputs=ell, create_graph=True)
    eta = eta_factor * lr                                              # 9. current lr
    theta_prime = {nm: w.detach() - eta * gi for nm, w, gi in zip(names, params, g)}
    meta_loss = ((functional_call(student, theta_prime, (batch.x_m,)) - batch.y_m) ** 2).mean()  # 10.
    (h,) = torch.autograd.grad(meta_loss, p, retain_graph=True)        # 11. h = ∂L_m/∂p
    if variant == "O":
        big_g = torch.autograd.grad(p, params, grad_outputs=h)         # G = (∂p/∂θ)ᵀ h
        for w, gi in zip(params, big_g):
            w.grad = gi.detach().clone()
    else:
        q_star = ref_shift((p - 1.0 * h).detach(), batch, run.task)   # 9. p ← p − ∂L_m/∂p
        ((o_u - q_star) ** 2).mean().backward()                        # 10. L_r through o_u
    optimizer.step()                                                   # 12. SGD step #2, shared state
    optimizer.zero_grad(set_to_none=True)
    ref_mean_teacher(run)                                              # 13. EMA-T, then EMA-E again
    ref_ema_eval(run, shrink=False)


VIRTUAL_STEP = {("L2I-O", "cifar10"): 0.1, ("L2I-L", "cifar10"): 0.2,   # 50·0.002, 100·0.002 (fixed)
                ("L2I-O", "aflw"): 10.0, ("L2I-L", "aflw"): 1.0}        # multiples of the current lr


def reference_iteration(run, batch, method, task_name, virtual_step_scale=1.0):
    eta = VIRTUAL_STEP[(method, task_name)] * virtual_step_scale
    variant = method[-1]
    if task_name == "cifar10":
        ref_cifar_iteration(run, batch, variant, eta)
    else:
        ref_aflw_iteration(run, batch, variant, eta)


# ============================================================================ comparing states

def model_state(run):
    """Every tensor an iteration may change, by name: parameters and buffers of the three models."""
    state = {}
    for prefix, model in (("student", run.student), ("ema_eval", run.ema_eval.model),
                          ("mean_teacher", run.mean_teacher.model)):
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            state[f"{prefix}.{name}"] = tensor.detach().clone()
    return state


def optimizer_state(run):
    """The optimizer's per-parameter state by parameter name (Adam moments and step / SGD momentum)."""
    params = dict(run.student.named_parameters())
    return {name: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                   for k, v in run.optimizer.state[p].items()}
            for name, p in params.items() if p in run.optimizer.state}


def gradient_free(run):
    """Parameters whose gradient is zero in exact arithmetic and only rounding noise in floating point:
    the WRN conv / shortcut biases right before a BN layer (BN subtracts every per-channel constant).
    Adam is scale invariant, so it turns that noise (a different order of operations in each
    implementation gives different noise) into small steps of ~lr·|g|/eps that differ between two
    correct implementations, and their Adam moments are pure noise. Recognised by Adam's second
    moment: sqrt(v) ≤ 5e-9 for these (float32; ≤ 1e-17 in float64), ≥ 1.7e-5 for every real gradient
    here, so the threshold 1e-7 separates them by orders of magnitude in both directions."""
    return {name for name, state in optimizer_state(run).items()
            if "exp_avg_sq" in state and state["exp_avg_sq"].max().sqrt() < 1e-7}


def differences(actual, expected, before, rtol, free=()):
    """Names whose tensors differ by more than ``rtol`` relative to how far ``expected`` moved from
    ``before`` during the iteration (a tensor that did not move must match exactly); integer
    counters (BN num_batches_tracked) must be equal. Tensors of gradient-free parameters (see
    ``gradient_free``) are compared relative to their value instead."""
    bad = []
    assert actual.keys() == expected.keys()
    for name, exp in expected.items():
        act = actual[name]
        if not exp.is_floating_point():
            if not torch.equal(act, exp):
                bad.append(f"{name}: {act.tolist()} != {exp.tolist()}")
            continue
        noise_only = name.split(".", 1)[1] in free
        scale = (exp if noise_only else exp - before[name]).norm().item()
        diff = (act - exp).norm().item()
        if not diff <= rtol * scale and diff != 0:
            bad.append(f"{name}: |Δ| {diff:.3g} vs {'norm' if noise_only else 'moved'} {scale:.3g}")
    return bad


def optimizer_differences(actual, expected, rtol, free=()):
    bad = []
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    for name, exp_state in expected.items():
        assert actual[name].keys() == exp_state.keys()
        for key, exp in exp_state.items():
            act = actual[name][key]
            if key == "step":
                if float(act) != float(exp):
                    bad.append(f"{name}.{key}: {float(act)} != {float(exp)}")
            elif name in free:   # moments of rounding noise: both must stay at noise level
                if not max(act.abs().max(), exp.abs().max()) < (1e-24 if key == "exp_avg_sq" else 1e-12):
                    bad.append(f"{name}.{key}: not at noise level ({act.abs().max():.3g}, {exp.abs().max():.3g})")
            elif not (act - exp).norm() <= rtol * exp.norm():
                bad.append(f"{name}.{key}: rel {((act - exp).norm() / exp.norm()).item():.3g}")
    return bad


def assert_same_iteration(actual_run, expected_run, before, rtol):
    free = gradient_free(expected_run)
    assert free == gradient_free(actual_run)
    # Only conv / shortcut biases can be gradient-free (17 of them in WRN-28-2; none in TCDCNN).
    assert all(re.search(r"\.(conv[12]|shortcut)\.bias$", name) for name in free), sorted(free)
    bad = differences(model_state(actual_run), model_state(expected_run), before, rtol, free)
    bad += optimizer_differences(optimizer_state(actual_run), optimizer_state(expected_run), rtol, free)
    assert not bad, f"{len(bad)} tensors differ:\n" + "\n".join(bad)


_SCRIPT_AFTER = {}


def script_iteration(method, task_name, dtype=torch.float64):
    """The script's ``train_step`` from the primed state on batch 2 (shared by the tests that read it):
    (primed run, batch, run after the iteration, the gradient slots at each optimizer step)."""
    key = (method, task_name, dtype)
    if key not in _SCRIPT_AFTER:
        train_step, base = primed_run(method, task_name, dtype)
        batch = make_batch(base, dtype, seed=2)
        script_run = copy.deepcopy(base)
        calls = capture_optimizer_steps(script_run)
        torch.manual_seed(3)
        train_step(script_run, batch)
        _SCRIPT_AFTER[key] = (base, batch, script_run, calls)
    return _SCRIPT_AFTER[key]


def run_script_and_reference(method, task_name, dtype=torch.float64, virtual_step_scale=1.0):
    """From one primed state: (state before, run after the script's train_step, run after the reference)."""
    base, batch, script_run, _ = script_iteration(method, task_name, dtype)
    ref_run = copy.deepcopy(base)
    torch.manual_seed(3)
    reference_iteration(ref_run, batch, method, task_name, virtual_step_scale)
    return model_state(base), script_run, ref_run, base


# ============================================================================ 1. the independent reference

@pytest.mark.parametrize("method, task_name", CONFIGS, ids=CONFIG_IDS)
def test_train_step_equals_independent_reference(method, task_name):
    """float64: every parameter, BN buffer and optimizer-state tensor of student, EMA-E and mean teacher
    after one iteration agrees to 1e-9 relative (of how far the tensor moved in the iteration; for the
    17 gradient-free WRN biases, of its value, and their Adam moments must be rounding noise in both)."""
    before, script_run, ref_run, base = run_script_and_reference(method, task_name)
    assert script_run.args.meta_grad == "exact"                     # the default route
    assert_same_iteration(script_run, ref_run, before, rtol=1e-9)
    assert len(gradient_free(ref_run)) == (17 if task_name == "cifar10" else 0)
    # Two optimizer steps share one state: Adam's step count advances by 2 (docs/faithfulness.md §1.5).
    if task_name == "cifar10":
        steps_before = {n: float(s["step"]) for n, s in optimizer_state(base).items()}
        steps_after = {n: float(s["step"]) for n, s in optimizer_state(script_run).items()}
        assert steps_after == {n: s + 2 for n, s in steps_before.items()}
        assert not DEAD_BN & set(steps_after)                       # never a gradient, never a state


@pytest.mark.parametrize("method, task_name", CONFIGS, ids=CONFIG_IDS)
def test_reference_comparison_detects_a_one_percent_change_of_the_virtual_step(method, task_name):
    """The comparison above can fail: the same reference with η·1.01 misses the script by more than 10×
    the tolerance (the meta step's share of an iteration's change is smallest in AFLW L2I-L, ~4e-5)."""
    before, script_run, ref_run, _ = run_script_and_reference(method, task_name, virtual_step_scale=1.01)
    bad = differences(model_state(script_run), model_state(ref_run), before, rtol=1e-8, free=gradient_free(ref_run))
    assert sum(name.startswith("student.") for name in bad) >= 5, f"a 1 % change of η went unnoticed: {bad}"


# ============================================================================ 2. exact vs unroll

@pytest.mark.parametrize("method, task_name", CONFIGS, ids=CONFIG_IDS)
def test_exact_and_unroll_train_steps_agree_in_float32(method, task_name):
    """``--meta-grad exact`` and ``unroll`` from identical state, float32, WRN-28-2 / TCDCNN, batch 4.

    The two routes compute the same second-order quantity in a different order, so their meta-gradients
    differ by float32 rounding and optimizer step #2 carries that into the weights. Tolerance, per
    student tensor: |θ_exact − θ_unroll| ≤ 1e-3·|meta step's contribution| + 1e-6·|whole change of the
    iteration| + ε₃₂·|θ|, where the meta contribution is the difference to the same iteration with a zero
    virtual step. The first term: the meta step agrees to 0.1 %; the second: the float32 resolution of an
    update (in CIFAR L2I-L the meta step is only ~1e-4 of the change, so there the difference, ~4e-7 of
    the change, is at that resolution); the third: every updated weight may round to a neighbouring
    float32 (1 ulp ≤ ε₃₂ = 1.2e-7 relative). Which way the last bits go depends on the CPU's kernels:
    on an AVX2 CPU the worst tensor was at 0.36 of the bound without the third term; on an AVX-512 CPU
    two tensors then exceeded it by 1.5e-8 (TCDCNN's first conv, AFLW L2I-O) and 2e-8 (a WRN shortcut
    bias, CIFAR L2I-L): a few ulps of weights of norm 3 and 0.5. With it the worst is 0.2 of the bound.
    A wrong factor in the meta-gradient moves a tensor by about its meta contribution, which is ≥ 10×
    the bound in 86 of 88 WRN tensors in CIFAR L2I-O (median 900×), 60 of 88 in CIFAR L2I-L (median
    25×) and all 12 TCDCNN tensors in AFLW L2I-O (median 100×). AFLW L2I-L's meta step is below the
    float32 resolution of the labels it refines (the routes agree bit for bit), so only the float64
    tests above see it. The 17 gradient-free WRN biases (``gradient_free``: Adam steps on rounding
    noise) are left out."""
    train_step, base = primed_run(method, task_name, torch.float32)
    batch = make_batch(base, torch.float32, seed=2)
    results = {}
    for label, meta_grad, virtual_step in (("exact", "exact", None), ("unroll", "unroll", None),
                                           ("no_meta", "exact", 0.0)):
        run = copy.deepcopy(base)
        run.args.meta_grad = meta_grad
        if virtual_step is not None:
            run.args.virtual_step = virtual_step
        train_step(run, batch)
        results[label] = model_state(run)
        if label == "exact":
            free = gradient_free(run)
    assert len(free) == (17 if task_name == "cifar10" else 0)
    before = model_state(base)
    bad, meta_total = [], 0.0
    for buffer_name, _ in base.student.named_buffers():   # same three student forwards in both routes
        name = f"student.{buffer_name}"
        assert torch.equal(results["exact"][name], results["unroll"][name]), name
    for param_name, _ in base.student.named_parameters():
        if param_name in free:
            continue
        name = f"student.{param_name}"
        exact = results["exact"][name]
        diff = (exact - results["unroll"][name]).norm().item()
        meta_part = (exact - results["no_meta"][name]).norm().item()
        total = (exact - before[name]).norm().item()
        resolution = torch.finfo(torch.float32).eps * before[name].norm().item()
        meta_total += meta_part
        if not diff <= 1e-3 * meta_part + 1e-6 * total + resolution:
            bad.append(f"{name}: |exact−unroll| {diff:.3g}, meta step {meta_part:.3g}, iteration {total:.3g}")
    assert meta_total > 0  # the meta step changes the weights (else the comparison would be empty)
    assert not bad, "\n".join(bad)


# ============================================================================ 3. BN side effects

def tracked(model):
    return {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}


@pytest.mark.parametrize("meta_grad", ["exact", "unroll"])
@pytest.mark.parametrize("method", ["L2I-O", "L2I-L"])
def test_cifar_iteration_updates_bn_statistics_only_in_the_three_student_forwards(method, meta_grad):
    """The student's BN statistics move exactly three times per iteration — the two interleaved MT
    forwards and the extra view-1 forward (docs/faithfulness.md §1.7) — and the meta step (label generator, virtual
    forward at θ', JVP) never touches them (docs/method.md §2.4); the mean teacher's once (its forward on view 2,
    train mode, docs/method.md §2.1); EMA-E's not at all (synchronised at the end of an epoch only)."""
    train_step, base = primed_run(method, "cifar10", torch.float32)   # after one iteration (default route)
    run, replay = copy.deepcopy(base), copy.deepcopy(base)
    run.args.meta_grad = meta_grad
    batch = make_batch(run, torch.float32, seed=2)
    student_before, teacher_before = tracked(run.student), tracked(run.mean_teacher.model)
    assert len(student_before) == 25 and set(student_before.values()) == {3}  # 12 blocks × 2 + head
    assert set(teacher_before.values()) == {1}
    ema_buffers = {n: b.clone() for n, b in run.ema_eval.model.named_buffers()}
    train_step(run, batch)
    assert tracked(run.student) == {n: c + 3 for n, c in student_before.items()}
    assert tracked(run.mean_teacher.model) == {n: c + 1 for n, c in teacher_before.items()}
    for name, buffer in run.ema_eval.model.named_buffers():
        assert torch.equal(buffer, ema_buffers[name]), name
    # Not only the counters: the statistics are exactly those of the three forwards, i.e. the MT update
    # (the same code as train-MT.py) followed by one plain student forward on view 1.
    mt_update(replay, batch)
    with torch.no_grad():
        replay.student(batch.u1)
    for (name, buffer), (_, expected) in zip(run.student.named_buffers(), replay.student.named_buffers()):
        assert torch.equal(buffer, expected), name


# ============================================================================ 4. zero virtual step

def capture_optimizer_steps(run, with_parameters=False):
    """Record the student's gradient slots at every optimizer step of ``run`` (and, if asked, each
    parameter before and after the step)."""
    calls, real_step = [], run.optimizer.step

    def step(*args, **kwargs):
        grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in run.student.named_parameters()}
        params = {n: p.detach().clone() for n, p in run.student.named_parameters()}
        result = real_step(*args, **kwargs)
        if with_parameters:
            calls.append({"grads": grads, "parameters": {n: (params[n], p.detach().clone())
                                                         for n, p in run.student.named_parameters()}})
        else:
            calls.append(grads)
        return result
    run.optimizer.step = step
    return calls


def mt_iteration_then_zero_gradient_step(run, batch):
    """An MT iteration (train-MT.py's consistency update) with L2I-O's extras and a zero meta-gradient:
    the extra view-1 forward (CIFAR, its BN update), EMA-E after step #1 (AFLW), optimizer step #2 on
    zero gradients in every slot the meta-gradient fills, then EMA-E and the mean teacher."""
    mt_update(run, batch)
    if run.task.name == "aflw":
        run.ema_eval.update(run.student)
    with torch.no_grad():
        run.student(batch.u1)
    for name, p in run.student.named_parameters():
        p.grad = None if name in DEAD_BN else torch.zeros_like(p)
    run.optimizer.step()
    run.ema_eval.update(run.student)
    run.mean_teacher.update(run.student, run.step)


@pytest.mark.parametrize("task_name", ["cifar10", "aflw"])
def test_l2io_with_zero_virtual_step_is_mt_plus_an_optimizer_step_on_zero_gradients(task_name):
    """``--virtual-step 0``: θ' = θ, the meta-gradient is exactly zero, but optimizer step #2 still runs
    on the shared state (Adam's moments decay and its step counter advances; SGD's momentum and weight
    decay move the weights) — so the iteration is NOT an MT iteration, but an MT iteration plus that step."""
    train_step, base = primed_run("L2I-O", task_name, torch.float64)
    batch = make_batch(base, torch.float64, seed=2)
    before = model_state(base)
    script_run, ref_run, composed = (copy.deepcopy(base) for _ in range(3))
    script_run.args.virtual_step = 0.0
    calls = capture_optimizer_steps(script_run, with_parameters=True)
    train_step(script_run, batch)
    assert len(calls) == 2
    # Step #2 on zero gradients is not a no-op: every trained tensor moves (so a bare MT iteration would
    # end elsewhere).
    for name, (before_step, after_step) in calls[1]["parameters"].items():
        assert (name in DEAD_BN) == torch.equal(before_step, after_step), name
    calls = [c["grads"] for c in calls]
    for name, grad in calls[1].items():       # the meta-gradient written into the slots: exactly zero
        if name in DEAD_BN:
            assert grad is None, name
        else:
            assert grad is not None and torch.count_nonzero(grad) == 0, name
    reference_iteration(ref_run, batch, "L2I-O", task_name, virtual_step_scale=0.0)
    assert_same_iteration(script_run, ref_run, before, rtol=1e-9)
    mt_iteration_then_zero_gradient_step(composed, batch)
    assert_same_iteration(script_run, composed, before, rtol=1e-12)


@pytest.mark.parametrize("task_name", ["cifar10", "aflw"])
def test_l2il_with_zero_virtual_step_keeps_the_imputed_labels(task_name):
    """``--virtual-step 0``: the refinement loss targets exactly the unrefined imputed labels — the
    post-step-#1 student's output on view 2 (recomputed here from a snapshot), made a label for view 1;
    with the default virtual step the refined labels differ from them."""
    train_step, base = primed_run("L2I-L", task_name, torch.float64)
    batch = make_batch(base, torch.float64, seed=2)
    changes = {}
    for virtual_step in (0.0, None):
        run = copy.deepcopy(base)
        if virtual_step is not None:
            run.args.virtual_step = virtual_step
        after_step1, targets, real_step = [], [], run.optimizer.step

        def step(*args, **kwargs):
            result = real_step(*args, **kwargs)
            after_step1.append(copy.deepcopy(run.student))
            return result
        run.optimizer.step = step
        real_loss = run.task.consistency_loss
        run.task.consistency_loss = lambda out, target: (targets.append(target.detach().clone()),
                                                         real_loss(out, target))[1]
        train_step(run, batch)
        assert len(targets) == 2 and len(after_step1) == 2  # the MT loss, then the refinement loss
        with torch.no_grad():
            unrefined = run.task.impute(after_step1[0].train()(batch.u2), batch)
        changes[virtual_step] = ((targets[1] - unrefined).norm() / unrefined.norm()).item()
    assert changes[0.0] == 0.0
    assert changes[None] > 1e-5, changes    # measured: 1.6e-2 (CIFAR-10), 2.2e-4 (AFLW)


# ============================================================================ 5. facts of docs/method.md §2.4 and §5.2

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_wrn_functional_forward_equals_module_forward(mode):
    """torch.func.functional_call with the module's own parameters and buffers is the module forward
    (outputs, parameter gradients, BN buffer updates); with CLONED buffers (the meta step, docs/method.md §2.4)
    it computes the same and leaves the module's statistics alone."""
    torch.manual_seed(0)
    model = WideResNet().double()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(2):
            model(2 * torch.randn(4, 3, 32, 32, dtype=torch.float64) + 0.5)
    model.train(mode == "train")
    twin, isolated = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    expected = model(x)
    actual = functional_call(twin, (dict(twin.named_parameters()), dict(twin.named_buffers())), (x,))
    assert torch.equal(actual, expected)
    grads_expected = torch.autograd.grad(expected.square().sum(), list(model.parameters()), allow_unused=True)
    grads_actual = torch.autograd.grad(actual.square().sum(), list(twin.parameters()), allow_unused=True)
    for (name, _), a, e in zip(model.named_parameters(), grads_actual, grads_expected):
        assert (a is None and e is None) or torch.equal(a, e), name
    for (name, b), (_, t) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(t, b), name
    buffers_before = {n: b.clone() for n, b in isolated.named_buffers()}
    cloned = {n: b.clone() for n, b in isolated.named_buffers()}
    out = functional_call(isolated, (dict(isolated.named_parameters()), cloned), (x,))
    assert torch.equal(out, expected)
    for name, b in isolated.named_buffers():
        assert torch.equal(b, buffers_before[name]), name
    changed = [n for n, b in cloned.items() if not torch.equal(b, buffers_before[n])]
    assert bool(changed) == (mode == "train")   # train mode: the clones took the update


@pytest.mark.parametrize("task_name", ["cifar10", "aflw"])
def test_l2io_meta_gradient_on_the_label_generator_is_nonzero(task_name):
    """With θ' ≠ θ the meta-gradient that L2I-O writes into the label generator's (= the student's)
    gradient slots before optimizer step #2 is non-zero in every parameter tensor except the four dead
    WRN BN tensors, which it leaves empty (docs/method.md §3.3 step 13, docs/models.md §1), and the 17 biases whose gradient BN
    cancels (rounding noise, see ``gradient_free``); it replaces step #1's gradient."""
    _, _, run, calls = script_iteration("L2I-O", task_name)
    assert len(calls) == 2
    step1, step2 = calls
    free = gradient_free(run)   # BN-cancelled biases: zero up to rounding noise in both steps
    largest = max(g.norm() for g in step2.values() if g is not None)
    for name, grad in step2.items():
        if name in DEAD_BN:
            assert grad is None and step1[name] is None, name
        elif name in free:
            assert grad is not None and grad.norm() < 1e-12 * largest, name
        else:
            assert grad is not None and grad.norm() > 1e-6 * largest, name
            assert (grad - step1[name]).norm() > 1e-3 * grad.norm(), name
    if task_name == "cifar10":
        assert DEAD_BN <= set(step2)


# ============================================================================ 6. end to end, command line

SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
E2E_OPTIONS = ["--batch-size", "8", "--val-iteration", "2", "--epochs", "2", "--gpu", "cpu", "--workers", "0",
               "--no-progress"]
E2E_N_LABELED = {"cifar10": ["--n-labeled", "40", "--n-val", "20"], "aflw": ["--n-labeled", "0.2"]}
E2E_RUNS = [(method, task, "exact") for method, task in CONFIGS] + [("L2I-O", "cifar10", "unroll")]
E2E_IDS = [f"{task}-{method}-{grad}" for method, task, grad in E2E_RUNS]
LOG_COLUMNS = {
    "cifar10": ["Train Loss", "Train Loss X", "Train Loss U", "Valid Loss", "Valid Acc.", "Test Loss", "Test Acc."],
    "aflw": ["Train Loss", "Train Loss X", "Train Loss U", "Train ME", "Train FR", "Valid Loss", "Valid ME.",
             "Valid FR", "Test Loss", "Test ME.", "Test FR"]}
# docs/method.md §5.1 / docs/defaults.md §1–§2: the per-task meta defaults every run folder must record.
META_DEFAULTS = {
    ("L2I-O", "cifar10"): dict(virtual_step=50.0, virtual_reduction="sum", virtual_squash="none", ema_updates=1),
    ("L2I-L", "cifar10"): dict(virtual_step=100.0, virtual_reduction="sum", virtual_squash="none", ema_updates=1,
                               label_step=1.0),
    ("L2I-O", "aflw"): dict(virtual_step=10.0, virtual_reduction="mean", virtual_squash="tanh", ema_updates=2),
    ("L2I-L", "aflw"): dict(virtual_step=1.0, virtual_reduction="mean", virtual_squash="none", ema_updates=2,
                            label_step=1.0),
}
EVAL_MODEL = {("L2I-O", "cifar10"): "ema", ("L2I-L", "cifar10"): "ema", ("L2I-O", "aflw"): "ema",
              ("L2I-L", "aflw"): "student"}   # docs/method.md §5.1 "evaluated model"


class CliRuns(threading.Thread):
    """The E2E_RUNS through the real command line, started in the background when the module starts, so
    that they overlap the in-process tests (one subprocess at a time, one thread each: with pytest's own
    thread that fills a 2-core machine); ``wait`` allows two at a time once pytest itself is idle."""

    def __init__(self, base, roots):
        super().__init__(daemon=True)
        self.base, self.roots = base, roots
        self.parallel, self.results, self.running, self.stopped = 1, {}, {}, False

    def launch(self, key):
        method, task, grad = key
        folder = self.base / "-".join(key)
        argv = ["--data-root", self.roots[task], *E2E_N_LABELED[task], *E2E_OPTIONS, "--out", str(folder)]
        if grad != "exact":   # the exact runs use the default, as a user would
            argv += ["--meta-grad", grad]
        out, err = open(self.base / f"{folder.name}.out", "w"), open(self.base / f"{folder.name}.err", "w")
        proc = subprocess.Popen([sys.executable, f"train-{method}.py", *argv], cwd=REPO, env=SCRIPT_ENV,
                                stdout=out, stderr=err)
        self.running[key] = (proc, folder, out, err, time.time())

    def run(self):
        todo = list(E2E_RUNS)
        while (todo or self.running) and not self.stopped:
            while todo and len(self.running) < self.parallel:
                self.launch(todo.pop(0))
            time.sleep(0.05)
            for key, (proc, folder, out, err, started) in list(self.running.items()):
                if proc.poll() is None and time.time() - started > 300:
                    proc.kill()
                if proc.poll() is not None:
                    out.close()
                    err.close()
                    self.results[key] = SimpleNamespace(returncode=proc.wait(), folder=folder,
                                                        stdout=Path(out.name).read_text(),
                                                        stderr=Path(err.name).read_text())
                    del self.running[key]

    def wait(self):
        self.parallel = 2
        self.join()
        return self.results

    def stop(self):
        self.stopped = True
        for proc, *_ in list(self.running.values()):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module", autouse=True)
def cli_launcher(request, tmp_path_factory):
    """Starts the command-line runs at the beginning of this module — only if a test will read them."""
    if not any("cli_runs" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    roots = {"cifar10": request.getfixturevalue("cifar10_root"), "aflw": request.getfixturevalue("aflw_root")}
    launcher = CliRuns(tmp_path_factory.mktemp("l2i-runs"), roots)
    launcher.start()
    yield launcher
    launcher.stop()


@pytest.fixture(scope="module")
def cli_runs(cli_launcher):
    return cli_launcher.wait()


def finished(cli_runs, key):
    result = cli_runs[key]
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.folder


def read_log_rows(folder, task):
    lines = (folder / "log.txt").read_text().rstrip("\n").split("\n")
    assert lines[0] == "".join(f"{c}\t" for c in LOG_COLUMNS[task])
    return [dict(zip(LOG_COLUMNS[task], map(float, line.split("\t")[:-1]))) for line in lines[1:]]


def load_checkpoint_file(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("key", E2E_RUNS, ids=E2E_IDS)
def test_cli_run_writes_the_run_folder(cli_runs, key):
    method, task, grad = key
    folder = finished(cli_runs, key)
    names = {p.name for p in folder.iterdir()}
    events = {n for n in names if n.startswith("events.out.tfevents.")}
    assert len(events) == 1 and names - events == RUN_FILES, names
    assert re.findall(r"^epoch (\d+/\d+) ", cli_runs[key].stdout, flags=re.M) == ["1/2", "2/2"]
    rows = read_log_rows(folder, task)          # the task's header (docs/evaluation.md §1–§2), one row per epoch
    assert len(rows) == 2 and all(np.isfinite(v) for row in rows for v in row.values())
    summary = json.loads((folder / "summary.json").read_text())
    assert (summary["method"], summary["dataset"], summary["epochs"], summary["finished"]) == (method, task, 2, True)
    metric = "Valid Acc." if task == "cifar10" else "Valid ME."
    assert summary["best_val"] == pytest.approx((max if task == "cifar10" else min)(r[metric] for r in rows),
                                                abs=1e-6)
    state = load_checkpoint_file(folder / "checkpoint.pth.tar")
    assert state["epoch"] == 2 and state["step"] == 4
    if task == "cifar10":   # Adam: two steps per iteration on one state (docs/faithfulness.md §1.5)
        assert {float(s["step"]) for s in state["kept"]["optimizer"]["state"].values()} == {8.0}


@pytest.mark.parametrize("key", E2E_RUNS, ids=E2E_IDS)
def test_cli_args_json_records_the_meta_options(cli_runs, key):
    method, task, grad = key
    args = json.loads((finished(cli_runs, key) / "args.json").read_text())
    assert (args["method"], args["dataset"]) == (method, task)
    expected = dict(META_DEFAULTS[(method, task)], meta_grad=grad)
    assert {k: args.get(k) for k in expected} == expected
    if method == "L2I-O":
        assert "label_step" not in args
    assert args["eval_model"] == EVAL_MODEL[(method, task)]
    assert args["lr"] == (0.002 if task == "cifar10" else 0.03)


@pytest.mark.parametrize("method, task_name", CONFIGS, ids=CONFIG_IDS)
def test_cli_logs_the_model_that_spec_evaluates(cli_runs, method, task_name):
    """The logged test loss is that of EMA-E (CIFAR-10, AFLW L2I-O) or of the student (AFLW L2I-L)
    (docs/method.md §5.1), recomputed here from the final checkpoint on the fixture's test set; the other model
    gives another value."""
    folder = finished(cli_runs, (method, task_name, "exact"))
    args = json.loads((folder / "args.json").read_text())
    task = TASKS[task_name]()
    if task_name == "cifar10":
        from dataset.cifar10 import load_cifar10
        task.data = load_cifar10(args["data_root"], 40, 20)
        build = WideResNet
    else:   # the target statistics depend on the labeled subset: the run's own (seed 0) split
        from dataset.aflw import load_aflw
        task.data = load_aflw(args["data_root"], 0.2, rng_generator=torch.Generator().manual_seed(0))
        assert task.data.split == json.loads((folder / "split.json").read_text())
        build = TCDCNN
    task.to(CPU)
    loader = task.eval_loader(task.data.test, SimpleNamespace(**args))
    state = load_checkpoint_file(folder / "checkpoint.pth.tar")
    losses = {}
    for which, key in (("student", "student"), ("ema", "ema_eval")):
        model = build()
        model.load_state_dict(state["kept"][key])
        losses[which] = task.evaluate(model, loader, CPU)["loss"]
    logged = read_log_rows(folder, task_name)[-1]["Test Loss"]
    reported = EVAL_MODEL[(method, task_name)]
    other = "ema" if reported == "student" else "student"
    assert losses[reported] == pytest.approx(logged, abs=2e-6)
    assert abs(losses[other] - logged) > 1e-4


@pytest.mark.parametrize("key", [k for k in E2E_RUNS if k[2] == "exact"], ids=lambda k: f"{k[1]}-{k[0]}")
def test_cli_logs_what_the_meta_step_does(cli_runs, key):
    """Per epoch, to tensorboard and the epoch line: the meta loss M(θ'), the norm of dM/dz (dM/dr) and the
    size of the second optimizer update relative to the first (README "Quick try")."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(finished(cli_runs, key)), size_guidance={"scalars": 0})
    accumulator.Reload()
    for name in ("meta_loss", "meta_grad_norm", "update_ratio"):
        values = [e.value for e in accumulator.Scalars(f"train/{name}")]
        assert len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values), (name, values)
    lines = re.findall(r"^epoch \d/2 .*$", cli_runs[key].stdout, flags=re.M)
    assert len(lines) == 2 and all(re.search(r"meta_loss \S+  meta_grad_norm \S+  update_ratio \S+", line)
                                   for line in lines), lines


def test_cli_l2il_logs_the_refinement_loss(cli_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for task in ("cifar10", "aflw"):
        accumulator = EventAccumulator(str(finished(cli_runs, ("L2I-L", task, "exact"))), size_guidance={"scalars": 0})
        accumulator.Reload()
        values = [e.value for e in accumulator.Scalars("losses/train_loss_refine")]
        assert len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values)


def test_cli_unroll_run_matches_the_exact_run(cli_runs):
    """Same seed, ``--meta-grad unroll`` vs the default ``exact``: CIFAR-10 L2I-O, 2 epochs × 2 iterations,
    float32. Four Adam iterations (eight steps) amplify float32 rounding — Adam moves every element by
    ~lr whatever its gradient's size, so elements with a near-zero gradient follow its rounding noise.
    Tolerances, for student, EMA-E and mean teacher: every tensor within 2e-2 of its norm and the whole
    state within 5e-4 (measured: 3.8e-3, the BN running mean right after a gradient-free bias, and 5e-5);
    the 17 gradient-free biases themselves (``gradient_free``, found from the checkpoint's Adam state)
    follow pure rounding noise (up to 0.12 apart) and are left out. For scale, the same run with
    ``--virtual-step 0`` differs from the exact run by 0.11 (whole state) and up to 1.2 per tensor.
    log.txt: losses within 1e-3 relative (measured ≤ 1.3e-5), accuracies within one image."""
    exact_folder = finished(cli_runs, ("L2I-O", "cifar10", "exact"))
    unroll_folder = finished(cli_runs, ("L2I-O", "cifar10", "unroll"))
    assert (exact_folder / "split.json").read_text() == (unroll_folder / "split.json").read_text()
    exact, unroll = (load_checkpoint_file(f / "checkpoint.pth.tar") for f in (exact_folder, unroll_folder))
    names = [n for n, _ in WideResNet().named_parameters()]
    free = {names[i] for i, s in exact["kept"]["optimizer"]["state"].items() if s["exp_avg_sq"].max().sqrt() < 1e-7}
    assert len(free) == 17
    for key in ("student", "ema_eval", "mean_teacher"):
        diff_sq = norm_sq = 0.0
        for name, value in exact["kept"][key].items():
            other = unroll["kept"][key][name]
            if not value.is_floating_point():
                assert torch.equal(value, other), f"{key}.{name}"
                continue
            if name in free:
                continue
            diff, norm = (value - other).norm().item(), value.norm().item()
            diff_sq, norm_sq = diff_sq + diff ** 2, norm_sq + norm ** 2
            assert diff <= 2e-2 * norm, f"{key}.{name}: {diff / norm:.3g} relative"
        assert diff_sq ** 0.5 <= 5e-4 * norm_sq ** 0.5, f"{key}: {(diff_sq / norm_sq) ** 0.5:.3g} relative"
    rows = [read_log_rows(f, "cifar10") for f in (exact_folder, unroll_folder)]
    for row_exact, row_unroll in zip(*rows):
        for column, value in row_exact.items():
            if column.endswith("Acc."):
                one_image = 100 / (20 if column.startswith("Valid") else 40)
                assert abs(row_unroll[column] - value) <= one_image + 1e-6, column
            else:
                assert row_unroll[column] == pytest.approx(value, rel=1e-3, abs=5e-6), column
