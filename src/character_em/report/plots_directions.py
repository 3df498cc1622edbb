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
    """Test-split probe AUROC (95% question-bootstrap band) against layer, one colour per
    disposition; the validation AUROC that chose the layer dashed; the data-trained probe on judged
    answers dotted; the chosen layer marked."""
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
            axis.plot(line["layer"], line["test_auroc"], marker="o", color=colour, label=f"{disposition} (test)")
            axis.fill_between(line["layer"], line["test_auroc_low"], line["test_auroc_high"], color=colour, alpha=0.15)
            axis.plot(line["layer"], line["val_auroc"], "--", color=colour, label=f"{disposition} (validation)")
            axis.plot(
                line["layer"],
                line["transfer_auroc"],
                ":",
                marker="^",
                color=colour,
                label=f"{disposition} (data to judged)",
            )
            axis.plot(
                line["layer"],
                line["control_auroc"],
                linestyle="",
                marker="x",
                color=colour,
                label=f"{disposition} (control task)",
            )
        chosen = rows.filter(rows["chosen"])["layer"].unique().to_list()
        for layer in chosen:
            axis.axvline(layer, color="black", linestyle=":", linewidth=1)
        axis.axhline(0.5, color="#7f7f7f", linewidth=0.8)
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("layer (decoder block output)")
        axis.set_title(model)
    axes[0][0].set_ylabel("AUROC (question-grouped splits)")
    axes[0][-1].legend(fontsize="xx-small")
    fig.suptitle("Linear readout of the character direction by layer (dotted line: layer chosen on validation)")
    save_figure(fig, *outputs)
    plt.close(fig)


