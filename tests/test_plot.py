"""utils.plot (learning curves) and utils.diagram.

The run folders here are written directly (tests/runfolders.py: args.json, a log.txt from the training
code's own writer, status.json) so that each test can choose the curves it needs: identical runs, values
that would make matplotlib put an offset above the axis, two datasets, runs that ended in every way,
diverged runs.
"""
import os
import subprocess
import sys

import pytest

from tests.runfolders import age_files, make_run
from utils import plot
from utils.results import load_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


def legend_texts(fig):
    return [text.get_text() for text in fig.legends[0].get_texts()]


def test_default_output_is_curves_png_here_from_every_run_under_runs_and_here(tmp_path, monkeypatch, capsys):
    make_run(tmp_path / "runs" / "mt-s0")
    make_run(tmp_path / "runs" / "mt-s1", seed=1)
    os.makedirs(tmp_path / "runs" / "slurm")  # the Slurm logs' folder is not a run
    make_run(tmp_path / "cifar10MT@250", seed=2)  # a training script's default --out: here
    os.makedirs(tmp_path / "data")  # nor is a data folder
    monkeypatch.chdir(tmp_path)
    assert plot.main([]) == 0
    out, err = capsys.readouterr()
    assert out == "wrote curves.png: 3 runs\n" and err == ""
    assert_png(tmp_path / "curves.png")
    assert sorted(os.listdir(tmp_path)) == ["cifar10MT@250", "curves.png", "data", "runs"]


def test_plot_draws_finished_and_in_progress_runs(tmp_path, capsys):
    finished, in_progress = make_run(tmp_path / "finished"), make_run(tmp_path / "in-progress", finished=False)
    out = tmp_path / "figure" / "curves.png"
    assert plot.main([finished, in_progress, "-o", str(out)]) == 0
    assert "2 runs" in capsys.readouterr().out
    assert_png(out)
    assert legend_texts(plot.figure([load_run(finished)[0], load_run(in_progress)[0]])) == [
        "finished", "in-progress — in progress 3/3 epochs"]
    assert plot.main([finished, "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}: 1 run\n"


def test_legend_says_how_each_run_ended(tmp_path):
    folders = [make_run(tmp_path / "done", status="finished"),
               make_run(tmp_path / "ctrl-c", epochs=5, logged=2, finished=False,
                        status={"state": "interrupted", "detail": "Ctrl-C in epoch 3"}),
               make_run(tmp_path / "killed", logged=2, finished=False, status="running"),
               make_run(tmp_path / "new", epochs=1, logged=0, finished=False, status="running"),
               make_run(tmp_path / "old", logged=2, finished=False)]  # no status.json: an older run
    age_files(tmp_path / "killed", 2 * 3600)
    age_files(tmp_path / "new", 3 * 86400)
    fig = plot.figure([load_run(folder)[0] for folder in folders])
    assert legend_texts(fig) == [
        "done",
        "ctrl-c — interrupted after 2/5 epochs",
        "killed — running or killed, 2/3 epochs (last written 2 h ago)",
        "new — running or killed, 0/1 epoch (last written 3 days ago); no epoch to draw yet",
        "old — in progress 2/3 epochs"]
    for ax in visible_axes(fig):  # every run with a logged epoch has its curve; "new" has none
        assert sorted(len(line.get_xdata()) for line in curves(ax)) == [2, 2, 2, 3], ax.get_title()


def test_a_diverged_run_is_drawn_up_to_the_epoch_before_and_named(tmp_path):
    folders = [make_run(tmp_path / "fine", epochs=4),
               make_run(tmp_path / "blown", epochs=4, loss=[2.0, 1.0, 3.5e19, 1e13], status="finished"),
               make_run(tmp_path / "old-inf", epochs=4, logged=3, loss=[2.0, float("inf"), float("nan")],
                        finished=False),
               make_run(tmp_path / "stopped", epochs=4, logged=2, finished=False,
                        status={"state": "stopped", "detail": "the training loss became inf in epoch 3, iteration 2"}),
               make_run(tmp_path / "rising", epochs=4, loss=[1.0, 10.0, 1e3, 1e5])]  # below 1e6 × epoch 1: kept
    fig = plot.figure([load_run(folder)[0] for folder in folders])
    fig.canvas.draw()
    assert legend_texts(fig) == [
        "fine",
        "blown — diverged in epoch 3, drawn up to epoch 2 (×)",
        "old-inf — in progress 3/4 epochs; diverged in epoch 2, drawn up to epoch 1 (×)",
        "stopped — stopped: the training loss became inf in epoch 3, iteration 2; diverged in epoch 3, drawn up "
        "to epoch 2 (×)",
        "rising"]
    test_panel, *loss_panels = visible_axes(fig)
    assert test_panel.get_ylim()[1] < 20  # accuracies 10 … 13
    for ax in loss_panels:
        assert ax.get_yscale() == "log" and ax.get_ylim()[1] < 1e6, ax.get_title()  # "rising" reaches 1e5
        assert sorted(len(line.get_xdata()) for line in curves(ax)) == [2, 2, 4, 4], ax.get_title()
    for ax in visible_axes(fig):  # a cross where each diverged run's curve ends
        crosses = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines() if line.get_marker() == "x"]
        assert [x for x, _ in crosses] == [2 * 2, 1 * 2, 2 * 2], ax.get_title()


def test_a_linear_axis_is_not_stretched_by_a_diverged_run(tmp_path):
    runs = [load_run(make_run(tmp_path / "fine"))[0],
            load_run(make_run(tmp_path / "blown", loss=[0.0, 0.0, 1e13], status="finished"))[0]]  # zeros: linear
    fig = plot.figure(runs)
    fig.canvas.draw()
    for ax in visible_axes(fig)[1:]:
        assert ax.get_yscale() == "linear" and ax.get_ylim()[1] < 3, ax.get_title()


@pytest.mark.parametrize("argv, message", [
    ([], "error: no run folder found directly under runs/ and in the current folder ({here}); name run folders "
         "or glob patterns"),
    (["missing-run"], "error: no run folder could be read")])
def test_plot_with_no_readable_run_is_an_error(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert plot.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == message.format(here=tmp_path)
    assert os.listdir(tmp_path) == []


def test_diagram_command_writes_a_png(tmp_path):
    out = tmp_path / "diagram.png"
    subprocess.run([sys.executable, "-m", "utils.diagram", "-o", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    assert_png(out)
