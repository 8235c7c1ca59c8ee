"""Find and load the top-level ``train-<METHOD>.py`` scripts (their file names are not importable by ``import``)."""
import glob
import importlib.util
import os

from utils.defaults import METHODS
from utils.options import method_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_path(method):
    return os.path.join(REPO, f"train-{method}.py")


def script_methods():
    """The methods of the repository's scripts: the six in their usual order, then copies such as MYVAR."""
    found = {method_name(path) for path in glob.glob(os.path.join(REPO, "train-*.py"))}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def load_script(method):
    spec = importlib.util.spec_from_file_location(f"train_{method.replace('-', '_')}", script_path(method))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs nothing: scripts only train under ``__main__``
    return module
