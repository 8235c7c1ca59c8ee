"""Learning curves of several runs on one figure: the test metric and the training losses against
training iterations (epoch · iterations per epoch), read from each run's ``log.txt`` and ``args.json``.

    python -m utils.plot runs/cifar10MT@250-s0 runs/cifar10L2IO@250-s0 -o figure/cifar10@250.png

Runs still in progress are drawn up to their last finished epoch; the dot on each test curve marks
the epoch of best validation value (the model ``summary.json`` reports).
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

from utils.results import display_names, load_runs  # noqa: E402

METRIC_TITLES = {"acc": "Test accuracy (%)", "me": "Test mean error (fraction of inter-ocular distance)"}
LOSS_COLUMNS = ("Train Loss", "Train Loss X", "Train Loss U")
LEGEND_COLUMNS = 3


def test_column(task):
    return next(name for name, key in task.columns if key == f"test_{task.metric}")


def iterations(run):
    return [(epoch + 1) * run.args["val_iteration"] for epoch in range(len(run.rows))]


def panels(runs):
    """(title, column chooser) per panel: one per test metric present (their units differ), then losses."""
    metrics = sorted({run.task.metric for run in runs})
    chosen = [(METRIC_TITLES[m], lambda run, m=m: test_column(run.task) if run.task.metric == m else None)
              for m in metrics]
    return chosen + [(column, lambda run, column=column: column) for column in LOSS_COLUMNS]


def draw_panel(ax, title, column_of, runs, colors):
    values_seen = []
    for run, color in zip(runs, colors):
        column = column_of(run)
        if column is None or column not in run.rows[0]:
            continue
        xs, ys = iterations(run), [row[column] for row in run.rows]
        ax.plot(xs, ys, color=color, linewidth=1.2, marker="." if len(xs) <= 30 else None)
        values_seen += ys
        if column == test_column(run.task):
            best = run.values["best_epoch"]
            ax.plot(xs[best - 1], ys[best - 1], "o", color=color, markersize=6, markeredgecolor="black")
    if title in LOSS_COLUMNS and values_seen and min(values_seen) > 0 and max(values_seen) > 30 * min(values_seen):
        ax.set_yscale("log")  # long runs' losses span orders of magnitude; zeros (SL has no L_u) cannot
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("training iterations")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def legend_label(name, run):
    return name if run.finished else f"{name} ({run.status})"


def plot(runs, out):
    chosen = panels(runs)
    ncols = 2 if len(chosen) <= 4 else 3
    nrows = -(-len(chosen) // ncols)
    legend_height = 0.3 + 0.3 * -(-len(runs) // LEGEND_COLUMNS)  # inches below the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows + legend_height), squeeze=False)
    colors = [plt.cm.tab10(i % 10) for i in range(len(runs))]
    for ax, (title, column_of) in zip(axes.flat, chosen):
        draw_panel(ax, title, column_of, runs, colors)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=c, linewidth=2) for c in colors]
    fig.legend(handles, [legend_label(n, r) for n, r in zip(display_names(runs), runs)], loc="lower center",
               ncol=min(len(runs), LEGEND_COLUMNS), frameon=False, fontsize=10)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Learning curves of run folders on one figure.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders or glob patterns")
    p.add_argument("-o", "--output", default="figure/curves.png", help="PNG to write (default figure/curves.png)")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        print("error: no run folder could be read", file=sys.stderr)
        return 1
    plot(runs, args.output)
    print(f"wrote {args.output}: {len(runs)} run{'' if len(runs) == 1 else 's'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
