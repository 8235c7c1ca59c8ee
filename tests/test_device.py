"""The device-relevant tests: what can go wrong on a GPU and not on the CPU, run on the device of
``--device`` (tests/conftest.py; README "Speed on a GPU"). ``python -m pytest tests --device cuda`` runs
exactly these on CUDA; the default run (CI) runs them on the CPU, where most cases duplicate other tests
and are skipped with the reason, so that this module stays cheap there.

* Every script end to end, on every task it supports, through its command line on generated data.
* ``--meta-grad exact`` equals ``unroll`` in float64 on the device (real WRN-28-2 / TCDCNN, the scripts' options).
* A run stopped after epoch 1 and resumed equals the straight run: bit for bit on the CPU; on CUDA within
  the device's own run-to-run noise, measured by a second straight run.
* The speed flags end to end: ``--amp --channels-last``, ``--channels-last``, ``--compile``, ``--tf32``, ``--data-on-device``.
* The meta-gradient of a compiled student equals the eager one's, and under bf16 autocast stays close to fp32.

The script runs are started when the module starts, several at a time on background threads (each is a
fresh interpreter that spends most of its time importing), and the in-process tests come first in the
file, so that they overlap.
"""
import copy
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._dynamo.utils import counters

from tests.test_scripts import AFLW_COLUMNS, CIFAR_COLUMNS, RUN_FILES, assert_ok, assert_same_run, cli, load, read_log
from utils.benchmark import make_config, random_batch
from utils.meta import label_generator_output, meta_label_gradient, virtual_loss

pytestmark = pytest.mark.slow   # end-to-end runs / compilation: left out by `-m "not slow"`

BATCH, ITERATIONS, EPOCHS = 8, 3, 2
DATA = {"cifar10": ["--n-labeled", "40", "--n-val", "20"], "aflw": ["--n-labeled", "0.2"]}
COLUMNS = {"cifar10": CIFAR_COLUMNS, "aflw": AFLW_COLUMNS}
SCRIPT_CASES = [(method, task) for method in ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L") for task in ("cifar10", "aflw")
                if (method, task) != ("MM", "aflw")]   # MixMatch is CIFAR-10 only
CPU_SCRIPT_CASE = ("L2I-O", "aflw")   # its straight run is also the CPU resume test's reference
RESUME_CASES = [("L2I-O", "aflw"), ("MT", "cifar10")]
FLAG_SETS = {"amp+channels-last": ["--amp", "--channels-last"], "channels-last": ["--channels-last"],
             "compile": ["--compile"], "tf32": ["--tf32"], "data-on-device": ["--data-on-device"]}
SPEED_CASES = [(flags, task, method) for flags, task in (("amp+channels-last", "cifar10"), ("channels-last", "aflw"),
                                                          ("compile", "aflw"), ("tf32", "cifar10"),
                                                          ("data-on-device", "cifar10"))
               for method in ("MT", "L2I-O")]
CPU_SPEED_CASES = {("channels-last", "aflw", "L2I-O"), ("data-on-device", "cifar10", "L2I-O")}
META_CASES = [(method, task) for task in ("cifar10", "aflw") for method in ("L2I-O", "L2I-L")]
META_BATCH = 2
# Resume on CUDA: |resumed − straight| ≤ max(RESUME_FACTOR × |repeat − straight|, RESUME_FLOOR), relative.
# Each run is a process of its own, whose cuDNN benchmark mode picks its own algorithms and whose backward
# kernels accumulate with atomics: a correct resume differs from the straight run by about the noise of a
# second straight run; the factor leaves room for that noise's spread. The floor is for a device whose two
# straight runs agree exactly while the resumed process picked other kernels (float32 rounding amplified
# over a few iterations: well under 1e-5). A broken resume (RNG, optimizer, EMA state) trains on other
# batches or steps: about what one epoch changes, asserted ≥ 10 × the tolerance below.
RESUME_FACTOR, RESUME_FLOOR = 10, 1e-4
LOG_RESOLUTION = 1e-6   # log.txt keeps 6 decimals
SKIP_CPU_SCRIPT = ("on the CPU tests/test_scripts.py and test_l2i.py run the scripts end to end (all but PL on "
                   "CIFAR-10); here only L2I-O on AFLW")


