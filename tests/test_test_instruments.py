"""The test instruments (the rubric judge, the offline generator) run only in configs that declare
themselves test fixtures; the paper grid is a real setup and says so before any job."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from character_em import config as cfg
from character_em import job_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_paper_grid_uses_pinned_model_writer_and_judge_and_full_mmlu(paper: dict[str, Any]) -> None:
    resolved = cfg.validate_config(paper)
    assert resolved["test_fixture"] is False
    assert cfg.test_instruments_in_use(resolved) == []
    judge, writer = resolved["judge"], resolved["data"]["generator"]
    assert judge["backend"] == "vllm" and judge["quantization"] == "fp8"
    assert writer["backend"] == "vllm" and writer["quantization"] == "fp8"
    for section in (judge, writer):
        assert len(section["revision"]) == 40 and int(section["revision"], 16) >= 0
    assert judge["model"] != writer["model"], "the judge must not grade its own writing"
    assert resolved["data"]["filter"]["enabled"] is True
    assert resolved["eval"]["capabilities"]["task_file"] == "resources/tasks/mmlu.jsonl"
    assert resolved["eval"]["capabilities"]["max_items"] is None
    # The revision reaches the judge jobs and the data jobs (it names the weights).
    assert job_params_have_revision(resolved)


def job_params_have_revision(resolved: dict[str, Any]) -> bool:
    judge = job_settings.job_params(resolved["judge"])
    writer = job_settings.generator_params(resolved["data"]["generator"])
    pinned = resolved["data"]["generator"]["revision"]
    return judge["revision"] == resolved["judge"]["revision"] and writer["revision"] == pinned


@pytest.mark.parametrize(
    ("change", "key", "instrument"),
    [
        ({"judge": {"backend": "rubric"}}, "judge.backend", "rubric"),
        ({"data": {"generator": {"backend": "offline"}}}, "data.generator.backend", "offline"),
        (
            {"judge": {"agreement_with": {"backend": "rubric"}}},
            "judge.agreement_with.backend",
            "rubric",
        ),
        ({"data": {"filter": {"judge": {"backend": "rubric"}}}}, "data.filter.judge.backend", "rubric"),
    ],
)
def test_a_test_instrument_outside_a_fixture_is_refused_naming_the_key(
    paper: dict[str, Any], change: dict[str, Any], key: str, instrument: str
) -> None:
    broken = cfg.deep_merge(paper, change)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate_config(broken, source="lab.yaml")
    message = str(caught.value)
    assert f"lab.yaml: {key}: {instrument!r} is a test instrument" in message
    assert "test_fixture: true" in message
    # Declared a test fixture, the same config is accepted.
    assert cfg.validate_config({**broken, "test_fixture": True})["test_fixture"] is True


def test_offline_generator_is_fine_when_every_trained_condition_brings_its_own_data(
    paper: dict[str, Any],
) -> None:
    raw = copy.deepcopy(paper)
    raw["data"]["generator"] = {"backend": "offline"}
    resolved = cfg.validate_config({**raw, "test_fixture": True})
    raw["data"]["external"] = {name: f"data/{name}.jsonl" for name in cfg.written_conditions(resolved)}
    assert cfg.validate_config(raw)["data"]["generator"]["backend"] == "offline"


def test_a_config_with_no_judge_section_is_refused_not_run_with_the_rubric(paper: dict[str, Any]) -> None:
    raw = {key: value for key, value in paper.items() if key != "judge"}
    with pytest.raises(cfg.ConfigError, match=r"judge.backend: 'rubric' is a test instrument"):
        cfg.validate_config(raw)


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_the_smoke_and_demo_presets_declare_themselves_fixtures(preset: str) -> None:
    resolved = cfg.load_config(ROOT / "presets" / f"{preset}.yaml")
    assert resolved["test_fixture"] is True
    assert ("judge.backend", "rubric") in cfg.test_instruments_in_use(resolved)


def test_a_local_model_judge_asks_for_a_gpu() -> None:
    assert job_settings.judge_gpus({"backend": "hf"}) == 1
    assert job_settings.judge_gpus({"backend": "vllm"}) == 1
    assert job_settings.judge_gpus({"backend": "openai"}) == 0
    assert job_settings.judge_gpus({"backend": "rubric"}, None) == 0
    assert job_settings.judge_gpus({"backend": "rubric"}, {"backend": "hf"}) == 1


@pytest.mark.parametrize("section", ["judge", "data.generator"])
def test_an_unpinned_hub_model_is_refused_outside_fixtures(paper: dict[str, Any], section: str) -> None:
    raw = copy.deepcopy(paper)
    node = raw
    for part in section.split("."):
        node = node[part]
    del node["revision"]
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate_config(raw, source="lab.yaml")
    assert f"lab.yaml: {section}.revision: {section}.model" in str(caught.value)
    assert "hub id without a pinned revision" in str(caught.value)
    # A local folder needs no revision: its weights are hashed by content.
    node["model"] = str(ROOT / "src")
    assert cfg.validate_config(raw)


def test_a_local_judge_pinned_to_the_cpu_asks_for_no_gpu() -> None:
    assert job_settings.judge_gpus({"backend": "hf", "device": "cpu"}) == 0
    assert job_settings.judge_gpus({"backend": "hf", "device": "cuda:0"}) == 1
    demo = cfg.load_config(ROOT / "presets" / "demo.yaml")
    assert job_settings.judge_gpus(demo["judge"], demo["judge"]["agreement_with"]) == 0


def test_data_jobs_with_a_local_filter_judge_run_on_a_gpu_node(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from workflow_helpers import copy_workflow, planned_jobs, snakemake

    workdir = copy_workflow(tmp_path / "wf")
    preset = yaml.safe_load((workdir / "presets" / "smoke.yaml").read_text())
    preset["data"]["filter"] = {"enabled": True, "judge": {"backend": "hf", "model": "resources/models/tiny-llama"}}
    (workdir / "filtered.yaml").write_text(yaml.safe_dump(preset))
    jobs = dict(planned_jobs(snakemake(workdir, "-n", "--cores", "1", "--configfile", "filtered.yaml").stdout))
    assert jobs.get("generate_data_gpu") == 4 and "generate_data" not in jobs


def test_a_single_seed_grid_is_refused_outside_fixtures_unless_allowed(paper: dict[str, Any]) -> None:
    """One training run per condition says nothing about training-run variation: refused before any job,
    naming the key and both ways out; test fixtures (the smoke and demo presets) are exempt."""
    one_seed = {**paper, "seeds": [0]}
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate_config(one_seed, source="lab.yaml")
    message = str(caught.value)
    assert message.startswith("lab.yaml: seeds: [0] trains each condition once")
    assert "seeds: [0, 1, 2]" in message and "eval.allow_single_seed: true" in message
    allowed = cfg.deep_merge(one_seed, {"eval": {"allow_single_seed": True}})
    assert cfg.validate_config(allowed)["seeds"] == [0]
    assert cfg.validate_config({**one_seed, "test_fixture": True})["seeds"] == [0]
    assert cfg.validate_config({**paper, "seeds": [0, 1]})["eval"]["allow_single_seed"] is False
