"""Session-wide fixture datasets, written once in the real on-disk formats (dataset/synthetic.py)."""
import pytest
import torch

from dataset.synthetic import make_aflw_release, make_cifar10

# Tiny CIFAR-10: 12 training and 4 test images per class (120 / 40 images).
CIFAR_PER_CLASS_TRAIN = 12
CIFAR_PER_CLASS_TEST = 4
# Tiny AFLW release: 60 lines in the train list (54 training + 6 validation), 12 test images.
AFLW_TRAIN_LINES = 60
AFLW_TEST = 12


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """A folder holding ``cifar-10-batches-py/`` (pass it as ``--data-root``)."""
    root = tmp_path_factory.mktemp("cifar10-data")
    return str(make_cifar10(root, per_class_train=CIFAR_PER_CLASS_TRAIN, per_class_test=CIFAR_PER_CLASS_TEST))


@pytest.fixture(scope="session")
def aflw_root(tmp_path_factory):
    """The ``aflw_release-2`` folder itself (pass it as ``--data-root``)."""
    root = tmp_path_factory.mktemp("aflw-data")
    return str(make_aflw_release(root, n_train=AFLW_TRAIN_LINES, n_test=AFLW_TEST))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """In-process work on one thread, like the scripts the tests start (OMP_NUM_THREADS=1): tiny tensors
    on a 2-core machine run many times slower when threads oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- --device (tests/test_device.py)
# ``python -m pytest tests --device cuda`` runs the device-relevant tests — those that take the ``device``
# fixture — on CUDA and deselects the rest (CPU facts that CI checks); without CUDA they are all skipped,
# and pytest exits 0. The default, ``--device cpu``, changes nothing: every test runs, the device tests on
# the CPU.
CUDA_MISSING = "CUDA is not available"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs and compilation; `-m \"not slow\"` leaves them out "
                                       "for a first check (CI runs everything)")


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="cuda: run only the tests that take the `device` fixture, on CUDA (all skipped "
                          "without CUDA); cpu (default): every test, the device tests on the CPU")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") != "cuda":
        return
    kept = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if "device" not in getattr(item, "fixturenames", ())]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    if not torch.cuda.is_available():
        for item in kept:
            item.add_marker(pytest.mark.skip(reason=CUDA_MISSING))


@pytest.fixture(scope="session")
def device(request):
    """The device the device-relevant tests run on: ``torch.device("cuda", 0)`` under ``--device cuda``,
    else the CPU."""
    if request.config.getoption("--device") == "cuda":
        if not torch.cuda.is_available():  # only reached when a test was not skipped at collection
            pytest.skip(CUDA_MISSING)
        return torch.device("cuda", 0)
    return torch.device("cpu")