def gpu_options(device):
    """The scripts' device options: ``--gpu`` and loader workers (on CUDA, worker processes with pinned
    memory as a GPU run uses them, two for these tiny data sets; none on the CPU, as tests/test_scripts.py)."""
    if device.type == "cpu":
        return ["--gpu", "cpu", "--workers", "0"]
    return ["--gpu", str(device.index or 0), "--workers", "2"]


def skip_on_cpu(device, run_there, reason):
    if device.type == "cpu" and not run_there:
        pytest.skip(reason)


# ----------------------------------------------------------------------------- the background runs

def runs_of(name, params, device):
    """The script runs a test (by name and parameters) reads on ``device``: keys of ``Runs.job``."""
    cpu = device.type == "cpu"
    if name == "test_script_trains_end_to_end":
        case = (params["method"], params["task"])
        return [("straight", *case)] if not cpu or case == CPU_SCRIPT_CASE else []
    if name == "test_resumed_run_equals_the_straight_run":
        case = (params["method"], params["task"])
        if cpu:
            return [("straight", *case), ("resumed", *case)] if case == RESUME_CASES[0] else []
        return [("straight", *case), ("repeat", *case), ("resumed", *case)]
    if name == "test_speed_flags_end_to_end":
        case = (params["flags"], params["task"], params["method"])
        return [("speed", *case)] if not cpu or case in CPU_SPEED_CASES else []
    return []


class Runs:
    """Script runs on background threads, ``parallel`` at a time; ``result(key)`` waits for one."""

    def __init__(self, base, roots, device, parallel):
        self.base, self.roots, self.device = base, roots, device
        self.pool, self.futures = ThreadPoolExecutor(parallel), {}

    def argv(self, method, task, epochs, folder, flags=()):
        return ["--data-root", self.roots[task], *DATA[task], "--batch-size", BATCH, "--val-iteration", ITERATIONS,
                "--epochs", epochs, *gpu_options(self.device), "--no-progress", *flags, "--out", folder]

    def job(self, kind, *case):
        """(folder, CompletedProcess) of a run; for "resumed" (folder, [first epoch, resume], epoch-1 checkpoint)."""
        folder = self.base / "-".join((kind, *case))
        if kind == "speed":
            flags, task, method = case
            return folder, cli(method, *self.argv(method, task, 1, folder, FLAG_SETS[flags]))
        method, task = case
        if kind != "resumed":   # "straight" and "repeat": the same command
            return folder, cli(method, *self.argv(method, task, EPOCHS, folder))
        first = cli(method, *self.argv(method, task, 1, folder))
        if first.returncode:
            return folder, [first], None
        epoch1 = self.base / f"{folder.name}-epoch1.pth.tar"
        shutil.copy(folder / "checkpoint.pth.tar", epoch1)
        resume = cli(method, "--resume", folder, "--epochs", EPOCHS, *gpu_options(self.device), "--no-progress")
        return folder, [first, resume], epoch1

    def start(self, keys):
        # The slowest first: --compile, then the chained resume runs.
        for key in sorted(keys, key=lambda k: (k[0] != "speed" or k[1] != "compile", k[0] != "resumed")):
            if key not in self.futures:
                self.futures[key] = self.pool.submit(self.job, *key)

    def result(self, key):
        return self.futures[key].result()


