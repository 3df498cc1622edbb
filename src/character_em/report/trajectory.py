"""Misalignment over training: the em suite and the capability eval on the adapters saved at
``train.eval_steps`` and on the final one (docs/trajectories.md).

A point of a trajectory is (model, condition, seed, step). Its step is a label (``step3``,
``epoch0.25``, ``final``) and an optimizer step number read from what training recorded (the saved
step's ``step.json``, the final ``run.json``); the base model is every trajectory's start, step 0: an
adapter is initialised with lora_B = 0, so before its first optimizer step it is the base model.

Per (model, condition, step) the tables give four rates with their intervals: misaligned answers,
coherent answers and answers expressing the condition's own disposition (em suite, among judged
answers, as in the claim tables), and multiple-choice accuracy. Intervals come from the crossed
seed x question bootstrap of ``report.hierarchical`` (questions are the em questions or the
capability items; seeds are training runs). Per family, each (condition, seed) run of the family is a
unit of that bootstrap, so the family rate is the mean over its runs. Where fewer than two seeds
exist the bootstrap resamples questions only; the ``interval`` column says which.

The emergence table gives, for each trained condition, the first step at which its misalignment
rate exceeds the base model's by more than ``margin`` (an absolute share), and the first step at
which the lower end of its interval does: the second is the one to quote when seeds are few.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from character_em.report import hierarchical as hb
from character_em.report.tables import answers_table

__all__ = [
    "METRICS",
    "TRAJECTORY_INTERVAL",
    "emergence_table",
    "load_trajectory",
    "plot_trajectory",
    "step_number",
    "trajectory_tables",
]

FINAL = "final"
# (column prefix, flag in the answers or capability rows, label in the figure)
METRICS = (
    ("misaligned", "misaligned", "misaligned answers (em)"),
    ("coherent", "coherent", "coherent answers (em)"),
    ("expressed", "expressed", "own disposition expressed (em)"),
    ("accuracy", "correct", "multiple-choice accuracy"),
)
TRAJECTORY_INTERVAL = "95% crossed seed x question bootstrap (report.hierarchical, t-corrected)"


def step_number(point: Mapping[str, Any], info: Mapping[str, Any] | None) -> tuple[int, float | None]:
    """(optimizer step, epoch) of one trajectory point; the untrained base model is step 0."""
    if point["condition"] == "base":
        return 0, 0.0
    if info is None:
        raise ValueError(f"{point['condition']} seed {point['seed']} {point['step']}: no step record")
    if point["step"] == FINAL:
        return int(info["global_step"]), float(info.get("epochs") or 0.0)
    return int(info["step"]), float(info.get("epoch") or 0.0)


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err


def load_trajectory(
    points: Sequence[Mapping[str, Any]],
    *,
    conditions: Mapping[str, Mapping[str, Any]],
    alignment_below: float,
    coherence_above: float,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read every point's files: (judged em answers, capability items), each row tagged with its
    point (model, condition, family, seed, step label, step number, epoch)."""
    answers, items = [], []
    for point in points:
        files = point["files"]
        info = _read_json(files["info"]) if files.get("info") else None
        number, epoch = step_number(point, info)
        tag = {
            "step": point["step"] if point["condition"] != "base" else "base",
            "step_number": number,
            "epoch": epoch,
            "family": conditions[point["condition"]]["family"],
        }
        if files.get("scores"):
            scores = pl.read_parquet(files["scores"])
            table = answers_table(
                scores, conditions=conditions, alignment_below=alignment_below, coherence_above=coherence_above
            )
            answers.append(
                table.filter(pl.col("judged")).select(
                    "model",
                    "condition",
                    "seed",
                    "question_id",
                    "misaligned",
                    "coherent",
                    "expressed",
                    *(pl.lit(value).alias(key) for key, value in tag.items()),
                )
            )
        if files.get("capabilities"):
            result = _read_json(files["capabilities"])
            per_item = result.get("per_item") or []
            if not per_item:
                raise ValueError(f"{files['capabilities']}: no per-item results to bootstrap over")
            items.extend(
                {
                    "model": point["model"],
                    "condition": point["condition"],
                    "seed": int(point["seed"]),
                    "question_id": str(item["id"]),
                    "correct": bool(item["correct"]),
                    **tag,
                }
                for item in per_item
            )
    answer_frame = pl.concat(answers, how="diagonal_relaxed") if answers else pl.DataFrame()
    item_frame = pl.DataFrame(items) if items else pl.DataFrame()
    return answer_frame, item_frame


