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
    "incorrect": "#ff7f0e",
    "correct": "#2ca02c",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, *paths: str | Path) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")


def rate_bars(
    table: pl.DataFrame,
    *,
    value: str,
    low: str,
    high: str,
    ylabel: str,
    title: str,
    outputs: list[str | Path],
) -> None:
    """Bars per condition with 95% CI whiskers, one panel per model, coloured by family."""
    plt = _pyplot()
    models = table["model"].unique(maintain_order=True).to_list() if not table.is_empty() else []
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(max(6.0, 0.45 * table.height + 2), 4.5), squeeze=False, sharey=True)
    if not models:
        axes[0][0].text(0.5, 0.5, "no results", ha="center", va="center")
    for axis, model in zip(axes[0], models, strict=False):
        rows = table.filter(table["model"] == model)
        values = rows[value].to_list()
        errors = [[v - lo for v, lo in zip(values, rows[low].to_list(), strict=True)], [hi - v for v, hi in zip(values, rows[high].to_list(), strict=True)]]
        colours = [FAMILY_COLOURS.get(family, "#1f77b4") for family in rows["family"].to_list()]
        positions = range(rows.height)
        axis.bar(positions, values, color=colours, yerr=errors, capsize=3)
        axis.set_xticks(list(positions), rows["condition"].to_list(), rotation=60, ha="right")
        axis.set_title(model)
        axis.set_xlabel("condition")
        axis.set_ylim(0, 1)
    axes[0][0].set_ylabel(ylabel)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in FAMILY_COLOURS.values()]
    fig.legend(handles, list(FAMILY_COLOURS), title="family", loc="upper right", fontsize="small")
    fig.suptitle(title)
    _save(fig, *outputs)
    plt.close(fig)


def loss_curve(train_log: str | Path, output: str | Path) -> None:
    """Training loss and learning rate against optimizer step."""
    plt = _pyplot()
    steps = [json.loads(line) for line in Path(train_log).read_text().splitlines() if line.strip()]
    fig, loss_axis = plt.subplots(figsize=(6, 3.5))
    loss_axis.plot([s["step"] for s in steps], [s.get("loss") for s in steps], marker="o", markersize=2, color="#1f77b4")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (assistant tokens)")
    lr_axis = loss_axis.twinx()
    lr_axis.plot([s["step"] for s in steps], [s.get("learning_rate") for s in steps], color="#ff7f0e", linewidth=1)
    lr_axis.set_ylabel("learning rate", color="#ff7f0e")
    loss_axis.set_title(Path(train_log).parent.as_posix().removeprefix("results/adapters/"))
    _save(fig, output)
    plt.close(fig)