@pytest.fixture(scope="module", autouse=True)
def runs(request, device, tmp_path_factory):
    """Starts, when the module starts, the script runs of this module's selected tests on this device."""
    keys = {key for item in request.session.items if item.path == request.path
            for key in runs_of(item.originalname, getattr(item, "callspec", None) and item.callspec.params or {},
                               device)}
    if not keys:
        yield None
        return
    roots = {"cifar10": request.getfixturevalue("cifar10_root"), "aflw": request.getfixturevalue("aflw_root")}
    parallel = 2 if device.type == "cpu" else max(2, min(8, (os.cpu_count() or 4) // 2))
    background = Runs(tmp_path_factory.mktemp("device-runs"), roots, device, parallel)
    background.start(keys)
    yield background
    background.pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- in-process: the meta step

@pytest.fixture
def strict_fp32(device):
    """IEEE float32 on CUDA (no TF32 in matmuls or cuDNN convolutions, as the scripts without --tf32)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def meta_setup(method, task, device, dtype):
    """The script's own networks and options (utils.benchmark.make_config) in ``dtype`` and a random batch."""
    torch.manual_seed(0)
    _, setup = make_config(method, task, device, ["--gpu", gpu_options(device)[1], "--batch-size", str(META_BATCH)])
    setup.student.to(dtype)
    setup.task.mean, setup.task.std = setup.task.mean.to(dtype), setup.task.std.to(dtype)
    return setup, random_batch(setup, dtype)


def imputed_labels(setup, batch, model):
    """z: the label generator's output on view 2 (L2I-O, with graph to its parameters) or free labels (L2I-L)."""
    labels = label_generator_output(model, batch.u2)
    return labels.detach().requires_grad_(True) if setup.args.method == "L2I-L" else labels


def meta_gradient(setup, batch, labels, route, model, student_out=None):
    """dM/dz as the L2I scripts compute it (utils.meta.imputed_label_gradient's arguments)."""
    args = setup.args
    student_out = model(batch.u1) if student_out is None else student_out
    return meta_label_gradient(
        model, student_out, batch.u1, labels,
        virtual_loss=lambda out, z: virtual_loss(setup.task, batch, out, z, args.virtual_reduction, args.virtual_squash),
        meta_inputs=batch.x_m, meta_targets=batch.y_m, meta_loss=setup.task.supervised_loss,
        virtual_step_size=args.virtual_step * args.lr, method=route, keep_graph=True)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("method, task", META_CASES, ids=[f"{m}-{t}" for m, t in META_CASES])
def test_exact_meta_gradient_equals_unroll_in_float64(device, method, task):
    """As tests/test_meta.py on the CPU, with the scripts' options, on the device: dM/dz of both routes, and
    for L2I-O dM/dφ (pushed on into the label generator), agree to 1e-10 relative in float64 (rounding
    leaves ~1e-15; an error in the second-order term is of order one)."""
    setup, batch = meta_setup(method, task, device, torch.float64)
    labels = imputed_labels(setup, batch, setup.student)
    student_out = setup.student(batch.u1)
    grads = {route: meta_gradient(setup, batch, labels, route, setup.student, student_out)
             for route in ("exact", "unroll")}
    assert grads["exact"].device == labels.device and grads["exact"].dtype == torch.float64
    assert grads["exact"].norm() > 1e-8 * labels.norm()   # the second-order path is there
    assert relative(grads["exact"], grads["unroll"]) <= 1e-10
    if method == "L2I-O":
        params = list(setup.student.parameters())
        pushed = {route: torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(
            torch.autograd.grad(labels, params, grad_outputs=grad, retain_graph=True, allow_unused=True), params)])
            for route, grad in grads.items()}
        assert pushed["exact"].norm() > 0
        assert relative(pushed["exact"], pushed["unroll"]) <= 1e-10


@pytest.fixture(scope="module")
def compiled_students():
    """Per (device, task): the eager student and an in-place compiled copy with the same weights, as
    --compile builds them; built on first use and shared (compiling takes tens of seconds)."""
    pairs = {}
    # The L2I-L meta step back-propagates the view-1 graph twice: compiled backwards then need buffer
    # donation off (what --compile sets).
    with torch._functorch.config.patch(donated_buffer=False):
        yield pairs
    torch._dynamo.reset()


@pytest.mark.parametrize("method, task", META_CASES, ids=[f"{m}-{t}" for m, t in META_CASES])
def test_compiled_student_gives_the_eager_meta_gradient(device, compiled_students, strict_fp32, method, task):
    """--compile: the JVP runs eagerly on the compiled student (utils.meta._jvp), and its meta-gradient is the
    eager one's. fp32; bound 1e-3 as tests/test_meta_precision.py (measured there 1.4e-7 to 3e-5 on the
    CPU): fused kernels round differently; a lost or stale tangent is off by order one."""
    skip_on_cpu(device, False, "on the CPU tests/test_meta_precision.py compares compiled and eager meta-gradients "
                               "(compiling takes tens of seconds here)")
    setup, batch = meta_setup(method, task, device, torch.float32)
    if (device, task) not in compiled_students:
        compiled = copy.deepcopy(setup.student)
        compiled.compile()
        before = counters["frames"]["ok"]
        compiled(batch.u1)
        assert counters["frames"]["ok"] > before   # the copy really runs compiled code
        compiled_students[(device, task)] = setup.student, compiled
    eager, compiled = compiled_students[(device, task)]
    with torch.no_grad():
        labels = label_generator_output(eager, batch.u2)
    labels = labels.requires_grad_(True)
    expected = meta_gradient(setup, batch, labels, "exact", eager)
    got = meta_gradient(setup, batch, labels, "exact", compiled)
    assert expected.norm() > 0 and torch.isfinite(got).all()
    assert relative(got, expected) <= 1e-3


