"""Learning curves of several runs on one figure: for each dataset present, the test metric and the
training losses against training iterations (epochs × iterations per epoch), read from each run's
``log.txt`` and ``args.json``.

    python -m utils.plot                                   # every run folder under runs/ and here, to curves.png
    python -m utils.plot runs/cifar10MT@250-s0 runs/cifar10L2IO@250-s0 -o cifar10@250.png

Without arguments it reads every run folder directly under ``runs/`` and directly in the current folder.
Runs that have not finished are drawn up to their last finished epoch, and the legend says how each run
that did not finish ended (``status.json``, as ``utils.results`` shows it). A diverged run (a training loss
NaN, infinite or above ``utils.results.DIVERGED_FACTOR`` × its first epoch's) is drawn up to the epoch
before it diverged, its curves end in a cross and its legend entry says so: the axes keep the scale of
the values that mean something. The star on each test curve marks the epoch of best validation value (the
model ``summary.json`` reports). Each run has its own colour, line style and marker, so curves that
coincide stay apart. Tensorboard's step is samples seen: these iterations × the batch size.
"""
import argparse
import os
import sys

from utils.results import DEFAULT_ROOT, display_names, plural, runs_or_error

DEFAULT_OUTPUT = "curves.png"  # in the current folder: figures of one's own runs do not belong in the repository
X_LABEL = "training iterations (epochs × iterations per epoch)"
TEST_TITLES = {"acc": "test accuracy", "me": "test mean error"}
LOSS_PANELS = (("Train Loss", "training loss L_x + w·L_u (w: ramped-up λ_u)"),
               ("Train Loss X", "supervised loss L_x"),
               ("Train Loss U", "unsupervised loss L_u (unweighted)"))
# The y-axis units, from each task's losses and metrics (utils/tasks.py, utils/evaluation.py): CIFAR-10 trains
# on soft cross-entropy (L_x) and the squared error between class probabilities (L_u); AFLW on the MSE of
# landmark coordinates normalised by the training set's mean and std, for both.
Y_LABELS = {
    "cifar10": {"test": "top-1 accuracy (%)", "Train Loss": "cross-entropy + w × squared error",
                "Train Loss X": "cross-entropy (nats)", "Train Loss U": "squared error of class probabilities"},
    "aflw": {"test": "mean error (fraction of inter-ocular distance)",
             "Train Loss": "MSE + w × MSE (normalised coordinates)",
             "Train Loss X": "MSE (normalised coordinates)", "Train Loss U": "MSE (normalised coordinates)"},
}
# 4 and 7 are coprime: 28 runs before a (line style, marker) pair repeats.
LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
MARKS_PER_CURVE = 8
LEGEND_COLUMNS = 3