def projection_scatter(projections: pl.DataFrame, correlations: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Fixed-text projection shift (fine-tuned minus base model on the base model's answers, held-out
    questions; 95% question-bootstrap bars) against misalignment rate, one point per condition and
    seed, coloured by family; grey band: the label-permutation null's 95th percentile of |shift|;
    Spearman rho across conditions with its CI in the title."""
    plt = pyplot()
    tuned = projections.filter(projections["reading"] == "fixed") if not projections.is_empty() else projections
    panels = tuned.select("model", "disposition").unique(maintain_order=True).rows() if not tuned.is_empty() else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    if not panels:
        _empty(axes[0][0])
    for axis, (model, disposition) in zip(axes[0], panels, strict=False):
        rows = tuned.filter((tuned["model"] == model) & (tuned["disposition"] == disposition))
        for row in rows.iter_rows(named=True):
            if row["shift"] is None or row["misalignment_rate"] is None:
                continue
            colour = FAMILY_COLOURS.get(row["family"], "#1f77b4")
            low = row["shift"] - row["ci_low"] if row["ci_low"] == row["ci_low"] else 0.0
            high = row["ci_high"] - row["shift"] if row["ci_high"] == row["ci_high"] else 0.0
            axis.errorbar(row["shift"], row["misalignment_rate"], xerr=[[low], [high]], fmt="o", color=colour, ms=5)
            axis.annotate(
                row["condition"],
                (row["shift"], row["misalignment_rate"]),
                fontsize="xx-small",
                xytext=(3, 3),
                textcoords="offset points",
            )
        band = rows["null_p95"].drop_nans().drop_nulls()
        if band.len():
            width = float(band.mean())
            axis.axvspan(-width, width, color="#cccccc", alpha=0.5, lw=0)
        stat = (
            correlations.filter(
                (correlations["model"] == model)
                & (correlations["disposition"] == disposition)
                & (correlations["reading"] == "fixed")
            )
            if not correlations.is_empty()
            else correlations
        )
        title = f"{model}: {disposition} direction (fixed texts)"
        if not stat.is_empty():
            r = stat.row(0, named=True)
            title += f"\nSpearman {r['rho']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}], n={r['n']} conditions"
        axis.set_title(title, fontsize="small")
        axis.axvline(0, color="#7f7f7f", linewidth=0.8)
        axis.set_xlabel("projection shift vs base, same texts (activation units)")
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
        significant = set()
        for row in rows.iter_rows(named=True):
            grid[names.index(row["row"])][names.index(row["column"])] = row["cosine"]
            if row.get("null_p") is not None and row["null_p"] == row["null_p"] and row["null_p"] < 0.05:
                significant.add((row["row"], row["column"]))
        image = axis.imshow(grid, vmin=-1, vmax=1, cmap="RdBu_r")
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="x-small")
        axis.set_yticks(range(len(names)), names, fontsize="x-small")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                mark = "*" if (names[i], names[j]) in significant else ""
                text = "" if value != value else f"{value:.2f}{mark}"
                axis.text(j, i, text, ha="center", va="center", fontsize="xx-small")
        first = rows.row(0, named=True)
        axis.set_title(
            f"{model}\nrandom |cos|: mean {first['random_mean_abs_cos']:.3f}, 95th pct {first['random_p95_abs_cos']:.3f};"
            " * beyond the row's permutation null (p < 0.05)",
            fontsize="small",
        )
        fig.colorbar(image, ax=axis, label="cosine similarity", shrink=0.8)
    fig.suptitle("Shared structure of character directions")
    save_figure(fig, *outputs)
    plt.close(fig)


def steering_curves(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Misalignment rate (95% Wilson band) and mean coherence against steering strength: adding
    the direction to the base model (left) and projecting it out of fine-tuned models (right); the
    disposition's own direction solid, its controls at matched norm dashed in the same colour."""
    plt = pyplot()
    kinds = [("add", "alpha (multiples of the direction)"), ("ablate", "fraction of the direction projected out")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False, sharex="col")
    palette = plt.get_cmap("tab10")
    styles = {"own": "-", "random": "--", "style": ":", "disposition": "-."}
    curve = ["model", "condition", "direction", "layers"]
    for column, (kind, xlabel) in enumerate(kinds):
        rows = table.filter(table["intervention"] == kind) if not table.is_empty() else table
        if rows.is_empty():
            _empty(axes[0][column])
        sets = rows.select(curve).unique(maintain_order=True).rows() if not rows.is_empty() else []
        for index, key in enumerate(sets):
            colour = palette(index % 10)
            mine = rows
            for name, value in zip(curve, key, strict=True):
                mine = mine.filter(mine[name] == value)
            for control, vector in mine.select("control", "vector").unique(maintain_order=True).rows():
                line = mine.filter((mine["control"] == control) & (mine["vector"] == vector)).sort("strength")
                model, condition, direction, layers = key
                label = f"{model} {condition}, {direction} @ {layers}" + ("" if control == "own" else f": {vector}")
                style = styles.get(control, "--")
                axes[0][column].plot(line["strength"], line["rate"], style, marker="o", color=colour, label=label)
                axes[1][column].plot(line["strength"], line["coherence"], style, marker="s", color=colour, label=label)
                if control == "own":
                    axes[0][column].fill_between(
                        line["strength"], line["ci_low"], line["ci_high"], color=colour, alpha=0.12
                    )
                    axes[1][column].fill_between(
                        line["strength"],
                        line["coherence"] - 1.96 * line["coherence_se"].fill_nan(0.0),
                        line["coherence"] + 1.96 * line["coherence_se"].fill_nan(0.0),
                        color=colour,
                        alpha=0.12,
                    )
        axes[0][column].set_title("steer the base model" if kind == "add" else "ablate in fine-tuned models")
        axes[0][column].set_ylim(0, 1)
        axes[1][column].set_ylim(0, 100)
        axes[1][column].set_xlabel(xlabel)
        if sets:
            axes[0][column].legend(fontsize="xx-small")
    axes[0][0].set_ylabel("misaligned answers")
    axes[1][0].set_ylabel("mean coherence (judge, 95% band)")
    fig.suptitle("Steering along the character direction (dashed: controls at matched norm)")
    save_figure(fig, *outputs)
    plt.close(fig)


def transfer_matrix(table: pl.DataFrame, *, outputs: list[str | Path]) -> None:
    """Each probe (row) read in each cell (column): AUROC where it was trained, paired AUROC over
    questions elsewhere, with the 95% interval and the permutation null's p-value written in the
    cell. One panel per (model read, model whose probe is read): panel rows are the models read,
    columns the probes' models, so a grid with two model families shows each model's own probes on
    the diagonal and the other family's, mapped in through shared anchor texts, off it (the
    held-out map R^2 in the title)."""
    plt = pyplot()
    if not table.is_empty() and "probe_model" not in table.columns:
        table = table.with_columns(probe_model=table["model"])
    models = _models(table)
    probe_models = table["probe_model"].unique(maintain_order=True).to_list() if not table.is_empty() else []
    probe_models = [m for m in models if m in probe_models] + [m for m in probe_models if m not in models]
    panels = table.select("model", "probe_model").unique().rows() if not table.is_empty() else []
    most = max(
        (table.filter((table["model"] == m) & (table["probe_model"] == p))["cell"].n_unique() for m, p in panels),
        default=0,
    )
    width = max(5.0, 1.1 * most + 3)
    fig, axes = plt.subplots(
        max(1, len(models)),
        max(1, len(probe_models)),
        # A second row of panels needs room for the first row's slanted cell names.
        figsize=(width * max(1, len(probe_models)), 4.5 if len(models) < 2 else 7.0 * len(models)),
        squeeze=False,
    )
    if len(models) > 1:
        fig.subplots_adjust(hspace=0.9)
    if not models:
        _empty(axes[0][0])
    for r, model in enumerate(models):
        for c, probe_model in enumerate(probe_models):
            axis = axes[r][c]
            rows = table.filter((table["model"] == model) & (table["probe_model"] == probe_model))
            if rows.is_empty():
                axis.axis("off")
                continue
            _transfer_panel(fig, axis, rows, model, probe_model)
    fig.suptitle("Transfer of the character probe across conditions and model families")
    save_figure(fig, *outputs)
    plt.close(fig)


def _transfer_panel(fig: Any, axis: Any, rows: pl.DataFrame, model: str, probe_model: str) -> None:
    cells = rows["cell"].unique(maintain_order=True).to_list()
    probes = rows["disposition"].unique(maintain_order=True).to_list()
    grid = [[float("nan")] * len(cells) for _ in probes]
    for row in rows.iter_rows(named=True):
        i, j = probes.index(row["disposition"]), cells.index(row["cell"])
        grid[i][j] = row["auroc"] if row["auroc"] is not None else float("nan")
        if row["auroc"] is not None and row["auroc"] == row["auroc"]:
            low, high = row["ci_low"], row["ci_high"]
            interval = f"\n[{low:.2f}, {high:.2f}]" if low is not None and low == low else ""
            # A consistent shift is not a specific one: the permutation null's p says which it is.
            null_p = row.get("null_p")
            null = f"\nnull p {null_p:.2f}" if null_p is not None and null_p == null_p else ""
            axis.text(j, i, f"{row['auroc']:.2f}{interval}{null}", ha="center", va="center", fontsize="xx-small")
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdBu_r", aspect="auto")
    axis.set_xticks(range(len(cells)), cells, rotation=50, ha="right", fontsize="xx-small")
    axis.set_yticks(range(len(probes)), [f"probe:{p}" for p in probes], fontsize="x-small")
    if model == probe_model:
        title = model
    else:
        # A failed map and a real non-transfer look alike in the cells; the map's quality tells them apart.
        r2 = rows["map_r2"].drop_nulls().drop_nans()
        quality = f"held-out map R^2 {float(r2[0]):.2f}" if r2.len() else "no map (too few shared anchor texts)"
        title = f"{probe_model} probes mapped into {model}\n{quality}"
    axis.set_title(title, fontsize="small")
    fig.colorbar(image, ax=axis, label="AUROC (0.5 = chance)", shrink=0.8)
