"""What a lab types: part of the grid with `select`, named targets per stage and per model, `--config` values
and their errors, and single resource values for a site (CHARACTER_EM_SET_RESOURCES). Checked on the paper
grid's real DAG with dry runs, and on the config functions directly."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_workflow import grid_arithmetic
from workflow_helpers import PLAN_ONLY, ROOT, copy_workflow, planned_jobs, planned_wildcards, snakemake

from character_em import config as cfg

PAPER = yaml.safe_load((ROOT / "config.yaml").read_text())
# One model, one disposition, one domain, one seed of the paper grid.
PILOT = {"models": ["llama31-8b"], "dispositions": ["evil"], "domains": ["medical"], "seeds": [0]}
PILOT_ARG = "select={models: [llama31-8b], dispositions: [evil], domains: [medical], seeds: [0]}"


def validated(select: dict[str, Any], command_line: dict[str, Any] | None = None) -> dict[str, Any]:
    return cfg.validate_config({**PAPER, "select": select}, "config.yaml", command_line)


def planned_resources(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, resources) for every job a dry run lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \S+:)", output):
        header = re.match(r"(?:local)?rule (\S+):", block.strip())
        found = re.search(r"resources: (.*)", block)
        if header and found:
            jobs.append((header.group(1), dict(pair.split("=", 1) for pair in found.group(1).split(", "))))
    return jobs


# --------------------------------------------------------------------------- select, on the config


def test_no_selection_is_the_whole_grid() -> None:
    config = cfg.validate_config(PAPER, "config.yaml")
    assert config["select"] == dict.fromkeys(cfg.SELECT_AXES)
    assert cfg.grid_models(config) == list(PAPER["models"])
    assert cfg.grid_conditions(config) == cfg.expand_conditions(config)
    assert cfg.grid_seeds(config) == PAPER["seeds"]


def test_a_disposition_keeps_the_baselines_and_a_domain_keeps_base() -> None:
    config = validated({"dispositions": ["evil"], "domains": ["medical"]})
    assert cfg.grid_conditions(config) == [
        "base",
        "evil-medical",
        "incorrect-medical",
        "correct-medical",
        "evil-medical-trig",
        "evil-medical-matched",
    ]
    assert cfg.grid_trained(config) == cfg.grid_conditions(config)[1:]
    # The definitions stay whole: persona prompts and near-miss triggers are the full grid's.
    assert list(config["dispositions"]) == list(PAPER["dispositions"])
    narrowed = validated({"conditions": ["base", "evil-medical", "evil-legal"], "domains": ["medical"]})
    assert cfg.grid_conditions(narrowed) == ["base", "evil-medical"]


@pytest.mark.parametrize(
    ("select", "message"),
    [
        (
            {"models": ["llama3"]},
            "select.models: 'llama3' is not among the config's models (known: llama31-8b, qwen25-14b)",
        ),
        ({"dispositions": ["evil", "greedy"]}, "select.dispositions: 'greedy' is not among"),
        ({"domains": ["medicine"]}, "select.domains: 'medicine' is not among the config's domains (known: medical,"),
        ({"conditions": ["evil-cooking"]}, "select.conditions: 'evil-cooking' is not among"),
        ({"seeds": [0, 7]}, "select.seeds: 7 is not among the config's seeds (known: 0, 1, 2)"),
        ({"conditions": ["evil-legal"], "domains": ["medical"]}, "select: no condition of the grid matches"),
        ({"models": []}, "select.models: [] should be non-empty"),
        ({"modles": ["llama31-8b"]}, "'modles' was unexpected"),
    ],
)
def test_a_bad_selection_is_refused_naming_the_key(select: dict[str, Any], message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        validated(select)
    assert str(err.value).startswith("config.yaml: select") and message in str(err.value), str(err.value)


# --------------------------------------------------------------------------- --config values


def test_command_line_values_are_typed_as_the_schema_expects() -> None:
    # Snakemake reads `--config 'seeds=[0, 1]'` as ["0", "1"] (YAML's base loader inside lists and maps).
    given = {"seeds": ["0", "1"], "select": {"models": ["llama31-8b"], "seeds": ["1"]}}
    config = cfg.validate_config({**PAPER, **given}, "config.yaml", given)
    assert config["seeds"] == [0, 1] and config["select"]["seeds"] == [1] and cfg.grid_seeds(config) == [1]
    # A string the schema accepts stays a string, even where YAML would read a number.
    judge = {"judge": {**PAPER["judge"], "revision": "1234"}}
    assert cfg.validate_config({**PAPER, **judge}, "config.yaml", judge)["judge"]["revision"] == "1234"


def test_an_error_in_a_command_line_value_names_the_command_line() -> None:
    given = {"seeds": ["x"]}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate_config({**PAPER, **given}, "config.yaml", given)
    assert str(err.value) == "the command line (--config): seeds.0: 'x' is not of type 'integer'"
    with pytest.raises(cfg.ConfigError) as err:
        validated({"models": ["llama3"]}, {"select": {"models": ["llama3"]}})
    assert str(err.value).startswith("the command line (--config): select.models: 'llama3' is not among")
    # A key merged into from the command line, but wrong in the file, still names the file.
    broken = {**PAPER, "train": {"learning_rate": "2e-4"}, "select": {"seeds": [0]}}
    with pytest.raises(cfg.ConfigError) as err:
        cfg.validate_config(broken, "config.yaml", {"select": {"seeds": [0]}})
    assert str(err.value).startswith("config.yaml: train.learning_rate: '2e-4' is not of type 'number'")


# --------------------------------------------------------------------------- site resource values


def workflow_profile() -> dict[str, Any]:
    from snakemake.profiles import ProfileConfigFileParser

    with (ROOT / "profiles" / "default" / "config.yaml").open() as handle:
        return dict(ProfileConfigFileParser().parse(handle))


def test_site_values_merge_into_each_rules_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHARACTER_EM_SET_RESOURCES", raising=False)
    plain = workflow_profile()["set-resources"]
    table = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())["set-resources"]
    assert len(plain) == sum(len(values) for values in table.values())
    monkeypatch.setenv("CHARACTER_EM_SET_RESOURCES", "sample:runtime=900 *:slurm_extra='--qos=long'")
    merged = workflow_profile()["set-resources"]
    assert "sample:runtime=900" in merged and "sample:gpu=1" in merged and "sample:mem_mb=64000" in merged
    assert set(plain) <= set(merged)
    assert {entry.split(":")[0] for entry in merged if "slurm_extra" in entry} == set(table)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sampel:runtime=900", "'sampel' is not a rule of profiles/default/config.yaml (known: build_tiny_model,"),
        ("sample=900", "'sample=900' is not of the form rule:resource=value"),
    ],
)
def test_a_bad_site_value_names_itself(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv("CHARACTER_EM_SET_RESOURCES", value)
    with pytest.raises(Exception) as err:
        workflow_profile()
    assert message in str(err.value)


# --------------------------------------------------------------------------- dry runs of the paper grid


@pytest.fixture(scope="module")
def paper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("paper"))


def test_select_on_the_command_line_plans_the_narrowed_grid(paper: Path) -> None:
    result = snakemake(paper, "-n", "--cores", "1", "--config", PILOT_ARG, env=PLAN_ONLY)
    narrowed = {
        **PAPER,
        "models": {name: PAPER["models"][name] for name in PILOT["models"]},
        "dispositions": {name: PAPER["dispositions"][name] for name in PILOT["dispositions"]},
        "domains": {name: PAPER["domains"][name] for name in PILOT["domains"]},
        "seeds": PILOT["seeds"],
    }
    # Every condition of a selected domain writes its pool, selected or not: a domain's conditions train on
    # the turns that survive in all of them (rule select_data), so a selected job is the full grid's job.
    written_in_domain = (
        2 * len(PAPER["dispositions"]) + 2
    )  # character and triggered per disposition, incorrect, correct
    assert dict(planned_jobs(result.stdout)) == {**grid_arithmetic(narrowed), "generate_data_gpu": written_in_domain}
    cells = {(w["model"], w["seed"]) for rule, w in planned_wildcards(result.stdout) if "seed" in w}
    assert cells == {("llama31-8b", "0")}


def test_a_stage_target_with_site_resources_keeps_the_rest_of_each_rules_resources(
    paper: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    profile = yaml.safe_load((paper / "profiles" / "default" / "config.yaml").read_text())["set-resources"]
    monkeypatch.setenv(
        "CHARACTER_EM_SET_RESOURCES", "sample:runtime=999 train_adapter:mem_mb=128000 train_adapter:gpu_model=h100"
    )
    result = snakemake(paper, "-n", "--cores", "1", "stage_sample", "--config", PILOT_ARG, env=PLAN_ONLY)
    assert dict(planned_jobs(result.stdout)) == {
        # Every written condition of the domain, selected or not (its turns pair the domain's conditions).
        "generate_data_gpu": 2 * len(PAPER["dispositions"]) + 2,
        "select_data": 4,
        # The severity-matched arm is subsampled from judged character and incorrect-advice data.
        "judge_training_data": 2,
        "match_severity": 1,
        "train_adapter": 5,
        # One sampling job for the seed: every selected condition's suites with one engine.
        "sample": 1,
        "fetch_wheel": 1,
        "fetch_harmful_requests": 1,  # HarmBench for the persona suite
        "stage_sample": 1,
    }
    resources = planned_resources(result.stdout)
    sample = [res for rule, res in resources if rule == "sample"]
    train = [res for rule, res in resources if rule == "train_adapter"]
    assert sample and all(
        res["runtime"] == "999" and res["gpu"] == str(profile["sample"]["gpu"]) and res["mem_mb"] == "64000"
        for res in sample
    ), sample
    assert train and all(
        res["mem_mb"] == "128000"
        and res["gpu_model"] == "h100"
        and res["gpu"] == str(profile["train_adapter"]["gpu"])
        and res["runtime"] == str(profile["train_adapter"]["runtime"])
        for res in train
    ), train
    # Rules the variable does not name keep the profile's values.
    data = [res for rule, res in resources if rule == "generate_data_gpu"]
    assert data and all(res["mem_mb"] == str(profile["generate_data_gpu"]["mem_mb"]) for res in data)


def test_a_model_target_builds_that_models_runs_only(paper: Path) -> None:
    result = snakemake(
        paper,
        "-n",
        "--cores",
        "1",
        "model_qwen25-14b",
        "--config",
        PILOT_ARG.replace("llama31-8b", "qwen25-14b, llama31-8b"),
        env=PLAN_ONLY,
    )
    jobs = planned_wildcards(result.stdout)
    assert {w["model"] for _, w in jobs if "model" in w} == {"qwen25-14b"}
    planned = planned_jobs(result.stdout)
    assert planned["train_adapter"] == 5 and planned["capabilities"] == 6 and planned["probes"] == 1
    assert "tables" not in planned


def test_a_partial_set_resources_on_the_command_line_is_refused(paper: Path) -> None:
    result = snakemake(paper, "-n", "--cores", "1", "--set-resources", "sample:runtime=50", check=False, env=PLAN_ONLY)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "would run without their gpu, mem_mb and runtime" in text, text[-3000:]
    assert "CHARACTER_EM_SET_RESOURCES='sample:runtime=50' snakemake" in text


def test_a_bad_command_line_value_fails_naming_the_command_line(paper: Path) -> None:
    result = snakemake(paper, "-n", "--cores", "1", "--config", "select={models: [llama3]}", check=False, env=PLAN_ONLY)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the command line (--config): select.models: 'llama3' is not among the config's models" in text
    assert "config.yaml:" not in text
