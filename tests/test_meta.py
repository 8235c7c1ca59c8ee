"""utils.meta.meta_label_gradient (docs/method.md §1.5, §2.4, §5).

The four meta-step configurations of docs/method.md §5.1 on a small BN net, WRN-28-2 and TCDCNN, in float64:
"exact" (first-order + forward-mode JVP) == "unroll" (authors' create_graph route) == a central
finite difference of M(θ'(z)) built directly from the definition; plus the side-effect guarantees.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from models.tcdcnn import TCDCNN
from models.wideresnet import WideResNet
from utils.meta import meta_label_gradient

torch.set_num_threads(2)
BATCH = 4
LR_AFLW = 0.03


class SmallBNNet(nn.Module):
    """Tiny conv net with BatchNorm (train mode) and one parameter that never gets a gradient."""

    def __init__(self, in_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6, momentum=0.1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        out = torch.tanh(self.bn1(self.conv1(x)))
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        return self.fc(out.mean((2, 3)))


# --- the four loss configurations of docs/method.md §5.1 -------------------------------------------------
def sse_softmax(o, z):  # CIFAR virtual loss, SSEsum(σ(o), σ(z))
    return ((o.softmax(1) - z.softmax(1)) ** 2).sum()


def soft_cross_entropy(out, y):  # CIFAR meta loss with one-hot y
    return -(y * out.log_softmax(1)).sum(1).mean()


def mse(out, y):  # AFLW meta loss
    return ((out - y) ** 2).mean()


def shift_map(batch, dtype, generator):
    """S of docs/method.md §2.5 as an affine map: normalise ∘ translate ∘ denormalise, one shift per row."""
    mean = torch.randn(10, dtype=dtype, generator=generator)
    std = torch.rand(10, dtype=dtype, generator=generator) + 0.5
    shift = torch.randn(batch, 10, dtype=dtype, generator=generator)
    return lambda z: ((z * std + mean) + shift - mean) / std


CONFIGS = {  # task, label variant, virtual step size η (docs/method.md §5.1)
    "cifar_l2io": ("cls", "O", 0.1),
    "cifar_l2il": ("cls", "L", 0.2),
    "aflw_l2io": ("reg", "O", 10 * LR_AFLW),
    "aflw_l2il": ("reg", "L", LR_AFLW),
}
INPUT_SHAPES = {("small_bn", "cls"): (3, 8, 8), ("small_bn", "reg"): (1, 12, 12),
                ("wrn", "cls"): (3, 32, 32), ("tcdcnn", "reg"): (1, 60, 60)}
CASES = [("small_bn", c) for c in CONFIGS] + [("wrn", "cifar_l2io"), ("wrn", "cifar_l2il"),
                                              ("tcdcnn", "aflw_l2io"), ("tcdcnn", "aflw_l2il")]


class Problem:
    """One meta step as a caller sets it up: label generator φ (a copy of θ) on view 2, student on view 1."""

    def __init__(self, model_name, config, dtype=torch.float64, batch=BATCH, seed=0):
        task, self.variant, self.eta = CONFIGS[config]
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        in_channels = INPUT_SHAPES[(model_name, task)][0]
        self.model = {"small_bn": lambda: SmallBNNet(in_channels), "wrn": WideResNet,
                      "tcdcnn": TCDCNN}[model_name]().to(dtype).train()
        shape = (batch,) + INPUT_SHAPES[(model_name, task)]
        self.u1, self.u2, self.meta_inputs = (torch.randn(shape, dtype=dtype, generator=gen) for _ in range(3))
        if task == "cls":
            self.meta_targets = F.one_hot(torch.randint(0, 10, (batch,), generator=gen), 10).to(dtype)
            self.virtual_loss, self.meta_loss = sse_softmax, soft_cross_entropy
        else:
            self.meta_targets = 0.5 * torch.randn(batch, 10, dtype=dtype, generator=gen)
            shift = shift_map(batch, dtype, gen)
            if self.variant == "O":  # MSEmean(tanh o, tanh S(z)), docs/method.md §4.4
                self.virtual_loss = lambda o, z: ((torch.tanh(o) - torch.tanh(shift(z))) ** 2).mean()
            else:  # MSEmean(o, S(z)), docs/method.md §4.5
                self.virtual_loss = lambda o, z: ((o - shift(z)) ** 2).mean()
            self.meta_loss = mse
        self.phi = {n: p.detach().clone().requires_grad_(True) for n, p in self.model.named_parameters()}
        self.labels = self.label_generator(self.phi)
        if self.variant == "L":
            self.labels = self.labels.detach().requires_grad_(True)  # free logits r / coordinates p
        self.student_out = self.model(self.u1)  # the caller's forward on θ (updates BN stats: its business)

    def buffers(self):
        return {n: b.clone() for n, b in self.model.named_buffers()}

    def label_generator(self, phi):
        return functional_call(self.model, (phi, self.buffers()), (self.u2,))

    def gradient(self, method, eta=None):
        return meta_label_gradient(self.model, self.student_out, self.u1, self.labels, self.virtual_loss,
                                   self.meta_inputs, self.meta_targets, self.meta_loss,
                                   self.eta if eta is None else eta, method=method)

    def generator_gradient(self, dm_dz):
        """L2I-O: push dM/dz into φ with an ordinary backward, as the training scripts do."""
        for p in self.phi.values():
            p.grad = None
        self.labels.backward(dm_dz, retain_graph=True)
        return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                          for p in self.phi.values()])

    def reference_meta_loss(self, labels):
        """M(θ'(z)) from the definition: explicit first-order virtual step, then the meta loss."""
        theta = {n: p.detach().requires_grad_(True) for n, p in self.model.named_parameters()}
        virtual = self.virtual_loss(functional_call(self.model, (theta, self.buffers()), (self.u1,)), labels)
        grads = torch.autograd.grad(virtual, list(theta.values()), allow_unused=True)
        theta_prime = {n: p.detach() if g is None else p.detach() - self.eta * g
                       for (n, p), g in zip(theta.items(), grads)}
        with torch.no_grad():
            out = functional_call(self.model, (theta_prime, self.buffers()), (self.meta_inputs,))
            return self.meta_loss(out, self.meta_targets).item()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def central_difference(f, tensor, index, eps=1e-6):
    """(f(x + eps e_i) - f(x - eps e_i)) / (2 eps), editing `tensor` in place and restoring it."""
    original = tensor[index].item()
    values = []
    for value in (original + eps, original - eps):
        with torch.no_grad():
            tensor[index] = value
        values.append(f())
    with torch.no_grad():
        tensor[index] = original
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("model_name,config", CASES)
def test_exact_matches_unroll(model_name, config):
    problem = Problem(model_name, config)
    exact, unroll = problem.gradient("exact"), problem.gradient("unroll")
    assert exact.shape == problem.labels.shape and exact.dtype == torch.float64
    assert exact.norm() > 1e-8 * problem.labels.norm()  # the second-order path is present
    assert rel_err(exact, unroll) <= 1e-10
    if problem.variant == "O":
        generator_exact, generator_unroll = problem.generator_gradient(exact), problem.generator_gradient(unroll)
        assert generator_exact.norm() > 0
        assert rel_err(generator_exact, generator_unroll) <= 1e-10


@pytest.mark.parametrize("model_name,config", CASES)
def test_matches_finite_difference(model_name, config):
    problem = Problem(model_name, config)
    exact, unroll = problem.gradient("exact"), problem.gradient("unroll")
    # dM/dz at the three largest entries and one arbitrary entry.
    indices = [divmod(i, 10) for i in exact.abs().flatten().topk(3).indices.tolist()] + [(1, 7)]
    labels = problem.labels.detach().clone()
    numeric = torch.tensor([central_difference(lambda: problem.reference_meta_loss(labels), labels, i)
                            for i in indices], dtype=torch.float64)
    for analytic in (exact, unroll):
        assert rel_err(torch.stack([analytic[i] for i in indices]), numeric) <= 1e-6
    if problem.variant == "O":
        # dM/dφ at the largest entry of the generator's last three parameter tensors. (Through early
        # layers a step of eps crosses kinks of LeakyReLU / HardTanh / max-pool, and the central
        # difference is then off by ~1e-4; all of φ is compared with "unroll" in the test above.)
        generator = {"exact": problem.generator_gradient(exact), "unroll": problem.generator_gradient(unroll)}
        blocks, offset = {}, 0  # name -> (start, length) inside the flattened gradient
        for name, p in problem.phi.items():
            blocks[name] = (offset, p.numel())
            offset += p.numel()
        total = generator["exact"].norm()
        chosen = [n for n, (start, length) in blocks.items()
                  if length >= 10 and generator["exact"][start:start + length].norm() > 1e-6 * total][-3:]
        phi = {n: p.detach().clone() for n, p in problem.phi.items()}
        numeric, analytic = [], {k: [] for k in generator}
        for name in chosen:
            start, length = blocks[name]
            entry = int(generator["exact"][start:start + length].abs().argmax())
            index = tuple(torch.unravel_index(torch.tensor(entry), phi[name].shape))
            numeric.append(central_difference(
                lambda: problem.reference_meta_loss(problem.label_generator(phi)), phi[name], index))
            for k in generator:
                analytic[k].append(generator[k][start + entry])
        for k in generator:
            assert rel_err(torch.stack(analytic[k]), torch.tensor(numeric, dtype=torch.float64)) <= 1e-6, k


@pytest.mark.parametrize("method", ["exact", "unroll"])
def test_zero_virtual_step_gives_exact_zero(method):
    problem = Problem("small_bn", "cifar_l2io")
    assert torch.count_nonzero(problem.gradient(method, eta=0.0)) == 0
    assert torch.count_nonzero(problem.gradient(method, eta=0)) == 0
    assert torch.count_nonzero(problem.gradient(method)) > 0


@pytest.mark.parametrize("method", ["exact", "unroll"])
@pytest.mark.parametrize("model_name", ["small_bn", "wrn"])
def test_no_side_effects_on_model(model_name, method):
    problem = Problem(model_name, "cifar_l2il")
    model = problem.model
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    assert any(n.endswith("num_batches_tracked") for n in buffers_before)
    params = list(model.parameters())
    for i, p in enumerate(params):  # some slots hold a gradient, some are empty
        p.grad = torch.randn_like(p) if i % 2 else None
    grads_before = [None if p.grad is None else p.grad.clone() for p in params]
    problem.gradient(method)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers_before[n]), n
    for p, g in zip(params, grads_before):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


@pytest.mark.parametrize("method", ["exact", "unroll"])
def test_caller_graph_survives(method):
    problem = Problem("small_bn", "cifar_l2il")
    params = [p for p in problem.model.parameters()]
    refinement = lambda: ((problem.student_out.softmax(1) - 0.1) ** 2).mean()  # like L2I-L's L_r
    before = torch.autograd.grad(refinement(), params, retain_graph=True, allow_unused=True)
    problem.gradient(method)
    after = torch.autograd.grad(refinement(), params, allow_unused=True)
    for b, a in zip(before, after):
        assert (a is None and b is None) or torch.equal(a, b)


def test_float32_agrees():
    problem = Problem("small_bn", "cifar_l2io", dtype=torch.float32, batch=8)
    exact, unroll = problem.gradient("exact"), problem.gradient("unroll")
    assert exact.dtype == torch.float32 and exact.norm() > 0
    assert rel_err(exact, unroll) <= 1e-4


def test_unknown_method_rejected():
    problem = Problem("small_bn", "aflw_l2il")
    with pytest.raises(ValueError, match="method"):
        problem.gradient("second_order")
