"""What a first GPU run needs, checked on the CPU with a faked CUDA (pytest's monkeypatch).

``--gpu`` left out means GPU 0 and the chosen GPU becomes the current one; a resume saves and restores
only the training device's CUDA generator (a run saved on an 8-GPU node resumes on a 1-GPU node);
``--tf32`` is opt-in and ``configure_backends`` sets TF32 explicitly for matmuls and convolutions.
"""
import io
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from utils import benchmark
from utils.errors import UserError
from utils.options import FLAGS, SPEED_FLAGS, common_parser, finalize
from utils.runtime import configure_backends, rng_state, select_device, set_rng_state

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def global_rng_kept():
    """These tests move python's, numpy's and torch's generators; the tests after them see them unmoved."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])


def cuda_state(index):
    """A fake CUDA generator state that names the GPU it came from."""
    return torch.full((16,), index, dtype=torch.uint8)


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fake_cuda(n)`` makes this process see ``n`` CUDA devices; it records ``set_device`` and which device's
    generator is read or written. Like real CUDA, a device id beyond the count raises IndexError."""
    calls = SimpleNamespace(set_device=[], get_rng=[], set_rng=[], count=0, current=0)

    def index_of(device):
        if isinstance(device, int):
            index = device
        else:
            device = torch.device(device)
            assert device.type == "cuda", device
            index = calls.current if device.index is None else device.index
        if not 0 <= index < calls.count:
            raise IndexError(f"tuple index out of range (CUDA device {index} of {calls.count})")
        return index

    def set_device(device):
        calls.set_device.append(index_of(device))
        calls.current = calls.set_device[-1]

    def get_rng_state(device="cuda"):
        index = index_of(device)
        calls.get_rng.append(index)
        return cuda_state(index)

    def set_rng_state(new_state, device="cuda"):
        calls.set_rng.append((index_of(device), int(new_state[0])))

    def install(count):
        calls.count = count
        for module in (torch.cuda, torch.cuda.random):  # torch.cuda.random: what get/set_rng_state_all call
            monkeypatch.setattr(module, "device_count", lambda: calls.count)
            monkeypatch.setattr(module, "get_rng_state", get_rng_state)
            monkeypatch.setattr(module, "set_rng_state", set_rng_state)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: calls.current)
        return calls
    return install


@pytest.fixture
def backend_flags(monkeypatch):
    """The global backend flags ``configure_backends`` writes, restored exactly after the test. Registered so
    that they are undone legacy flags first, then (torch ≥ 2.9) the ``fp32_precision`` settings, parents
    before children, which gives back PyTorch's own state, not merely an equivalent one."""
    b = torch.backends
    newer = [(b.cudnn.rnn, "fp32_precision"), (b.cudnn.conv, "fp32_precision"), (b.cudnn, "fp32_precision"),
             (b.cuda.matmul, "fp32_precision")]
    for obj, name in newer:
        if hasattr(obj, name):
            monkeypatch.setattr(obj, name, getattr(obj, name))
    for obj, name in [(b.cudnn, "benchmark"), (b.cudnn, "allow_tf32"), (b.cuda.matmul, "allow_tf32")]:
        monkeypatch.setattr(obj, name, getattr(obj, name))


def parsed_gpu(argv):
    """``args.gpu`` as a script gets it after ``finalize``."""
    parser = common_parser("x", "MT", ("cifar10", "aflw"))
    return finalize(parser.parse_args(argv), "MT", "cifar10").gpu


def draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def save_and_load(state):
    """Through a checkpoint file, as the scripts store it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ----------------------------------------------------------------------------- 1. --gpu

def test_gpu_left_out_means_gpu_0_and_makes_it_current(fake_cuda):
    calls = fake_cuda(2)
    assert parsed_gpu([]) is None  # --help says "default 0": finalize leaves it unset
    assert select_device(parsed_gpu([])) == torch.device("cuda", 0)
    assert calls.set_device == [0]


@pytest.mark.parametrize("gpu, index", [("0", 0), ("1", 1), ("1,0", 1)])
def test_gpu_id_is_the_device_and_the_only_one_made_current(fake_cuda, gpu, index):
    calls = fake_cuda(2)
    assert select_device(parsed_gpu(["--gpu", gpu])) == torch.device("cuda", index)
    assert calls.set_device == [index]  # --gpu 1 opens no context on GPU 0


@pytest.mark.parametrize("count", [1, 2, 8])
def test_highest_id_is_used_and_one_beyond_is_refused_in_one_line(fake_cuda, count):
    calls = fake_cuda(count)
    assert select_device(str(count - 1)) == torch.device("cuda", count - 1)
    with pytest.raises(UserError) as error:
        select_device(str(count))
    message = str(error.value)
    assert "\n" not in message and f"--gpu {count}" in message and f"has {count}" in message
    assert calls.set_device == [count - 1]


@pytest.mark.parametrize("gpu", ["gpu0", "-1", "", "cuda:1"])
def test_an_id_that_is_not_a_number_is_refused_in_one_line_with_or_without_cuda(fake_cuda, monkeypatch, gpu):
    calls = fake_cuda(2)
    for available in (True, False):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        with pytest.raises(UserError) as error:
            select_device(gpu)
        assert "\n" not in str(error.value) and "--gpu cpu" in str(error.value)
    assert calls.set_device == []


def test_without_cuda_the_cpu_and_no_note_yet(monkeypatch, capsys):
    """The note that CUDA is missing comes when training starts (tests/test_scripts.py), not here: before
    the data is read, it would precede every data error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device without CUDA"))
    for gpu in (None, "0", "3"):
        assert select_device(gpu) == CPU
        assert capsys.readouterr().err == ""


def test_gpu_cpu_on_a_cuda_machine_touches_no_cuda_device(fake_cuda, capsys):
    calls = fake_cuda(2)
    device = select_device("cpu")
    assert device == CPU and capsys.readouterr().err == ""
    state = rng_state(device)
    assert "cuda" not in state
    set_rng_state(dict(state, cuda=cuda_state(0)), device)  # a state saved on a GPU, resumed with --gpu cpu
    set_rng_state(dict(state, cuda=[cuda_state(0), cuda_state(1)]), device)  # the old format too
    assert calls.set_device == calls.get_rng == calls.set_rng == []


# ----------------------------------------------------------------------------- 2. RNG state across machines

def test_a_run_saved_on_an_8_gpu_node_resumes_on_a_1_gpu_node(fake_cuda):
    saving = fake_cuda(8)
    state = save_and_load(rng_state(select_device("5")))
    assert saving.get_rng == [5]  # only the training GPU's generator is saved
    assert torch.equal(state["cuda"], cuda_state(5))
    resuming = fake_cuda(1)
    resuming.set_device.clear()
    set_rng_state(state, select_device(None))  # IndexError with get_rng_state_all / set_rng_state_all
    assert resuming.set_rng == [(0, 5)]  # GPU 5's stream continues on this machine's GPU 0


def test_a_resume_with_another_gpu_restores_that_gpus_generator(fake_cuda):
    calls = fake_cuda(2)
    state = rng_state(select_device("0"))
    set_rng_state(state, select_device("1"))
    assert calls.get_rng == [0] and calls.set_rng == [(1, 0)]


@pytest.mark.parametrize("saved_gpus, count, gpu, restored_from", [
    (8, 1, "0", 0),   # 8-GPU node → 1-GPU node
    (8, 8, "3", 3),   # the same node and --gpu: the entry the old code restored to that GPU
    (2, 4, "3", 0),   # fewer GPUs saved than the index: the first entry
    (1, 2, "1", 0),
])
def test_the_old_list_format_restores_one_entry_on_cuda(fake_cuda, saved_gpus, count, gpu, restored_from):
    calls = fake_cuda(count)
    old = dict(rng_state(CPU), cuda=[cuda_state(i) for i in range(saved_gpus)])
    device = select_device(gpu)
    set_rng_state(save_and_load(old), device)
    assert calls.set_rng == [(device.index, restored_from)]


def test_the_old_list_format_is_ignored_on_the_cpu(fake_cuda):
    calls = fake_cuda(1)
    expected = draws_after(rng_state(CPU))
    old = dict(rng_state(CPU), cuda=[cuda_state(i) for i in range(8)])
    draws()
    set_rng_state(old, CPU)
    assert draws() == expected and calls.set_rng == []


def draws_after(state):
    """The draws that follow ``state`` (which is restored again afterwards)."""
    result = draws()
    set_rng_state(state, CPU)
    return result