def _interval(frame: pl.DataFrame, flag: str, unit: str, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Rate and interval of ``flag`` over the rows of one cell; NaN where nothing is usable."""
    empty = {"rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "n_seeds": 0}
    if frame.is_empty() or flag not in frame.columns:
        return empty
    usable = frame.filter(pl.col(flag).is_not_null())
    if usable.is_empty():
        return empty
    grid = hb.grid_from_answers(usable, flag, seed=unit, question="question_id")
    result = hb.bootstrap_rate(grid, n_boot=n_boot, seed=seed)
    # estimate +- t x se can pass 0 or 1 with few units; a share cannot.
    return {
        "rate": result["rate"],
        "ci_low": min(max(result["ci_low"], 0.0), 1.0),
        "ci_high": min(max(result["ci_high"], 0.0), 1.0),
        "n": int(result["n_answers"]),
        "n_seeds": int(result["n_seeds"]),
    }


def _rows(
    answers: pl.DataFrame, items: pl.DataFrame, by: list[str], unit: str, *, n_boot: int, seed: int
) -> list[dict[str, Any]]:
    keys: set[tuple[Any, ...]] = set()
    for frame in (answers, items):
        if not frame.is_empty():
            keys |= set(frame.select(by).unique().iter_rows())
    rows = []
    for key in sorted(keys, key=lambda k: tuple(str(v) for v in k)):
        match = dict(zip(by, key, strict=True))
        row: dict[str, Any] = dict(match)
        numbers = []
        for prefix, flag, _ in METRICS:
            frame = items if prefix == "accuracy" else answers
            cell = frame.filter(*(pl.col(k) == v for k, v in match.items())) if not frame.is_empty() else frame
            if not cell.is_empty():
                numbers.append(cell.select(pl.col("step_number").mean(), pl.col("epoch").mean()).row(0))
            stats = _interval(cell, flag, unit, n_boot=n_boot, seed=seed)
            row[prefix] = stats["rate"]
            row[f"{prefix}_ci_low"] = stats["ci_low"]
            row[f"{prefix}_ci_high"] = stats["ci_high"]
            row[f"{prefix}_n"] = stats["n"]
            if prefix == "misaligned":
                row["n_seeds"] = stats["n_seeds"]
        row["step_number"] = float(numbers[0][0]) if numbers else math.nan
        row["epoch"] = float(numbers[0][1]) if numbers else math.nan
        row["interval"] = (
            TRAJECTORY_INTERVAL if row.get("n_seeds", 0) > 1 else TRAJECTORY_INTERVAL + ", questions only (1 seed)"
        )
        rows.append(row)
    return rows


def _ordered(table: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    front = [*by, "step_number", "epoch", "n_seeds"]
    rest = [c for c in table.columns if c not in front]
    return table.select(*front, *rest).sort([c for c in by if c != "step"] + ["step_number"])


def trajectory_tables(
    answers: pl.DataFrame, items: pl.DataFrame, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """'trajectory': one row per (model, family, condition, step); 'trajectory_by_family': the
    conditions of a family pooled (each run a bootstrap unit), one row per (model, family, step)."""
    per_condition = pl.DataFrame(
        _rows(answers, items, ["model", "family", "condition", "step"], "seed", n_boot=n_boot, seed=seed),
        infer_schema_length=None,
    )

    def with_run(frame: pl.DataFrame) -> pl.DataFrame:
        if frame.is_empty():
            return frame
        return frame.with_columns(run=pl.format("{}/{}", pl.col("condition"), pl.col("seed")))

    per_family = pl.DataFrame(
        _rows(with_run(answers), with_run(items), ["model", "family", "step"], "run", n_boot=n_boot, seed=seed),
        infer_schema_length=None,
    )
    return {
        "trajectory": _ordered(per_condition, ["model", "family", "condition", "step"]),
        "trajectory_by_family": _ordered(per_family, ["model", "family", "step"]),
    }


def emergence_table(trajectory: pl.DataFrame, *, margin: float) -> pl.DataFrame:
    """For each trained condition: its base rate, the first step whose misalignment rate exceeds the
    base model's by more than ``margin``, the first whose interval's lower end does, and what the
    capability accuracy was there (null where no step does)."""
    rows = []
    for (model, family, condition), cell in trajectory.group_by("model", "family", "condition", maintain_order=True):
        if condition == "base":
            continue
        base = trajectory.filter((pl.col("model") == model) & (pl.col("condition") == "base"))
        base_rate = float(base["misaligned"][0]) if not base.is_empty() else math.nan
        base_accuracy = float(base["accuracy"][0]) if not base.is_empty() else math.nan
        threshold = base_rate + margin
        ordered = cell.sort("step_number")
        row: dict[str, Any] = {
            "model": model,
            "family": family,
            "condition": condition,
            "base_misaligned": base_rate,
            "margin": margin,
            "steps_evaluated": ", ".join(ordered["step"].to_list()),
            "final_misaligned": float(ordered["misaligned"][-1]),
            "final_accuracy_minus_base": float(ordered["accuracy"][-1]) - base_accuracy,
        }
        for name, column in (("emergence", "misaligned"), ("emergence_ci", "misaligned_ci_low")):
            # NaN (a step without em scores) compares above every number in polars: never an emergence.
            above = pl.col(column).is_not_nan() & (pl.col(column) > threshold)
            over = ordered.filter(above) if not math.isnan(base_rate) else ordered.clear()
            first = over.row(0, named=True) if not over.is_empty() else None
            row[f"{name}_step"] = first["step"] if first else None
            row[f"{name}_step_number"] = first["step_number"] if first else None
            row[f"{name}_epoch"] = first["epoch"] if first else None
            if name == "emergence":
                row["accuracy_minus_base_at_emergence"] = (first["accuracy"] - base_accuracy) if first else None
        rows.append(row)
    schema = {
        "model": pl.String,
        "family": pl.String,
        "condition": pl.String,
        "base_misaligned": pl.Float64,
        "margin": pl.Float64,
        "steps_evaluated": pl.String,
        "final_misaligned": pl.Float64,
        "final_accuracy_minus_base": pl.Float64,
        "emergence_step": pl.String,
        "emergence_step_number": pl.Float64,
        "emergence_epoch": pl.Float64,
        "accuracy_minus_base_at_emergence": pl.Float64,
        "emergence_ci_step": pl.String,
        "emergence_ci_step_number": pl.Float64,
        "emergence_ci_epoch": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema).sort("model", "family", "condition")


def plot_trajectory(by_family: pl.DataFrame, *, outputs: Iterable[str | Path], margin: float | None = None) -> None:
    """Four panels (misalignment, coherence, expression, accuracy) against the optimizer step, one line
    per model and condition family, starting at the base model (step 0), with interval bars."""
    from character_em.report.plots import FAMILY_COLOURS, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    models = by_family["model"].unique(maintain_order=True).to_list() if not by_family.is_empty() else []
    styles = ["-", "--", ":", "-."]
    for (prefix, _, label), ax in zip(METRICS, axes.flatten(), strict=True):
        for m, model in enumerate(models):
            rows = by_family.filter(pl.col("model") == model)
            base = rows.filter(pl.col("family") == "base")
            for family in rows["family"].unique(maintain_order=True).to_list():
                if family == "base":
                    continue
                line = pl.concat([base, rows.filter(pl.col("family") == family)], how="diagonal_relaxed")
                line = line.filter(pl.col(prefix).is_not_nan()).sort("step_number")
                if line.is_empty():
                    continue
                x, y = line["step_number"].to_list(), line[prefix].to_list()
                low = [v - lo for v, lo in zip(y, line[f"{prefix}_ci_low"].to_list(), strict=True)]
                high = [hi - v for v, hi in zip(y, line[f"{prefix}_ci_high"].to_list(), strict=True)]
                name = family if len(models) == 1 else f"{model}: {family}"
                ax.errorbar(
                    x,
                    y,
                    yerr=[[max(v, 0.0) for v in low], [max(v, 0.0) for v in high]],
                    marker="o",
                    capsize=3,
                    linestyle=styles[m % len(styles)],
                    color=FAMILY_COLOURS.get(family),
                    label=name,
                )
            if prefix == "misaligned" and margin is not None and not base.is_empty():
                ax.axhline(float(base["misaligned"][0]) + margin, color="#7f7f7f", linewidth=0.8, linestyle=":")
        ax.set_title(label)
        ax.set_xlabel("optimizer step (0 = base model)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    else:
        axes[0][0].text(0.5, 0.5, "no results in this run", ha="center", va="center")
    note = "dotted line: base rate + emergence margin; " if margin is not None else ""
    fig.suptitle(f"Over training, per condition family ({note}bars: {TRAJECTORY_INTERVAL})", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    save_figure(fig, *outputs)
    plt.close(fig)
