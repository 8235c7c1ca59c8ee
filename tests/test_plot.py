"""utils.plot (learning curves) and utils.diagram.

The run folders here are written directly (args.json and a log.txt from the training code's own writer)
so that each test can choose the curves it needs: identical runs, values that would make matplotlib put
an offset above the axis, two datasets.
"""
import json
import os
import subprocess
import sys

import pytest

from utils import plot
from utils.logger import write_log
from utils.results import load_run
from utils.evaluation import PROTOCOLS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(folder, dataset="cifar10", seed=0, epochs=3, val_iteration=2, test=None, loss=None, finished=True):
    """A run folder of ``epochs`` logged epochs: the test metric ``test[e]`` (default rising), every loss
    ``loss[e]`` (default falling), validation equal to test; a finished one has its summary.json."""
    task = PROTOCOLS[dataset]
    test = test or [10.0 + e for e in range(epochs)]
    loss = loss or [2.0 / (e + 1) for e in range(epochs)]
    os.makedirs(folder)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"method": "MT", "dataset": dataset, "n_labeled": 250 if dataset == "cifar10" else 0.01,
                   "manualSeed": seed, "epochs": epochs, "val_iteration": val_iteration}, f)
    test_key, val_key = f"test_{task.metric}", f"val_{task.metric}"
    rows = [{name: {test_key: t, val_key: t}.get(key, l) for name, key in task.columns} for t, l in zip(test, loss)]
    write_log(str(folder), [name for name, _ in task.columns], rows)
    if finished:
        with open(os.path.join(folder, "summary.json"), "w") as f:
            json.dump(load_run(str(folder))[0].values, f)
    return str(folder)


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def curves(ax):
    """The runs' curves in a panel, without the best-validation stars."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


def assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 10_000


def test_every_panel_states_its_units(tmp_path):
    runs = [load_run(make_run(tmp_path / "c"))[0], load_run(make_run(tmp_path / "a", dataset="aflw"))[0]]
    fig = plot.figure(runs)
    axes = visible_axes(fig)
    assert len(axes) == 2 * 4  # per dataset: the test metric and three losses
    assert all(ax.get_ylabel() and ax.get_xlabel() == plot.X_LABEL for ax in axes)
    assert "epochs × iterations per epoch" in plot.X_LABEL
    ylabels = {ax.get_title(): ax.get_ylabel() for ax in axes}
    assert ylabels["cifar10: test accuracy"] == "top-1 accuracy (%)"
    assert ylabels["aflw: test mean error"] == "mean error (fraction of inter-ocular distance)"
    assert ylabels["cifar10: supervised loss L_x"] == "cross-entropy (nats)"
    assert ylabels["aflw: supervised loss L_x"] == "MSE (normalised coordinates)"


def test_no_offset_text_above_any_axis(tmp_path):
    # Accuracies that differ in the fourth decimal, losses around 1e-5 and millions of iterations: by
    # default matplotlib writes "+9.999e1", "1e-5" and "1e6" beside the axes.
    folder = make_run(tmp_path / "r", val_iteration=1_000_000, test=[99.9901, 99.9903, 99.9905],
                      loss=[1.3e-5, 1.2e-5, 1.1e-5])
    fig = plot.figure([load_run(folder)[0]])
    fig.canvas.draw()
    for ax in visible_axes(fig):
        assert (ax.xaxis.get_offset_text().get_text(), ax.yaxis.get_offset_text().get_text()) == ("", ""), \
            ax.get_title()


def test_coinciding_runs_differ_in_line_style_and_marker(tmp_path):
    runs = [load_run(make_run(tmp_path / f"s{seed}", seed=seed))[0] for seed in range(3)]  # identical curves
    fig = plot.figure(runs)
    for ax in visible_axes(fig):
        line_styles, markers = zip(*[(line.get_linestyle(), line.get_marker()) for line in curves(ax)])
        assert len(set(line_styles)) == len(set(markers)) == 3 and "None" not in markers
    legend_styles = [(h.get_linestyle(), h.get_marker()) for h in fig.legends[0].legend_handles]
    assert legend_styles == [(line.get_linestyle(), line.get_marker()) for line in curves(visible_axes(fig)[0])]


def test_default_output_is_curves_png_here_from_every_run_under_runs(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "runs" / "mt-s0")
    make_run(tmp_path / "runs" / "mt-s1", seed=1)
    os.makedirs(tmp_path / "runs" / "slurm")  # the Slurm logs' folder is not a run
    monkeypatch.chdir(tmp_path)
    assert plot.main([]) == 0
    out, err = capsys.readouterr()
    assert out == "wrote curves.png: 2 runs\n" and err == ""
    assert_png(tmp_path / "curves.png")
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "runs"]


def test_plot_draws_finished_and_in_progress_runs(tmp_path, capsys):
    finished, in_progress = make_run(tmp_path / "finished"), make_run(tmp_path / "in-progress", finished=False)
    out = tmp_path / "figure" / "curves.png"
    assert plot.main([finished, in_progress, "-o", str(out)]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert_png(out)
    labels = [text.get_text() for text in plot.figure([load_run(finished)[0], load_run(in_progress)[0]])
              .legends[0].get_texts()]
    assert labels == ["finished", "in-progress (in progress 3/3 epochs)"]


@pytest.mark.parametrize("argv", [[], ["missing-run"]])
def test_plot_with_no_readable_run_is_an_error(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert plot.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: no run folder could be read")
    assert os.listdir(tmp_path) == []


def test_diagram_command_writes_a_png(tmp_path):
    out = tmp_path / "diagram.png"
    subprocess.run([sys.executable, "-m", "utils.diagram", "-o", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    assert_png(out)
