"""Errors before submission (character_em.preflight): the config against the tiny model's config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from workflow_helpers import ROOT, copy_workflow, snakemake

from character_em import config as cfg
from character_em import preflight
from character_em.llm import tiny

MODEL = "tiny-llama"


def smoke(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    for key, value in changes.items():
        section = raw
        *parents, last = key.split(".")
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    return raw


def errors_for(raw: dict[str, Any], model_dir: Path) -> list[str]:
    config = cfg.validate_config(raw)
    settings = preflight.model_settings(config, MODEL)
    return preflight.check_model(settings, json.loads((model_dir / "config.json").read_text()))


def test_the_smoke_settings_fit_the_tiny_model(tiny_model_dir: Path) -> None:
    assert errors_for(smoke(), tiny_model_dir) == []


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        (f"models.{MODEL}.probe_layers", [0, 99], f"models.{MODEL}.probe_layers"),
        ("eval.probes.layer", 99, "eval.probes.layer"),
        ("eval.probes.steering.layers", "from:50", "eval.probes.steering.layers"),
        ("train.max_seq_length", 100000, "train.max_seq_length"),
        ("eval.probes.max_tokens", 100000, "eval.probes.max_tokens"),
        ("train.target_modules", ["q_proj", "c_attn"], "train.target_modules"),
    ],
)
def test_a_setting_the_model_cannot_take_is_an_error_naming_the_key(
    tiny_model_dir: Path, key: str, value: Any, named: str
) -> None:
    errors = errors_for(smoke(**{key: value}), tiny_model_dir)
    assert len(errors) == 1 and errors[0].startswith(named), errors


def test_gpu_backends_need_a_gpu() -> None:
    config = cfg.validate_config(smoke())
    assert preflight.check_gpu_resources(config, {"judge": 0, "sample": 0}) == []  # rubric, hf sampling on CPU
    config["judge"]["backend"] = "hf"
    [error] = preflight.check_gpu_resources(config, {"judge": 0})
    assert error.startswith("judge.backend:") and "judge:gpu=1" in error
    assert preflight.check_gpu_resources(config, {"judge": 1}) == []


def workdir_with_model(tmp_path: Path, tiny_model_dir: Path, **changes: Any) -> Path:
    workdir = copy_workflow(tmp_path / "wf")
    shutil.copytree(tiny_model_dir, workdir / "resources" / "models" / MODEL)
    (workdir / "check.yaml").write_text(yaml.safe_dump(smoke(**changes), sort_keys=False))
    return workdir


def test_dry_run_fails_naming_the_key_when_the_model_is_on_disk(tmp_path: Path, tiny_model_dir: Path) -> None:
    workdir = workdir_with_model(tmp_path, tiny_model_dir, **{f"models.{MODEL}.probe_layers": [1, 64]})
    result = snakemake(workdir, "--configfile", "check.yaml", "-n", check=False, timeout=300)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert f"models.{MODEL}.probe_layers: layer(s) [64] do not exist" in text, text[-3000:]


def test_dry_run_fails_when_a_gpu_back_end_gets_no_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    workdir = workdir_with_model(tmp_path, tiny_model_dir, **{"sampling.backend": "vllm"})
    result = snakemake(
        workdir, "--configfile", "check.yaml", "-n", "--set-resources", "sample:gpu=0", check=False, timeout=300
    )
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "sampling.backend: 'vllm' runs a model on a GPU, but rule sample is given gpu=0" in text, text[-3000:]


def test_in_a_fresh_clone_the_dry_run_checks_the_tiny_model_from_its_spec(tmp_path: Path) -> None:
    """The tiny model is built by the workflow, so a fresh clone has no config.json: the dry run checks
    the config.json its build will write (llm.tiny.planned_config) instead of letting the job find out."""
    workdir = copy_workflow(tmp_path / "wf")
    changes = {f"models.{MODEL}.probe_layers": [1, 99], "train.max_seq_length": 4096}
    (workdir / "check.yaml").write_text(yaml.safe_dump(smoke(**changes), sort_keys=False))
    assert not (workdir / "resources" / "models" / MODEL).exists()
    result = snakemake(workdir, "--configfile", "check.yaml", "-n", check=False, timeout=300)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert f"models.{MODEL}.probe_layers: layer(s) [99] do not exist" in text, text[-3000:]
    assert "the config.json its build rule will write" in text and "layers 0..3" in text, text[-3000:]
    assert "train.max_seq_length (or models.tiny-llama.train.max_seq_length): 4096 is longer than" in text
    assert not (workdir / "resources" / "models" / MODEL).exists()  # nothing was built to find out


def test_the_tiny_spec_is_the_config_json_the_build_writes(tiny_model_dir: Path) -> None:
    written = json.loads((tiny_model_dir / "config.json").read_text())
    planned = tiny.planned_config()
    assert {key: written.get(key) for key in planned} == planned


def test_a_job_checks_its_model_before_loading_the_weights(tiny_model_dir: Path) -> None:
    """Where no config.json is known at the dry run (a hub model not in the cache), the first job that
    loads the model runs the same check on the config.json it reads first."""
    raw = smoke(**{"train.max_seq_length": 4096})
    raw["models"][MODEL] = {"path": str(tiny_model_dir)}
    with pytest.raises(preflight.PreflightError, match=r"train.max_seq_length .*: 4096 is longer than"):
        preflight.check_in_job(raw, MODEL)
    preflight.check_in_job(smoke() | {"models": {MODEL: {"path": str(tiny_model_dir)}}}, MODEL)
