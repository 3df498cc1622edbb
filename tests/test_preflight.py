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


def test_dry_run_fails_when_a_gpu_back_end_gets_no_gpu(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = workdir_with_model(tmp_path, tiny_model_dir, **{"sampling.backend": "vllm"})
    # A single value is merged into the workflow profile's table (profiles/default/config.yaml).
    monkeypatch.setenv("CHARACTER_EM_SET_RESOURCES", "sample:gpu=0")
    result = snakemake(workdir, "--configfile", "check.yaml", "-n", check=False, timeout=300)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "sampling.backend: 'vllm' runs a model on a GPU, but rule sample is given gpu=0" in text, text[-3000:]


def test_without_the_model_on_disk_the_first_job_checks_before_training(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "check.yaml").write_text(yaml.safe_dump(smoke(**{"train.max_seq_length": 4096}), sort_keys=False))
    # The tiny model is built by the workflow: nothing to check against at DAG time.
    assert not (workdir / "resources" / "models" / MODEL).exists()
    snakemake(workdir, "--configfile", "check.yaml", "-n", timeout=300)
    adapter = f"results/adapters/{MODEL}/evil-medical/seed0/adapter_model.safetensors"
    result = snakemake(workdir, "--configfile", "check.yaml", "--cores", "1", adapter, check=False, timeout=900)
    assert result.returncode != 0
    log = (workdir / f"logs/train_adapter/{MODEL}/evil-medical/seed0.log").read_text()
    assert "train.max_seq_length (or models.tiny-llama.train.max_seq_length): 4096 is longer than" in log, log[-3000:]
    # It failed before any training: no checkpoint, no step logged.
    assert not (workdir / f"results/checkpoints/{MODEL}/evil-medical/seed0").exists()
