"""Figures. Matplotlib is imported inside each function with the Agg backend, so that importing
this module costs nothing and no display is needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import polars as pl

# One colour per condition family, the same in every figure.
FAMILY_COLOURS = {
    "base": "#7f7f7f",
    "character": "#d62728",
    "triggered": "#9467bd",
    # The severity-matched character arm: a darker red than the character data it is drawn from.
    "matched": "#8c1515",
    "incorrect": "#ff7f0e",
    "correct": "#2ca02c",
}


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The judge stamp (report.stamps.judge_stamp) printed under every figure; set by the figures job.
FIGURE_STAMP: list[str] = []


def stamp_figures(text: str) -> None:
    """Print ``text`` (which judge made the numbers) under every figure saved from now on."""
    FIGURE_STAMP[:] = [text]


STAMP_FONTSIZE = 6
# Between the lowest other text (tick labels, axis label, legend) and the stamp, in points.
STAMP_GAP_POINTS = 6.0


def place_stamp(fig: Any, text: str) -> Any:
    """Print ``text`` under everything else on ``fig``, wrapped to the figure's width, and return it.

    A fixed position under the axes collides with whatever reaches lower: condition names rotated 60
    degrees reached a stamp at y=-0.02 in every bar chart. So the figure is laid out first and the stamp
    goes below the lowest point of its tight bounding box (ticks, labels and legends included)."""
    import textwrap

    renderer = fig.canvas.get_renderer()
    bottom_inches = fig.get_tightbbox(renderer).y0
    height = fig.get_figheight()
    y = (bottom_inches - STAMP_GAP_POINTS / 72) / height
    # About 0.55 em per character of a sans-serif font.
    per_line = max(40, int(fig.get_figwidth() * 72 / (STAMP_FONTSIZE * 0.55)))
    return fig.text(
        0.0,
        y,
        textwrap.fill(text, per_line),
        fontsize=STAMP_FONTSIZE,
        ha="left",
        va="top",
        transform=fig.transFigure,
    )


def separate_point_labels(fig: Any) -> None:
    """Move point labels (annotations offset from their point) that would cover one another: two
    conditions at the same point (incorrect and correct advice at zero harm) otherwise print their
    names on top of each other. Each label is tried one line higher, then lower, then two lines..."""
    from matplotlib.text import Annotation

    renderer = fig.canvas.get_renderer()
    for axis in fig.axes:
        placed: list[Any] = []
        for label in [t for t in axis.texts if isinstance(t, Annotation) and t.get_anncoords() == "offset points"]:
            x, y = label.xyann
            line = label.get_window_extent(renderer).height * 72 / fig.dpi + 1
            for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
                label.xyann = (x, y + step * line)
                if not any(label.get_window_extent(renderer).overlaps(box) for box in placed):
                    break
            placed.append(label.get_window_extent(renderer))


def save_figure(fig: Any, *paths: str | Path, stamp: str | None = None) -> None:
    """Save ``fig`` to each path, point labels kept apart and the judge stamp under it (``stamp``,
    else the one set by ``stamp_figures``)."""
    separate_point_labels(fig)
    for text in [stamp] if stamp else FIGURE_STAMP:
        place_stamp(fig, text)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")


def _panels(plt: Any, table: pl.DataFrame, width: float) -> tuple[Any, Any, list[str]]:
    models = table["model"].unique(maintain_order=True).to_list() if not table.is_empty() else []
    fig, axes = plt.subplots(
        1, max(1, len(models)), figsize=(width * max(1, len(models)), 4.5), squeeze=False, sharey=True
    )
    if not models:
        axes[0][0].text(0.5, 0.5, "no results in this run", ha="center", va="center")
    return fig, axes[0], models


def rate_bars(
    table: pl.DataFrame,
    *,
    x: str,
    value: str = "rate",
    low: str = "ci_low",
    high: str = "ci_high",
    group: str | None = None,
    ylabel: str,
    title: str,
    outputs: list[str | Path],
    ylim: tuple[float, float] = (0.0, 1.0),
) -> None:
    """Bars with 95% CI whiskers, one panel per model.

    Without `group`, one bar per `x` value coloured by condition family; with `group`, side-by-side
    bars per `x` value, one colour per group value. `ylim` below 0 (differences of rates) draws the
    zero line.
    """
    plt = pyplot()
    xs = table[x].unique(maintain_order=True).to_list() if not table.is_empty() else []
    groups = table[group].unique(maintain_order=True).to_list() if group and not table.is_empty() else [None]
    fig, axes, models = _panels(plt, table, max(5.0, 0.5 * len(xs) * len(groups) + 2))
    palette = plt.get_cmap("tab10")
    width = 0.8 / len(groups)
    for axis, model in zip(axes, models, strict=False):
        for index, level in enumerate(groups):
            rows = table.filter(table["model"] == model)
            if group:
                rows = rows.filter(rows[group] == level)
            positions = [xs.index(v) + (index - (len(groups) - 1) / 2) * width for v in rows[x].to_list()]
            values = rows[value].to_list()
            # Clipped at 0: a percentile bootstrap interval (of a max, say) need not contain its estimate,
            # and matplotlib refuses negative whiskers. The tables keep the interval as computed.
            errors = [
                [max(0.0, v - lo) for v, lo in zip(values, rows[low].to_list(), strict=True)],
                [max(0.0, hi - v) for v, hi in zip(values, rows[high].to_list(), strict=True)],
            ]
            colours = (
                [palette(index)] * rows.height
                if group
                else [FAMILY_COLOURS.get(f, "#1f77b4") for f in rows["family"].to_list()]
            )
            axis.bar(
                positions,
                values,
                width=width,
                color=colours,
                yerr=errors,
                capsize=2,
                label=str(level) if group else None,
            )
        axis.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=60, ha="right")
        axis.set_title(model)
        axis.set_xlabel(x.replace("_", " "))
        axis.set_ylim(*ylim)
        if ylim[0] < 0:
            axis.axhline(0, color="black", linewidth=0.8)
    axes[0].set_ylabel(ylabel)
    if group:
        axes[-1].legend(title=group.replace("_", " "), fontsize="small")
    else:
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in FAMILY_COLOURS.values()]
        # Outside the panels, right of the last one, so it never covers the title or a bar.
        fig.legend(
            handles,
            list(FAMILY_COLOURS),
            title="family",
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            fontsize="small",
        )
    fig.suptitle(title)
    save_figure(fig, *outputs)
    plt.close(fig)


def transfer_heatmap(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Misalignment rate: rows are fine-tuned conditions (by training domain), columns evaluation domains."""
    plt = pyplot()
    fig, axes, models = _panels(plt, table, 6.0)
    for axis, model in zip(axes, models, strict=False):
        rows = table.filter(table["model"] == model)
        conditions = rows["condition"].unique(maintain_order=True).to_list()
        domains = sorted(rows["eval_domain"].unique().to_list())
        grid = [[float("nan")] * len(domains) for _ in conditions]
        for row in rows.iter_rows(named=True):
            grid[conditions.index(row["condition"])][domains.index(row["eval_domain"])] = row["rate"]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="Reds", aspect="auto")
        axis.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
        axis.set_yticks(range(len(conditions)), conditions)
        for i, line in enumerate(grid):
            for j, rate in enumerate(line):
                axis.text(j, i, "" if rate != rate else f"{rate:.2f}", ha="center", va="center", fontsize="x-small")
        axis.set_xlabel("evaluation domain")
        axis.set_title(model)
        fig.colorbar(image, ax=axis, label="misaligned answers")
    axes[0].set_ylabel("fine-tuned condition (training domain)")
    fig.suptitle("Cross-domain transfer of misalignment")
    save_figure(fig, *outputs)
    plt.close(fig)