@pytest.mark.parametrize("cuda_available", [False, True])
def test_the_cpu_state_round_trip_is_exact(fake_cuda, monkeypatch, cuda_available):
    if cuda_available:
        fake_cuda(2)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    draws()  # the generators are somewhere in their streams, not at a seed
    state = rng_state(CPU)
    assert sorted(state) == ["numpy", "python", "torch"]  # as before: nothing CUDA on the CPU
    expected = draws()
    random.seed(4)
    np.random.seed(4)
    torch.manual_seed(4)
    np.random.randn()  # numpy's cached Gaussian is part of its state
    set_rng_state(save_and_load(state), CPU)
    assert draws() == expected


# ----------------------------------------------------------------------------- 3. precision

@pytest.mark.parametrize("tf32", [False, True])
def test_configure_backends_sets_tf32_explicitly_on_cuda(backend_flags, tf32):
    b = torch.backends
    b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = False, not tf32, not tf32
    configure_backends(torch.device("cuda", 1), tf32)
    assert b.cudnn.benchmark is True
    assert b.cuda.matmul.allow_tf32 is tf32 and b.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")  # no mixed-API error
    if hasattr(b.cuda.matmul, "fp32_precision"):  # torch ≥ 2.9: its newer settings agree (read, never written)
        assert b.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")


def test_the_fp32_default_is_not_pytorchs_tf32_convolutions(backend_flags):
    b = torch.backends
    b.cudnn.allow_tf32 = True  # PyTorch's default for cuDNN
    configure_backends(torch.device("cuda"), finalize(common_parser("x", "MT", ("cifar10",)).parse_args([]),
                                                      "MT", "cifar10").tf32)
    assert b.cudnn.allow_tf32 is False and b.cuda.matmul.allow_tf32 is False


@pytest.mark.parametrize("tf32", [False, True])
def test_configure_backends_does_nothing_on_the_cpu(backend_flags, tf32):
    b = torch.backends
    b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = False, not tf32, not tf32
    configure_backends(CPU, tf32)
    assert (b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32) == (False, not tf32, not tf32)


def test_tf32_flag_is_opt_in_and_recorded():
    assert "tf32" in FLAGS and "tf32" in SPEED_FLAGS
    for datasets in (("cifar10", "aflw"), ("aflw",)):
        parser = common_parser("x", "MT", datasets)
        assert finalize(parser.parse_args([]), "MT", datasets[0]).tf32 is False  # args.json: false
        assert finalize(parser.parse_args(["--tf32"]), "MT", datasets[0]).tf32 is True
        assert "--tf32" in parser.format_help()


def test_benchmark_passes_tf32_to_the_scripts(monkeypatch):
    class Captured(Exception):
        pass

    def make_config(method, task, device, argv):
        raise Captured(argv)
    monkeypatch.setattr(benchmark, "configurations", lambda opts: iter([("MT", "aflw", None)]))
    monkeypatch.setattr(benchmark, "make_config", make_config)
    for argv, given in ([], False), (["--tf32"], True):
        opts = benchmark.parse_args(["--device", "cpu", "--methods", "MT", "--tasks", "aflw"] + argv)
        assert opts.tf32 is given
        with pytest.raises(Captured) as captured:
            benchmark.benchmark(opts)
        assert ("--tf32" in captured.value.args[0]) is given


@pytest.mark.parametrize("tf32", [False, True])
def test_benchmark_main_times_with_the_training_backend_settings(backend_flags, monkeypatch, capsys, tf32):
    seen = []

    def fake_benchmark(opts):
        b = torch.backends
        seen.append((b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32))
        return []
    monkeypatch.setattr(benchmark, "benchmark", fake_benchmark)
    monkeypatch.setattr(benchmark, "keep_freed_memory", lambda: False)
    torch.backends.cudnn.benchmark = False
    benchmark.main(["--device", "cuda:0"] + (["--tf32"] if tf32 else []))
    capsys.readouterr()
    assert seen == [(True, tf32, tf32)]


# ----------------------------------------------------------------------------- training streams never restart

def restarting_batches(dataset, batch_size, iterations):
    """The authors' stream: a shuffled, drop-last DataLoader restarted whenever it runs out."""
    from torch.utils.data import DataLoader
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    batches, iterator = [], iter(loader)
    while len(batches) < iterations:
        try:
            batches.append(next(iterator))
        except StopIteration:
            iterator = iter(loader)
    return batches


