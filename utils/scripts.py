"""Load a top-level ``train-<METHOD>.py`` as a module (its file name is not importable by ``import``)."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("SL", "PL", "MT", "MM", "L2I-O", "L2I-L")


def script_path(method):
    return os.path.join(REPO, f"train-{method}.py")


def load_script(method):
    spec = importlib.util.spec_from_file_location(f"train_{method.replace('-', '_')}", script_path(method))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs nothing: scripts only train under ``__main__``
    return module
