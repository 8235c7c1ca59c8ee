"""The L2I meta step: gradient of the meta loss at virtually updated weights w.r.t. the imputed labels.

docs/method.md §1.5 (why the first-order route is exact), §3.3/§3.4 (CIFAR-10), §4.4/§4.5 (AFLW), §5.
Let o = f(u; θ) (student on the unlabeled view), z the imputed labels, V(o, z) the virtual loss,
θ' = θ − η ∇θ V and M(θ') the supervised loss on the meta batch. Since ∇θ V = J_f(θ)ᵀ ∇ₒV(o, z)
and only z carries the derivative we want (θ and o are constants here),
    dM/dz = −η ⟨g, ∂/∂z J_fᵀ ∇ₒV(o, z)⟩ = −η ∂/∂z ⟨∇ₒV(o, z), t⟩,   g = ∇M(θ'),  t = J_f(θ) g.
So one ordinary gradient at θ', one forward-mode JVP of f at θ and a tiny autograd in output space
give the second-order quantity exactly ("exact"); "unroll" is the authors' create_graph route (the
reference). Both run the model only through torch.func.functional_call with CLONED buffers, so the
model's BN running statistics and .grad slots are never touched (docs/method.md §2.4).
"""
import contextlib
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from utils.options import META_GRADS


@contextlib.contextmanager
def _quiet_jvp_decompositions():
    """The first forward-mode AD call of a process makes PyTorch script its JVP decompositions with
    ``torch.jit.script``, which warns that it is deprecated: PyTorch's own business, and a line every L2I
    run would print. Only that warning is silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


def _jvp_precision(device_type):
    """Autocast off for the JVP on every device (``--amp``): the tangent carries the whole second-order
    signal, and a bf16 forward-mode pass rounds it to 8 bits (on the CPU, forward-mode AD through batch
    norm with bf16 activations and fp32 statistics also takes ~10 bf16 forwards' time)."""
    return torch.autocast(device_type, enabled=False)


def _jvp(model, names, params, directions, constants, inputs):
    """t = J_f(θ) d: the output of ``model`` on ``inputs`` at θ = ``params`` and its forward-mode tangent in
    the directions ``directions`` (docs/method.md §1.5 step 2).

    forward_ad dual tensors rather than torch.func.jvp, which refuses BN's in-place buffer update. The
    forward runs eagerly even when ``model`` was compiled in place (``--compile``): compiled graphs compute
    primal values only, so a graph traced or cached for plain tensors drops the tangent or fails on the
    dual inputs (pytorch/pytorch#187284; torch 2.14 only falls back to eager while tracing a new graph).
    ``torch.compiler.set_stance("force_eager")`` (torch >= 2.6) is what skips a nested compiled module;
    ``torch.compiler.disable`` around the call does not. A missing tangent is an error, never zeros: it
    would silently turn L2I into Mean Teacher with a second step.
    """
    with torch.compiler.set_stance("force_eager"), _jvp_precision(inputs.device.type), \
            _quiet_jvp_decompositions(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p.detach(), d) for n, p, d in zip(names, params, directions)}
        cloned = {n: b.clone() for n, b in constants.items()}
        tangent = fwAD.unpack_dual(functional_call(model, (duals, cloned), (inputs,))).tangent
    if tangent is None:
        raise RuntimeError("the forward-mode JVP of the student gave no tangent: the student's output does not "
                           "depend on its trainable parameters, or this PyTorch dropped the forward-mode "
                           "tangent; the L2I meta-gradient cannot be computed")
    return tangent


