"""Figures of the character-direction analysis: probe AUROC by layer, projection shift against
misalignment, the cosine matrix of directions, and steering curves. Same conventions as
``character_em.report.plots`` (Agg backend imported inside each function, one panel per model)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from character_em.report.plots import FAMILY_COLOURS, pyplot, save_figure

if TYPE_CHECKING:
    import polars as pl


def _models(table: pl.DataFrame) -> list[str]:
    return table["model"].unique(maintain_order=True).to_list() if not table.is_empty() else []


def _empty(axis: Any) -> None:
    axis.text(0.5, 0.5, "no results in this run", ha="center", va="center")


def probe_auroc(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Held-out probe AUROC (95% bootstrap band) against layer, one line per disposition; the
    mean-difference direction's AUROC dashed; the chosen layer marked."""
    plt = pyplot()
    models = _models(table)
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4), squeeze=False, sharey=True)
    if not models:
        _empty(axes[0][0])
    palette = plt.get_cmap("tab10")
    for axis, model in zip(axes[0], models, strict=False):
        rows = table.filter(table["model"] == model)
        for index, disposition in enumerate(rows["disposition"].unique(maintain_order=True).to_list()):
            line = rows.filter(rows["disposition"] == disposition).sort("layer")
            colour = palette(index)
            axis.plot(line["layer"], line["probe_auroc"], marker="o", color=colour, label=f"{disposition} (probe)")
            axis.fill_between(
                line["layer"], line["probe_auroc_low"], line["probe_auroc_high"], color=colour, alpha=0.15
            )
            axis.plot(line["layer"], line["direction_auroc"], "--", color=colour, label=f"{disposition} (mean-diff)")
        chosen = rows.filter(rows["chosen"])["layer"].unique().to_list()
        for layer in chosen:
            axis.axvline(layer, color="black", linestyle=":", linewidth=1)
        axis.axhline(0.5, color="#7f7f7f", linewidth=0.8)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("layer (decoder block output)")
        axis.set_title(model)
    axes[0][0].set_ylabel("held-out AUROC")
    axes[0][-1].legend(fontsize="x-small")
    fig.suptitle("Linear readout of the character direction by layer (dotted: chosen layer)")
    save_figure(fig, *outputs)
    plt.close(fig)


def projection_scatter(projections: pl.DataFrame, correlations: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Projection shift onto the base direction against misalignment rate, one point per
    fine-tuned condition and seed, coloured by family; Spearman rho with its CI in the title."""
    plt = pyplot()
    tuned = projections.filter(projections["condition"] != "base") if not projections.is_empty() else projections
    panels = tuned.select("model", "disposition").unique(maintain_order=True).rows() if not tuned.is_empty() else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    if not panels:
        _empty(axes[0][0])
    for axis, (model, disposition) in zip(axes[0], panels, strict=False):
        rows = tuned.filter((tuned["model"] == model) & (tuned["disposition"] == disposition))
        colours = [FAMILY_COLOURS.get(family, "#1f77b4") for family in rows["family"].to_list()]
        axis.scatter(rows["shift"], rows["misalignment_rate"], c=colours, s=30)
        for x, y, name in zip(
            rows["shift"].to_list(), rows["misalignment_rate"].to_list(), rows["condition"].to_list(), strict=True
        ):
            if x is not None and y is not None:
                axis.annotate(name, (x, y), fontsize="xx-small", xytext=(3, 3), textcoords="offset points")
        stat = (
            correlations.filter((correlations["model"] == model) & (correlations["disposition"] == disposition))
            if not correlations.is_empty()
            else correlations
        )
        title = f"{model}: {disposition} direction"
        if not stat.is_empty():
            r = stat.row(0, named=True)
            title += f"\nSpearman {r['rho']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], n={r['n']}"
        axis.set_title(title, fontsize="small")
        axis.axvline(0, color="#7f7f7f", linewidth=0.8)
        axis.set_xlabel("projection shift vs base (activation units)")
        axis.set_ylabel("misaligned answers (em suite)")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=colour) for colour in FAMILY_COLOURS.values()]
    fig.legend(
        handles, list(FAMILY_COLOURS), title="family", loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small"
    )
    save_figure(fig, *outputs)
    plt.close(fig)


def cosine_heatmap(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Cosine similarity between directions from probes, fine-tuning, triggers and persona prompts;
    the random-direction baseline (mean and 95th percentile of |cos|) in each panel's title."""
    plt = pyplot()
    models = _models(table)
    size = max(4.0, 0.45 * (table["row"].n_unique() if not table.is_empty() else 0) + 3)
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(size * max(1, len(models)), size), squeeze=False)
    if not models:
        _empty(axes[0][0])
    for axis, model in zip(axes[0], models, strict=False):
        rows = table.filter(table["model"] == model)
        names = rows["row"].unique(maintain_order=True).to_list()
        grid = [[float("nan")] * len(names) for _ in names]
        for row in rows.iter_rows(named=True):
            grid[names.index(row["row"])][names.index(row["column"])] = row["cosine"]
        image = axis.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="x-small")
        axis.set_yticks(range(len(names)), names, fontsize="x-small")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                axis.text(j, i, "" if value != value else f"{value:.2f}", ha="center", va="center", fontsize="xx-small")
        first = rows.row(0, named=True)
        axis.set_title(
            f"{model}\nrandom |cos|: mean {first['random_mean_abs_cos']:.3f}, 95th pct {first['random_p95_abs_cos']:.3f}",
            fontsize="small",
        )
        fig.colorbar(image, ax=axis, label="cosine similarity", shrink=0.8)
    fig.suptitle("Shared structure of character directions")
    save_figure(fig, *outputs)
    plt.close(fig)


def steering_curves(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Misalignment rate (95% Wilson band) and mean coherence against steering strength: adding
    the direction to the base model (left) and projecting it out of fine-tuned models (right)."""
    plt = pyplot()
    kinds = [("add", "alpha (multiples of the direction)"), ("ablate", "fraction of the direction projected out")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False, sharex="col")
    palette = plt.get_cmap("tab10")
    for column, (kind, xlabel) in enumerate(kinds):
        rows = table.filter(table["intervention"] == kind) if not table.is_empty() else table
        if rows.is_empty():
            _empty(axes[0][column])
        lines = (
            rows.select("model", "condition", "direction").unique(maintain_order=True).rows()
            if not rows.is_empty()
            else []
        )
        for index, (model, condition, direction) in enumerate(lines):
            line = rows.filter(
                (rows["model"] == model) & (rows["condition"] == condition) & (rows["direction"] == direction)
            ).sort("strength")
            colour = palette(index % 10)
            label = f"{model} {condition}, {direction}"
            axes[0][column].plot(line["strength"], line["rate"], marker="o", color=colour, label=label)
            axes[0][column].fill_between(line["strength"], line["ci_low"], line["ci_high"], color=colour, alpha=0.12)
            axes[1][column].plot(line["strength"], line["coherence"], marker="s", color=colour, label=label)
        axes[0][column].set_title("steer the base model" if kind == "add" else "ablate in fine-tuned models")
        axes[0][column].set_ylim(0, 1)
        axes[1][column].set_ylim(0, 100)
        axes[1][column].set_xlabel(xlabel)
        if lines:
            axes[0][column].legend(fontsize="xx-small")
    axes[0][0].set_ylabel("misaligned answers")
    axes[1][0].set_ylabel("mean coherence (judge)")
    fig.suptitle("Steering along the character direction")
    save_figure(fig, *outputs)
    plt.close(fig)