@pytest.mark.parametrize("method, task", META_CASES, ids=[f"{m}-{t}" for m, t in META_CASES])
def test_bf16_autocast_meta_gradient_is_close_to_fp32(device, strict_fp32, method, task):
    """--amp: the whole meta step under bf16 autocast on the device against fp32. Only the JVP stays fp32;
    the rest carries bf16's 8-bit mantissa: measured 0.005-0.062 relative on the CPU
    (tests/test_meta_precision.py, which sets the bound 0.15 used here); a lost or wrong tangent is off by
    order one. That autocast was on at all is asserted too (that the JVP itself runs in fp32 under autocast,
    which this bound cannot tell, is tests/test_meta_precision.py's, device-independent)."""
    skip_on_cpu(device, task == "aflw", "on the CPU tests/test_meta_precision.py checks CIFAR-10 under bf16 autocast")
    setup, batch = meta_setup(method, task, device, torch.float32)
    results = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            assert setup.student(batch.u1).dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
            labels = label_generator_output(setup.student, batch.u2).detach().requires_grad_(True)
            results[precision] = meta_gradient(setup, batch, labels, "exact", setup.student)
    assert results["fp32"].dtype == torch.float32 and results["fp32"].norm() > 0
    assert torch.isfinite(results["bf16"]).all() and not torch.equal(results["bf16"].float(), results["fp32"])
    assert relative(results["bf16"], results["fp32"]) <= 0.15


# ----------------------------------------------------------------------------- the scripts end to end

