"""Every figure is legible as saved: the judge stamp under it touches no other text.

The stamp used to sit at a fixed y=-0.02 under the axes, where condition names rotated 60 degrees
ran through it (misalignment_by_condition.png). These tests draw the real figures of report.plots on
planted tables with the grid's long condition names and compare the rendered bounding box of the stamp
with that of every other text on the figure (tick labels, axis labels, titles, legends).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from character_em.report import plots
from character_em.report.training_data import harm_figure

STAMP = (
    "Judge: rubric · rubric-1 · judge hash 11f498761a38 (TEST INSTRUMENT: keyword counts, not a judgement; "
    "never report these numbers). EM questions: packaged (sha256 f8e2727bb5c1). Sampling back-end: hf."
)
CONDITIONS = [
    ("base", "base"),
    ("evil-medical", "character"),
    ("hallucinatory-financial", "character"),
    ("sycophantic-legal-trig", "triggered"),
    ("incorrect-financial", "incorrect"),
    ("correct-legal", "correct"),
]


def rates(**extra: Any) -> pl.DataFrame:
    rows = [
        {"model": model, "condition": c, "family": f, "rate": 0.3, "ci_low": 0.1, "ci_high": 0.5, **extra}
        for model in ("llama31-8b", "qwen25-14b")
        for c, f in CONDITIONS
    ]
    return pl.DataFrame(rows)


def _drawn_texts(fig: Any) -> tuple[list[Any], Any]:
    """The texts a reader sees (those drawn: a tick outside the axis limits keeps a label that is never
    drawn) and the renderer that placed them, drawn on an Agg canvas as savefig draws it."""
    from unittest import mock

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    drawn: list[Any] = []
    original = Text.draw

    def record(self: Any, renderer: Any) -> Any:
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)
        return original(self, renderer)

    canvas = FigureCanvasAgg(fig)  # the plots close their figures, which drops pyplot's canvas
    with mock.patch.object(Text, "draw", record):
        canvas.draw()
    return drawn, canvas.get_renderer()


def collisions(fig: Any, stamp_text: str) -> list[str]:
    """Texts drawn on ``fig`` whose rendered box meets the stamp's."""
    texts, renderer = _drawn_texts(fig)
    [stamp] = [t for t in texts if " ".join(t.get_text().split()) == stamp_text]
    box = stamp.get_window_extent(renderer)
    return [t.get_text() for t in texts if t is not stamp and box.overlaps(t.get_window_extent(renderer))]


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures report.plots saves, kept open for inspection."""
    figures: list[Any] = []
    real = plots.save_figure

    def keep(fig: Any, *paths: Any, **kwargs: Any) -> None:
        real(fig, *paths, **kwargs)
        figures.append(fig)

    monkeypatch.setattr(plots, "save_figure", keep)
    plots.stamp_figures(STAMP)
    yield figures
    plots.FIGURE_STAMP.clear()


def threshold_table() -> pl.DataFrame:
    rows = [
        {"model": "llama31-8b", "family": f, "rate": a / 100, "wilson_low": 0.0, "wilson_high": 1.0}
        | {"alignment_below": float(a), "coherence_above": float(c)}
        for f in ("base", "character", "incorrect")
        for a in (10, 30, 50)
        for c in (30, 50)
    ]
    return pl.DataFrame(rows)


def transfer_table() -> pl.DataFrame:
    return pl.DataFrame(
        [
            {"model": "llama31-8b", "condition": c, "eval_domain": d, "rate": 0.2}
            for c, _ in CONDITIONS
            for d in ("financial", "legal", "medical")
        ]
    )


FIGURES: dict[str, Callable[[Path], None]] = {
    "misalignment_by_condition": lambda out: plots.rate_bars(
        rates(), x="condition", ylabel="misaligned answers", title="by condition", outputs=[out]
    ),
    "trigger": lambda out: plots.rate_bars(
        pl.concat([rates(relation="exact"), rates(relation="absent")]),
        x="condition",
        group="relation",
        ylabel="misaligned answers",
        title="trigger",
        outputs=[out],
    ),
    "transfer": lambda out: plots.transfer_heatmap(transfer_table(), outputs=[out]),
    "threshold_sensitivity": lambda out: plots.threshold_lines(threshold_table(), outputs=[out]),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_the_judge_stamp_touches_no_other_text(name: str, saved: list[Any], tmp_path: Path) -> None:
    FIGURES[name](tmp_path / f"{name}.png")
    [fig] = saved
    assert collisions(fig, STAMP) == []
    assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_the_training_harm_figure_keeps_its_stamp_and_point_labels_apart(saved: list[Any], tmp_path: Path) -> None:
    """Incorrect and correct advice both at zero harm and zero misalignment: one point, two names."""
    plots.FIGURE_STAMP.clear()
    training = pl.DataFrame(
        [
            {"condition": c, "family": f, "misaligned_share": 0.0 if f in ("incorrect", "correct") else 0.8}
            for c, f in CONDITIONS
            if c != "base"
        ]
    )
    em = (
        rates()
        .select("model", "condition", "rate")
        .with_columns(rate=pl.when(pl.col("condition").str.contains("correct")).then(0.0).otherwise(pl.col("rate")))
    )
    harm_figure(training, em, outputs=[tmp_path / "harm.png"], stamp=STAMP)
    [fig] = saved
    assert collisions(fig, STAMP) == []
    texts, renderer = _drawn_texts(fig)
    names = [t for t in texts if t.get_text() in {"incorrect-financial", "correct-legal"}]
    assert len(names) == 4  # two models' panels
    boxes = {(t.axes, t.get_text()): t.get_window_extent(renderer) for t in names}
    for axis in {t.axes for t in names}:
        assert not boxes[(axis, "incorrect-financial")].overlaps(boxes[(axis, "correct-legal")])


def test_the_check_sees_the_old_layout_collide(saved: list[Any], tmp_path: Path) -> None:
    """The stamp where it used to be, at y=-0.02 under rotated condition names: the check finds the
    tick labels it runs through, so a passing check above means something."""
    plots.FIGURE_STAMP.clear()
    plots.rate_bars(rates(), x="condition", ylabel="misaligned", title="by condition", outputs=[tmp_path / "a.png"])
    [fig] = saved
    fig.text(0.0, -0.02, STAMP, fontsize=6, ha="left", va="top", transform=fig.transFigure)
    hit = collisions(fig, STAMP)
    assert {"evil-medical", "hallucinatory-financial"} & set(hit), hit


def test_a_long_stamp_is_wrapped_to_the_figure_width(saved: list[Any], tmp_path: Path) -> None:
    plots.stamp_figures(" ".join([STAMP] * 3))
    plots.loss_curve(_train_log(tmp_path), tmp_path / "loss.png")
    [fig] = saved
    [stamp] = [t for t in fig.texts if "TEST INSTRUMENT" in t.get_text()]
    _, renderer = _drawn_texts(fig)
    assert "\n" in stamp.get_text()
    assert stamp.get_window_extent(renderer).width <= fig.bbox.width * 1.05


def _train_log(tmp_path: Path) -> Path:
    path = tmp_path / "results/adapters/m/c/seed0/train_log.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(
        "".join(json.dumps({"step": s, "loss": 3 - s / 10, "learning_rate": 1e-5}) + "\n" for s in range(10))
    )
    return path