def pyplot():
    """matplotlib's pyplot on the file-only backend, imported when a figure is made: ``--help`` and a
    missing run answer without loading it."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed on a cluster node
    import matplotlib.pyplot as plt
    return plt


def test_column(protocol):
    return next(name for name, key in protocol.columns if key == f"test_{protocol.metric}")


def drawn_rows(run):
    """The log rows drawn: all, or those before the epoch in which the run diverged."""
    return run.rows if not run.diverged else run.rows[:run.diverged_at - 1]


def iterations(run, count=None):
    return [(epoch + 1) * run.args["val_iteration"] for epoch in range(len(run.rows) if count is None else count)]


def panels(runs):
    """(dataset, log.txt column, title, y label) per panel: for each dataset, its test metric, then the
    losses (units differ between datasets, so they share no panel)."""
    datasets = sorted({run.dataset for run in runs})
    chosen = []
    for dataset in datasets:
        protocol = next(run.protocol for run in runs if run.dataset == dataset)
        prefix, units = (f"{dataset}: " if len(datasets) > 1 else ""), Y_LABELS[dataset]
        chosen.append((dataset, test_column(protocol), prefix + TEST_TITLES[protocol.metric], units["test"]))
        chosen += [(dataset, column, prefix + title, units[column]) for column, title in LOSS_PANELS]
    return chosen


def run_styles(runs):
    """Colour, line style and marker per run; each run's marks start at a different epoch so that the
    marks of coinciding curves do not hide each other."""
    plt = pyplot()
    styles = []
    for i, run in enumerate(runs):
        every = max(1, len(drawn_rows(run)) // MARKS_PER_CURVE)
        styles.append(dict(color=plt.cm.tab10(i % 10), linestyle=LINE_STYLES[i % len(LINE_STYLES)],
                           marker=MARKERS[i % len(MARKERS)], markevery=(i % every, every)))
    return styles


def draw_panel(ax, panel, runs, styles):
    dataset, column, title, ylabel = panel
    values_seen = []
    for run, style in zip(runs, styles):
        rows = drawn_rows(run)
        if run.dataset != dataset or column not in run.columns or not rows:
            continue
        xs, ys = iterations(run, len(rows)), [row[column] for row in rows]
        ax.plot(xs, ys, linewidth=1.2, markersize=5, **style)
        values_seen += ys
        if column == test_column(run.protocol) and run.values["best_epoch"] <= len(rows):
            best = run.values["best_epoch"]
            ax.plot(xs[best - 1], ys[best - 1], "*", color=style["color"], markersize=12, markeredgecolor="black",
                    zorder=3)
        if run.diverged:  # where the curve stops: the next epoch diverged
            ax.plot(xs[-1], ys[-1], "x", color="black", markersize=10, markeredgewidth=2, zorder=3)
    is_loss = column in dict(LOSS_PANELS)
    if is_loss and values_seen and min(values_seen) > 0 and max(values_seen) > 30 * min(values_seen):
        ax.set_yscale("log")  # long runs' losses span orders of magnitude; zeros (SL has no L_u) cannot
    format_axes(ax, title, ylabel)


def format_axes(ax, title, ylabel):
    from matplotlib.ticker import EngFormatter, MaxNLocator
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1M, not 1e6 in an offset text
    if ax.get_yscale() == "linear":
        # Matplotlib would otherwise move a shared offset or power of ten into a text above the axis,
        # where it collides with the title.
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    ax.grid(alpha=0.3)


def legend_label(name, run):
    """The folder name; for a run that did not finish, how it ended; for a diverged run, where."""
    notes = [] if run.finished and not run.note else [run.status]
    if run.diverged:
        shown = len(drawn_rows(run))
        notes.append(f"diverged in epoch {run.diverged_at}, drawn up to epoch {shown} (×)" if shown
                     else f"diverged in epoch {run.diverged_at}, nothing drawn")
    elif not run.rows:
        notes.append("no epoch to draw yet")
    return f"{name} — {'; '.join(notes)}" if notes else name


def figure(runs):
    """One dataset: its four panels in 2 × 2; several: a row of four per dataset. The legend is below."""
    plt = pyplot()
    chosen = panels(runs)
    nrows, ncols = (2, 2) if len(chosen) == 4 else (len(chosen) // 4, 4)
    legend_height = 0.3 + 0.3 * -(-len(runs) // LEGEND_COLUMNS)  # inches below the panels
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows + legend_height), squeeze=False)
    styles = run_styles(runs)
    for ax, panel in zip(axes.flat, chosen):
        draw_panel(ax, panel, runs, styles)
    handles = [plt.Line2D([], [], color=s["color"], linestyle=s["linestyle"], marker=s["marker"], linewidth=1.5)
               for s in styles]
    fig.legend(handles, [legend_label(n, r) for n, r in zip(display_names(runs), runs)], loc="lower center",
               ncol=min(len(runs), LEGEND_COLUMNS), frameon=False, fontsize=10, handlelength=3)
    fig.tight_layout(rect=(0, legend_height / fig.get_figheight(), 1, 1))
    return fig


def plot(runs, out):
    plt = pyplot()
    fig = figure(runs)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Learning curves of run folders on one figure; the legend says how "
                                            "runs that did not finish ended, and which diverged.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help=f"run folders or glob patterns (default: every run folder directly under {DEFAULT_ROOT}/ "
                        f"and directly in the current folder, where the training scripts' default --out puts them)")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help=f"PNG to write (default {DEFAULT_OUTPUT})")
    args = p.parse_args(argv)
    runs, error = runs_or_error(args.runs)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    plot(runs, args.output)
    print(f"wrote {args.output}: {plural(len(runs), 'run')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
