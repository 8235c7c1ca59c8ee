"""Run folders written directly, as the training scripts write them (README "Monitoring and run folders"),
for the tests of utils.results and utils.plot: args.json, log.txt from the training code's own writer,
summary.json when finished, and status.json when asked for (older folders have none)."""
import json
import os
import time

from utils.evaluation import PROTOCOLS
from utils.logger import write_log
from utils.results import load_run


def make_run(folder, dataset="cifar10", seed=0, epochs=3, val_iteration=2, test=None, loss=None, finished=True,
             logged=None, status=None, method="MT", **options):
    """A run folder of ``logged`` (default ``epochs``) logged epochs: the test metric ``test[e]`` (default
    rising), every loss ``loss[e]`` (default falling), validation equal to test. A finished one has its
    summary.json. ``status``: status.json's state, or a dict of its fields (the others filled in from the
    run); None writes none, as in folders older than status.json. ``options``: more args.json keys."""
    task = PROTOCOLS[dataset]
    logged = epochs if logged is None else logged
    test = test or [10.0 + e for e in range(logged)]
    loss = loss or [2.0 / (e + 1) for e in range(logged)]
    os.makedirs(folder)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"method": method, "dataset": dataset, "n_labeled": 250 if dataset == "cifar10" else 0.01,
                   "manualSeed": seed, "epochs": epochs, "val_iteration": val_iteration, **options}, f)
    test_key, val_key = f"test_{task.metric}", f"val_{task.metric}"
    rows = [{name: {test_key: t, val_key: t}.get(key, l) for name, key in task.columns} for t, l in zip(test, loss)]
    write_log(str(folder), [name for name, _ in task.columns], rows)
    if finished:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(load_run(str(folder))[0].values, f)
    if status is not None:
        write_status(folder, status, epochs_done=logged, epochs=epochs)
    return str(folder)


def write_status(folder, status, epochs_done, epochs):
    fields = {"state": status} if isinstance(status, str) else dict(status)
    record = {"state": fields["state"], "detail": fields.get("detail", ""),
              "epochs_done": fields.get("epochs_done", epochs_done), "epochs": fields.get("epochs", epochs)}
    record["attempts"] = [{"started": "2025-01-01T00:00:00+00:00", "state": record["state"],
                           "detail": record["detail"], "epochs_done": record["epochs_done"]}]
    with open(os.path.join(folder, "status.json"), "w") as f:
        json.dump(record, f)


def age_files(folder, seconds):
    """Make every file of ``folder`` look last written ``seconds`` ago."""
    then = time.time() - seconds
    for name in os.listdir(folder):
        os.utime(os.path.join(folder, name), (then, then))
