"""One L2I training iteration as a picture (docs/method.md §1, §5), drawn with matplotlib patches.

    python -m utils.diagram -o figure/diagram.png

(a) the Mean-Teacher update, (b) the virtual step on the imputed labels z, (c) the meta loss on a
labeled batch at the virtual weights θ', (d) the meta-gradient back to the labels (L2I-L) or to the
label generator (L2I-O), applied as a second real update. Coordinates are in drawing units
(WIDTH × HEIGHT); each panel is one function.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

WIDTH, HEIGHT = 20.0, 13.0        # drawing units; 1 unit = 0.8 inch
FONT = 11
STYLES = {  # face, edge: what a box holds
    "data": ("#eeeeee", "#555555"),
    "network": ("#dbe9f6", "#2b6cb0"),
    "loss": ("#fde7d0", "#c05621"),
    "update": ("#dcf2dc", "#2f855a"),
    "virtual": ("#ece1f7", "#6b46c1"),
}
FORWARD, GRADIENT, NEXT = "#333333", "#c53030", "#2f855a"


def box(ax, cx, cy, w, h, text, kind):
    face, edge = STYLES[kind]
    ax.add_patch(FancyBboxPatch((cx - w / 2, cy - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.15",
                                facecolor=face, edgecolor=edge, linewidth=1.4))
    ax.text(cx, cy, text, ha="center", va="center", fontsize=FONT, linespacing=1.5)


def arrow(ax, start, end, color=FORWARD, dashed=False, rad=0.0, width=1.5):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, color=color, linewidth=width,
                                 linestyle=(0, (5, 3)) if dashed else "-", connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=2, shrinkB=2))


def note(ax, x, y, text, color, **kw):
    ax.text(x, y, text, ha="center", va="center", fontsize=FONT, color=color, **kw)


def panel(ax, x0, y0, x1, y1, title):
    ax.add_patch(FancyBboxPatch((x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.25",
                                facecolor="#fbfbfb", edgecolor="#999999", linewidth=1.2))
    ax.text(x0 + 0.25, y1 - 0.3, title, ha="left", va="top", fontsize=FONT + 2, weight="bold")


def mean_teacher_update(ax):
    panel(ax, 0.2, 6.9, 12.3, 12.3, "(a) Mean-Teacher update  (real step #1)")
    box(ax, 1.75, 10.95, 2.7, 0.75, r"$u_2$  unlabeled, view 2", "data")
    box(ax, 1.75, 9.5, 2.7, 0.75, r"$x_l,\ y_l$  labeled", "data")
    box(ax, 1.75, 8.4, 2.7, 0.75, r"$u_1$  unlabeled, view 1", "data")
    box(ax, 4.9, 10.95, 2.4, 0.75, r"teacher $f(\cdot\,;T)$", "network")
    box(ax, 4.9, 8.95, 2.4, 0.75, r"student $f(\cdot\,;\theta)$", "network")
    box(ax, 8.15, 10.95, 3.1, 0.75, r"target $q$  (no gradient)", "data")
    box(ax, 8.15, 9.5, 3.1, 0.75, r"$L_u = $ MSE$(f(u_1;\theta),\ q)$", "loss")
    box(ax, 8.15, 8.4, 3.1, 0.75, r"$L_x = $ CE$(f(x_l;\theta),\ y_l)$", "loss")
    box(ax, 11.0, 8.95, 2.2, 0.7, r"$L = L_x + w(t)\,L_u$", "loss")
    box(ax, 10.1, 7.4, 3.8, 0.6, r"$\theta \leftarrow \theta - \mathrm{opt}(\nabla_\theta L)$   (step #1)", "update")
    arrow(ax, (3.1, 10.95), (3.7, 10.95))
    arrow(ax, (6.1, 10.95), (6.6, 10.95))
    arrow(ax, (3.1, 9.5), (3.7, 9.1))
    arrow(ax, (3.1, 8.4), (3.7, 8.8))
    arrow(ax, (8.15, 10.57), (8.15, 9.88))
    arrow(ax, (6.1, 9.1), (6.6, 9.45))
    arrow(ax, (6.1, 8.8), (6.6, 8.45))
    arrow(ax, (9.7, 9.5), (9.9, 9.2))
    arrow(ax, (9.7, 8.4), (9.9, 8.7))
    arrow(ax, (11.0, 8.6), (11.0, 7.7), color=GRADIENT, dashed=True)
    note(ax, 11.45, 8.15, r"$\nabla_\theta L$", GRADIENT)


def virtual_step(ax):
    panel(ax, 12.5, 6.9, 19.8, 12.3, r"(b) Virtual step on the imputed labels $z$")
    box(ax, 16.15, 10.65, 6.6, 1.05, r"L2I-O:  $z = h(u_2;\varphi)$,  $\varphi$ = copy of $\theta$" "\n"
        r"L2I-L:  $z$ = that output, detached: a free tensor", "virtual")
    box(ax, 16.15, 9.15, 4.6, 0.7, r"$V(f(u_1;\theta),\ z)$   consistency loss", "loss")
    box(ax, 16.15, 7.75, 6.0, 0.8, r"$\theta' = \theta - \eta\,\nabla_\theta V(f(u_1;\theta), z)$" "\n"
        r"virtual: $\theta$ unchanged, $\theta'$ depends on $z$", "virtual")
    arrow(ax, (16.15, 10.1), (16.15, 9.52))
    arrow(ax, (16.15, 8.78), (16.15, 8.18))


def meta_loss(ax):
    panel(ax, 12.5, 0.9, 19.8, 6.7, r"(c) Meta loss on labeled data at $\theta'$")
    box(ax, 14.6, 4.95, 3.4, 0.75, r"$x_m,\ y_m$  meta batch" "\n(labeled)", "data")
    box(ax, 17.95, 4.95, 3.0, 0.75, r"$\theta'$  from (b)", "virtual")
    box(ax, 16.15, 3.35, 4.4, 0.75, r"$f(x_m;\theta')$   functional forward", "network")
    box(ax, 16.15, 1.8, 6.2, 0.75, r"$M(\theta')$ = CE (CIFAR-10) / MSE (AFLW)", "loss")
    arrow(ax, (14.6, 4.55), (15.4, 3.75))
    arrow(ax, (17.95, 4.55), (16.9, 3.75))
    arrow(ax, (16.15, 2.95), (16.15, 2.2))


def meta_gradient(ax):
    panel(ax, 0.2, 0.9, 12.3, 6.7, "(d) Meta-gradient back to the labels  (real step #2)")
    box(ax, 6.25, 5.1, 8.6, 0.75, r"$\nabla_z M = (\partial\theta' / \partial z)^\top\, \nabla_{\theta'} M(\theta')$"
        "    back through the virtual step", "virtual")
    for x, name in ((3.2, "L2I-L"), (9.1, "L2I-O")):
        note(ax, x, 4.3, name, STYLES["virtual"][1], weight="bold")
    box(ax, 3.2, 3.45, 5.2, 0.7, r"$z \leftarrow z - \nabla_z M$   (label step)", "virtual")
    box(ax, 3.2, 1.95, 5.2, 0.95, r"$\theta \leftarrow \theta - \mathrm{opt}(\nabla_\theta\, \mathrm{MSE}(f(u_1;\theta), z))$"
        "\nrefine on the new labels  (step #2)", "update")
    box(ax, 9.1, 3.45, 4.8, 0.7, r"$\nabla_\varphi M$: backprop $\nabla_z M$ through $h(u_2;\varphi)$", "virtual")
    box(ax, 9.1, 1.95, 4.8, 0.95, r"$\theta \leftarrow \theta - \mathrm{opt}(\nabla_\varphi M)$"
        "\nsame optimizer state  (step #2)", "update")
    arrow(ax, (4.6, 4.72), (3.6, 3.82), color=GRADIENT, dashed=True)
    arrow(ax, (7.9, 4.72), (8.7, 3.82), color=GRADIENT, dashed=True)
    arrow(ax, (3.2, 3.1), (3.2, 2.44))
    arrow(ax, (9.1, 3.1), (9.1, 2.44), color=GRADIENT, dashed=True)
    note(ax, 6.25, 1.15, r"then the EMA models follow $\theta$:  $\bar{E}$ (evaluated), $T$ (teacher)", "#444444")


def between_panels(ax):
    arrow(ax, (12.0, 7.4), (13.85, 9.05), color=NEXT, width=2.2)
    note(ax, 12.75, 9.05, "$\\theta$ after\nstep #1", NEXT, style="italic",
         bbox=dict(facecolor="white", edgecolor="none", pad=1))
    arrow(ax, (18.8, 7.35), (18.8, 5.35), color=NEXT, width=2.2, rad=-0.3)
    arrow(ax, (13.05, 1.8), (10.6, 5.0), color=GRADIENT, dashed=True, width=2.0)
    note(ax, 11.75, 4.3, r"$\nabla_{\theta'} M$", GRADIENT)
    arrow(ax, (1.0, 6.6), (1.0, 7.2), color=NEXT, width=2.2)
    note(ax, 1.95, 6.85, "next iteration", NEXT, style="italic")


def legend(ax):
    x, y = 0.6, 0.4
    for kind, text in (("data", "data"), ("network", "network"), ("loss", "loss"),
                       ("update", "real update of θ"), ("virtual", "virtual / meta quantity")):
        face, edge = STYLES[kind]
        ax.add_patch(FancyBboxPatch((x, y - 0.15), 0.5, 0.3, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=face, edgecolor=edge))
        ax.text(x + 0.7, y, text, va="center", fontsize=FONT - 1)
        x += 1.6 + 0.11 * len(text)  # room for the text at this font size
    for color, dashed, text in ((FORWARD, False, "forward"), (GRADIENT, True, "gradient")):
        arrow(ax, (x, y), (x + 0.9, y), color=color, dashed=dashed)
        ax.text(x + 1.1, y, text, va="center", fontsize=FONT - 1)
        x += 2.6


def draw(out):
    fig = plt.figure(figsize=(WIDTH * 0.8, HEIGHT * 0.8))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(0, HEIGHT)
    ax.axis("off")
    ax.text(WIDTH / 2, HEIGHT - 0.3, "One L2I iteration: Mean Teacher, then learning to impute the labels",
            ha="center", va="center", fontsize=FONT + 4, weight="bold")
    for part in (mean_teacher_update, virtual_step, meta_loss, meta_gradient, between_panels, legend):
        part(ax)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw one L2I iteration.")
    p.add_argument("-o", "--output", default="figure/diagram.png", help="PNG to write (default figure/diagram.png)")
    args = p.parse_args(argv)
    draw(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