def test_endless_stream_yields_the_restarting_loaders_batches_with_one_iterator(monkeypatch):
    """250 labels at batch 64 run out every 3 iterations. The CIFAR-10 training loader yields an epoch's
    batches from one iterator (no re-created worker processes on a GPU), and with --workers 0 exactly the
    batches and random numbers of the authors' restarted loader: same images, same augmentation, same RNGs."""
    from dataset.cifar10 import CifarImages
    from utils.tasks import Cifar10Task
    images = np.random.default_rng(0).integers(0, 256, size=(250, 32, 32, 3), dtype=np.uint8)
    dataset = CifarImages(images, np.arange(250) % 10, np.arange(250), views=1)
    task = Cifar10Task()
    task.to(CPU)
    args = SimpleNamespace(batch_size=64, val_iteration=10, workers=0, data_on_device=False)
    made = []
    real_iter = torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: made.append(self) or real_iter(self))
    for seed in (0, 1):
        torch.manual_seed(seed)
        np.random.seed(seed)
        endless = list(task.train_loader(dataset, args))
        after_endless = torch.get_rng_state(), np.random.get_state()[1]
        assert len(made) == 1   # one iterator for the whole epoch
        made.clear()
        torch.manual_seed(seed)
        np.random.seed(seed)
        expected = restarting_batches(dataset, 64, 10)
        assert len(endless) == len(expected) == 10
        for (x, y), (x_ref, y_ref) in zip(endless, expected):
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
        assert torch.equal(after_endless[0], torch.get_rng_state())
        assert np.array_equal(after_endless[1], np.random.get_state()[1])
        made.clear()


def test_device_batches_yield_an_epoch_over_fresh_passes():
    from dataset.cifar10 import CifarImages, DeviceBatches
    images = np.random.default_rng(0).integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)
    dataset = CifarImages(images, np.arange(20), np.arange(20), views=1)   # the label names the image
    torch.manual_seed(0)
    batches = list(DeviceBatches(dataset, 8, CPU, batches=5))   # 2 batches per pass, 3 passes
    assert len(batches) == 5
    labels = [b[1].tolist() for b in batches]
    for first, second in ((0, 1), (2, 3)):   # within a pass, no image twice
        assert len(set(labels[first] + labels[second])) == 16
    assert labels[0] + labels[1] != labels[2] + labels[3]   # every pass a fresh permutation
    assert len(list(DeviceBatches(dataset, 8, CPU))) == 2   # without ``batches``: one pass (Train Stats)


# ----------------------------------------------------------------------------- host work per iteration

def record_randperm(monkeypatch):
    calls, real = [], torch.randperm

    def randperm(*args, **kwargs):
        calls.append(kwargs.get("device"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "randperm", randperm)
    return calls


def test_mixmatch_and_device_batches_draw_their_permutation_on_the_device(monkeypatch):
    """No CPU permutation copied to the GPU with a blocking ``.to`` each iteration: the draw names the device."""
    from dataset.cifar10 import CifarImages, DeviceBatches
    from utils.benchmark import make_config, random_batch
    calls = record_randperm(monkeypatch)
    train_step, setup = make_config("MM", "cifar10", CPU, ["--gpu", "cpu", "--batch-size", "4"])
    train_step(setup, random_batch(setup))
    images = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    list(DeviceBatches(CifarImages(images, np.zeros(8, np.int64), np.arange(8), views=1), 4, CPU))
    assert calls == [CPU, CPU]


@pytest.mark.parametrize("task_name", ["cifar10", "aflw"])
def test_evaluation_reads_the_device_once_per_value_not_per_batch(monkeypatch, task_name):
    from torch.utils.data import DataLoader, TensorDataset
    from utils.tasks import TASKS
    task = TASKS[task_name]()
    if task_name == "cifar10":
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
        data = TensorDataset(torch.randn(40, 12), torch.randint(0, 10, (40,)))
    else:
        task.mean, task.std = torch.full((10,), 30.0), torch.full((10,), 8.0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
        data = TensorDataset(torch.randn(40, 12), 30 + 5 * torch.randn(40, 10))
    reads, real_item = [], torch.Tensor.item

    def item(self):
        reads.append(sys._getframe(1).f_code.co_filename)   # who reads: the DataLoader reads its own seed
        return real_item(self)
    monkeypatch.setattr(torch.Tensor, "item", item)
    metrics = task.evaluate(model, DataLoader(data, batch_size=8), CPU)   # 5 batches
    ours = [path for path in reads if "torch" not in path.split("site-packages")[-1][:7]]
    assert len(ours) == len(metrics)   # one read per reported value