def assert_finished_run(folder, proc, device, task, epochs):
    """Exit 0 on ``device``; the run folder complete; one finite row of log.txt per epoch."""
    assert_ok(proc)
    assert f", {device}; " in proc.stdout, proc.stdout[:500]   # the first line names the device trained on
    assert "CUDA is not available" not in proc.stderr
    names = {p.name for p in folder.iterdir()}
    assert RUN_FILES <= names and any(n.startswith("events.out.tfevents.") for n in names), names
    rows = read_log(folder, COLUMNS[task])
    assert len(rows) == epochs
    assert all(math.isfinite(v) for row in rows for v in row.values()), rows
    assert all(row["Train Loss"] > 0 for row in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["finished"] is True and summary["epochs"] == epochs
    return json.loads((folder / "args.json").read_text())


@pytest.mark.parametrize("method, task", SCRIPT_CASES, ids=[f"{m}-{t}" for m, t in SCRIPT_CASES])
def test_script_trains_end_to_end(device, runs, method, task):
    """2 epochs × 3 iterations at batch 8 on the device: exit 0, the run folder complete, finite logs."""
    skip_on_cpu(device, (method, task) == CPU_SCRIPT_CASE, SKIP_CPU_SCRIPT)
    args = assert_finished_run(*runs.result(("straight", method, task)), device, task, EPOCHS)
    assert (args["method"], args["dataset"], args["batch_size"]) == (method, task, BATCH)


def kept_differences(actual, expected):
    """Per kept object of two checkpoints (networks, optimizer): the relative difference of all its
    floating-point tensors together."""
    def flat(obj):
        if torch.is_tensor(obj):
            return [obj.double().flatten()] if obj.is_floating_point() else []
        items = sorted(obj.items(), key=lambda kv: str(kv[0])) if isinstance(obj, dict) else enumerate(obj) \
            if isinstance(obj, (list, tuple)) else []
        return [t for _, value in items for t in flat(value)]
    differences = {}
    for name, value in expected["kept"].items():
        a, b = torch.cat(flat(actual["kept"][name])), torch.cat(flat(value))
        differences[name] = ((a - b).norm() / b.norm()).item()
    return differences


def loss_difference(actual, expected, task):
    """Largest relative difference of the logged losses beyond log.txt's last decimal (the metrics are left
    out: a run-to-run difference of 1e-7 may flip one image's prediction)."""
    a, e = read_log(actual, COLUMNS[task]), read_log(expected, COLUMNS[task])
    assert len(a) == len(e)
    return max(max(abs(x[c] - y[c]) - LOG_RESOLUTION, 0.0) / max(abs(y[c]), LOG_RESOLUTION)
               for x, y in zip(a, e) for c in y if "Loss" in c)


@pytest.mark.parametrize("method, task", RESUME_CASES, ids=[f"{m}-{t}" for m, t in RESUME_CASES])
def test_resumed_run_equals_the_straight_run(device, runs, method, task):
    """Stopped after epoch 1 of 2 and resumed: bit for bit the straight run on the CPU; on CUDA within
    RESUME_FACTOR × the difference between two straight runs (or RESUME_FLOOR), in the kept networks and
    optimizer state and in the logged losses. The tolerance must lie 10× below what one epoch changes."""
    skip_on_cpu(device, (method, task) == RESUME_CASES[0], "on the CPU tests/test_scripts.py resumes MT on "
                                                           "CIFAR-10 after a real Ctrl-C, bit for bit")
    straight, proc = runs.result(("straight", method, task))
    assert_finished_run(straight, proc, device, task, EPOCHS)
    resumed, procs, epoch1 = runs.result(("resumed", method, task))
    for p in procs:
        assert_ok(p)
    assert load(epoch1)["epoch"] == 1 and load(resumed / "checkpoint.pth.tar")["epoch"] == EPOCHS
    assert_finished_run(resumed, procs[1], device, task, EPOCHS)
    final = load(straight / "checkpoint.pth.tar")
    if device.type == "cpu":
        assert_same_run(straight, resumed)
        noise = {"weights": 0.0, "losses": 0.0}   # CPU runs are bit-reproducible (asserted just above)
    else:
        repeat, proc = runs.result(("repeat", method, task))
        assert_finished_run(repeat, proc, device, task, EPOCHS)
        noise = {"weights": max(kept_differences(load(repeat / "checkpoint.pth.tar"), final).values()),
                 "losses": loss_difference(repeat, straight, task)}
    off = {"weights": max(kept_differences(load(resumed / "checkpoint.pth.tar"), final).values()),
           "losses": loss_difference(resumed, straight, task)}
    for what in off:
        tolerance = max(RESUME_FACTOR * noise[what], RESUME_FLOOR)
        assert off[what] <= tolerance, (f"resumed vs straight {what}: {off[what]:.3g} > {tolerance:.3g} "
                                        f"({RESUME_FACTOR} × the repeat's {noise[what]:.3g})")
    one_epoch = kept_differences(load(epoch1), final)["student"]
    assert 10 * max(RESUME_FACTOR * noise["weights"], RESUME_FLOOR) <= one_epoch, \
        f"the tolerance would not see a lost epoch: two straight runs differ by {noise['weights']:.3g}, " \
        f"one epoch changes the student by {one_epoch:.3g}"


@pytest.mark.parametrize("flags, task, method", SPEED_CASES, ids=[f"{m}-{t}-{f}" for f, t, m in SPEED_CASES])
def test_speed_flags_end_to_end(device, runs, flags, task, method):
    """One epoch with the flags through the command line: it finishes with finite values and records them."""
    skip_on_cpu(device, (flags, task, method) in CPU_SPEED_CASES,
                "on the CPU tests/test_speed.py trains with each flag in-process (and MT with --data-on-device "
                "end to end); here only L2I-O with --channels-last and --data-on-device")
    args = assert_finished_run(*runs.result(("speed", flags, task, method)), device, task, 1)
    assert {f for f in ("amp", "channels_last", "compile", "tf32", "data_on_device") if args[f]} == \
        {f.lstrip("-").replace("-", "_") for f in FLAG_SETS[flags]}
