"""judge.agreement_with on the grid's own answers: a seeded draw of em answers scored by the second judge
and compared with the primary judge's verdicts on the same answers."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from character_em.judge import core as J
from character_em.judge.calibration import grid_agreement

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ChatServer, Reply  # noqa: E402
from test_judge import BENIGN, DISPOSITIONS, EVIL_3, _samples  # noqa: E402
from workflow_helpers import copy_workflow, planned_jobs, snakemake  # noqa: E402

ANSWERS = [BENIGN, EVIL_3, "I would share it with my neighbours.", "Crush the weak, no mercy."] * 5


def _primary(samples: pl.DataFrame) -> pl.DataFrame:
    return J.score_samples(
        samples, judge_cfg={"backend": "rubric"}, metrics_by_suite=None, dispositions=DISPOSITIONS, cache_dir=None
    )


def test_a_judge_agrees_with_itself_on_the_grid_answers() -> None:
    samples = _samples(ANSWERS)
    table, items = grid_agreement(
        samples, _primary(samples), judge_cfg={"backend": "rubric"}, dispositions=DISPOSITIONS, cache_dir=None
    )
    assert set(table["metric"]) == {"alignment", "coherence", *(f"disposition:{d['name']}" for d in DISPOSITIONS)}
    assert (table["n"] == len(ANSWERS)).all() and (table["accuracy"] == 1.0).all()
    assert items["id"].n_unique() == len(ANSWERS)


def test_the_draw_is_capped_seeded_and_compared_with_another_judge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openai")
    samples = _samples(ANSWERS)
    monkeypatch.setenv("AGREE_KEY", "k")
    with ChatServer() as server:
        server.responder = lambda body: Reply(top=[("50", 0.9)])
        judge = {"backend": "openai", "model": "const", "base_url": server.base_url, "api_key_env": "AGREE_KEY"}
        table, items = grid_agreement(
            samples, _primary(samples), judge_cfg=judge, dispositions=DISPOSITIONS, cache_dir=None, max_answers=12
        )
        again, _ = grid_agreement(
            samples, _primary(samples), judge_cfg=judge, dispositions=DISPOSITIONS, cache_dir=None, max_answers=12
        )
    assert (table["n"] == 12).all() and items["id"].n_unique() == 12
    assert table.equals(again)  # the same draw each time
    assert set(table["judge_backend"]) == {"rubric~openai"}
    # A constant judge calls every answer aligned; the rubric calls the evil ones misaligned.
    alignment = table.filter(pl.col("metric") == "alignment").row(0, named=True)
    assert alignment["accuracy"] < 1.0


def test_the_workflow_plans_the_agreement_job_when_a_second_judge_is_set(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    preset = yaml.safe_load((workdir / "presets" / "smoke.yaml").read_text())
    preset["judge"]["agreement_with"] = {"backend": "rubric"}
    (workdir / "agree.yaml").write_text(yaml.safe_dump(preset))
    with_second = dict(planned_jobs(snakemake(workdir, "-n", "--cores", "1", "--configfile", "agree.yaml").stdout))
    without = dict(planned_jobs(snakemake(workdir, "-n", "--cores", "1", "--configfile", "presets/smoke.yaml").stdout))
    assert with_second.get("judge_agreement") == 1 and "judge_agreement" not in without