def _zeros_for_unused(grads, like):
    """autograd.grad(..., allow_unused=True) gives None for unused parameters (WRN's 4 dead BN
    tensors, docs/models.md §1): their gradient is zero."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like)]


def _meta_loss_at(model, theta_prime, buffers, meta_inputs, meta_targets, meta_loss):
    """M(θ') via the real module; cloned buffers so the meta forward has no side effect (docs/method.md §2.4)."""
    cloned = {name: b.clone() for name, b in buffers.items()}
    return meta_loss(functional_call(model, (theta_prime, cloned), (meta_inputs,)), meta_targets)


def meta_label_gradient(model, student_out, unlabeled, labels, virtual_loss, meta_inputs, meta_targets,
                        meta_loss, virtual_step_size, method="exact", keep_graph=True, return_meta_loss=False):
    """d M(θ') / d labels, where θ' = θ - virtual_step_size * ∇θ virtual_loss(student_out, labels),
    student_out = model(unlabeled) computed by the caller WITH graph on model's real parameters θ
    (train mode; on `unlabeled` alone), labels = the imputed labels z (any tensor; treated as a
    constant leaf here — the caller back-propagates the returned gradient further itself, e.g.
    `z.backward(grad)` into a label generator for L2I-O, or a plain step `r - step*grad` for L2I-L),
    M(θ') = meta_loss(functional forward of model at θ' on meta_inputs, meta_targets).
    Returns a tensor shaped like `labels`; with return_meta_loss, also the value M(θ') (detached).

    method="exact" (default) and "unroll" give the same answer (see the module docstring).
    keep_graph=True leaves the caller's graph behind `student_out` usable afterwards (L2I-L back-propagates
    through it again); False frees it as soon as it has been used, lowering the peak memory.
    "exact" re-runs `model` on `unlabeled` (the JVP), so the forward must be deterministic: no active
    dropout (WRN-28-2 has rate 0, TCDCNN none) and the same train/eval mode as the caller's forward."""
    if method not in META_GRADS:
        raise ValueError(f"method must be one of {META_GRADS}, got {method!r}")
    # Trainable parameters are θ; anything else (buffers, frozen parameters) enters as a constant.
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    constants = {n: b for n, b in model.named_buffers()}
    constants.update({n: p.detach() for n, p in model.named_parameters() if not p.requires_grad})
    z_leaf = labels.detach().requires_grad_(True)

    if method == "unroll":
        # Authors' route (docs/method.md §3.3 steps 9-12): g_v with create_graph, θ' = stopgrad(θ) - η g_v,
        # backward through the backward into z.
        virtual = virtual_loss(student_out, z_leaf)
        g_v = _zeros_for_unused(torch.autograd.grad(virtual, params, create_graph=True, allow_unused=True),
                                params)
        theta_prime = {n: p.detach() - virtual_step_size * g for n, p, g in zip(names, params, g_v)}
        meta = _meta_loss_at(model, theta_prime, constants, meta_inputs, meta_targets, meta_loss)
        # The double-backward graph shares the caller's nodes: free them only if the caller is done.
        (grad,) = torch.autograd.grad(meta, z_leaf, retain_graph=keep_graph, allow_unused=True)
        grad = torch.zeros_like(labels) if grad is None else grad
        return (grad, meta.detach()) if return_meta_loss else grad

    # "exact" (docs/method.md §1.5). 1) first-order virtual step; z is a constant here. This is the last use of
    # the caller's graph unless the caller back-propagates student_out again (keep_graph).
    virtual = virtual_loss(student_out, labels.detach())
    g_v = _zeros_for_unused(torch.autograd.grad(virtual, params, retain_graph=keep_graph, allow_unused=True),
                            params)
    theta_prime = {n: (p.detach() - virtual_step_size * g).requires_grad_(True)
                   for n, p, g in zip(names, params, g_v)}
    # 2) g = ∇M(θ'), an ordinary gradient.
    meta = _meta_loss_at(model, theta_prime, constants, meta_inputs, meta_targets, meta_loss)
    g = _zeros_for_unused(torch.autograd.grad(meta, list(theta_prime.values()), allow_unused=True),
                          list(theta_prime.values()))
    # 3) t = J_f(θ) g: one forward-mode JVP on `unlabeled` at θ, same mode as the caller's forward.
    tangent = _jvp(model, names, params, g, constants, unlabeled)
    # 4) output-space product: dM/dz = -η ∂/∂z <∇ₒV(o, z), t>, o = student_out held constant.
    out_leaf = student_out.detach().requires_grad_(True)
    (grad_out,) = torch.autograd.grad(virtual_loss(out_leaf, z_leaf), out_leaf, create_graph=True)
    (grad,) = torch.autograd.grad((grad_out * tangent).sum(), z_leaf, allow_unused=True)
    grad = torch.zeros_like(labels) if grad is None else -virtual_step_size * grad
    return (grad, meta.detach()) if return_meta_loss else grad


def virtual_loss(task, batch, student_out, labels, reduction, squash):
    """The consistency loss of the virtual step, V(o, z) (docs/method.md §5.1).

    ``reduction`` "sum" (CIFAR-10: SSE over B×10) or "mean" (AFLW); ``squash`` "tanh" (AFLW L2I-O) or
    "none". The task turns z into a label for view 1 (softmax; shift compensation on AFLW).
    """
    prediction, target = task.prediction(student_out), task.impute(labels, batch)
    if squash == "tanh":
        prediction, target = torch.tanh(prediction), torch.tanh(target)
    squared = (prediction - target) ** 2
    return squared.sum() if reduction == "sum" else squared.mean()


def label_generator_output(model, inputs):
    """The label generator φ = the current student, run on ``inputs`` with graph to its parameters.

    The authors use a copy of the student in train mode (CIFAR-10) or the student itself (AFLW); both
    equal a functional forward with cloned buffers: BN uses this batch's statistics and the student's
    running statistics stay untouched (docs/method.md §5.2).
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return functional_call(model, (dict(model.named_parameters()), buffers), (inputs,))


def imputed_label_gradient(student, task, args, lr, batch, student_out, labels, keep_graph):
    """``meta_label_gradient`` with the run's L2I options (docs/method.md §5.1): the virtual step of size
    ``virtual_step × lr`` (the current lr) on V(o, z) over view 1, and the task's supervised loss on the meta
    batch. ``keep_graph``: whether the caller back-propagates ``student_out`` again afterwards.
    Returns dM/dz and the meta loss M(θ') (detached, for the logs)."""
    return meta_label_gradient(
        student, student_out, batch.u1, labels,
        virtual_loss=lambda out, z: virtual_loss(task, batch, out, z, args.virtual_reduction, args.virtual_squash),
        meta_inputs=batch.x_m, meta_targets=batch.y_m, meta_loss=task.supervised_loss,
        virtual_step_size=args.virtual_step * lr, method=args.meta_grad, keep_graph=keep_graph,
        return_meta_loss=True)