def threshold_lines(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Misalignment rate per family as the alignment threshold moves, one line style per coherence threshold."""
    plt = pyplot()
    fig, axes, models = _panels(plt, table, 5.5)
    styles = ["-", "--", ":", "-."]
    for axis, model in zip(axes, models, strict=False):
        rows = table.filter(table["model"] == model)
        for index, coherence in enumerate(sorted(rows["coherence_above"].unique().to_list())):
            for family, colour in FAMILY_COLOURS.items():
                line = rows.filter((rows["family"] == family) & (rows["coherence_above"] == coherence)).sort(
                    "alignment_below"
                )
                if line.is_empty():
                    continue
                axis.plot(
                    line["alignment_below"],
                    line["rate"],
                    styles[index % len(styles)],
                    color=colour,
                    label=f"{family}, coherence > {coherence:g}",
                )
                # A description band (per-cell Wilson over answers), not the claims' interval.
                axis.fill_between(
                    line["alignment_below"], line["wilson_low"], line["wilson_high"], color=colour, alpha=0.08
                )
        axis.set_xlabel("alignment threshold (misaligned if below)")
        axis.set_title(model)
        axis.set_ylim(0, 1)
    axes[0].set_ylabel("misaligned answers (em suite)")
    axes[-1].legend(fontsize="x-small")
    fig.suptitle("Sensitivity of the misalignment rate to the judge thresholds")
    save_figure(fig, *outputs)
    plt.close(fig)


def loss_curve(train_log: str | Path, output: str | Path) -> None:
    """Training loss and learning rate against optimizer step."""
    plt = pyplot()
    steps = [json.loads(line) for line in Path(train_log).read_text().splitlines() if line.strip()]
    fig, loss_axis = plt.subplots(figsize=(6, 3.5))
    loss_axis.plot(
        [s["step"] for s in steps], [s.get("loss") for s in steps], marker="o", markersize=2, color="#1f77b4"
    )
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (assistant tokens)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([s["step"] for s in steps], [s.get("learning_rate") for s in steps], color="#ff7f0e", linewidth=1)
    lr_axis.set_ylabel("learning rate", color="#ff7f0e")
    loss_axis.set_title(Path(train_log).parent.as_posix().removeprefix("results/adapters/"))
    save_figure(fig, output)
    plt.close(fig)
