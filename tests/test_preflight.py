"""Errors before submission (character_em.preflight): the config against the tiny model's config.json."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from workflow_helpers import PLAN_ONLY, ROOT, copy_workflow, planned_jobs, snakemake

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


# --------------------------------------------------------------------------- GPU back-ends: imports and memory


def test_a_vllm_back_end_is_refused_where_its_jobs_cannot_import_it() -> None:
    config = cfg.validate_config(smoke(**{"sampling.backend": "vllm", "judge.backend": "vllm"}))
    errors = preflight.check_gpu_imports(config, python="/opt/py/bin/python", importable=False)
    assert [e.split(" is 'vllm'")[0] for e in errors] == ["sampling.backend", "judge.backend"]
    assert "rule sample (model tiny-llama) run in /opt/py/bin/python" in errors[0] and "--sdm conda" in errors[0]
    assert preflight.check_gpu_imports(config, importable=True) == []
    # With --sdm conda, the environment file each rule's jobs run in decides.
    envs = {
        "sample": lambda model: str(ROOT / "envs" / "vllm.yaml"),
        "judge": lambda model: str(ROOT / "envs" / "judge.yaml"),
    }
    [error] = preflight.check_gpu_imports(config, conda_envs=envs, importable=False)
    assert (
        error.startswith("judge.backend is 'vllm', but rule judge runs in the conda environment")
        and "judge.yaml" in error
    )
    # An hf configuration never needs vLLM.
    assert preflight.check_gpu_imports(cfg.validate_config(smoke()), importable=False) == []


def test_parameters_from_config_json_and_from_the_name() -> None:
    llama8b = {
        "hidden_size": 4096, "num_hidden_layers": 32, "vocab_size": 128256, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
    }  # fmt: skip
    assert preflight.params_from_config(llama8b) == pytest.approx(8.03, abs=0.01)
    assert preflight.params_from_config({**llama8b, "num_local_experts": 8}) is None
    assert preflight.params_billions("Qwen/Qwen2.5-72B-Instruct") == 72.0
    assert preflight.params_billions("smollm2-135m") == pytest.approx(0.135)


def test_the_paper_grid_fits_an_h200_and_a_bf16_70b_judge_does_not() -> None:
    paper = cfg.load_config(ROOT / "config.yaml")
    assert paper["cluster"]["gpu_memory_gb"] == 141
    assert preflight.check_gpu_memory(paper, {"sample": 1, "judge": 1, "generate_data_gpu": 1}) == []
    paper["judge"]["quantization"] = "none"
    paper["cluster"]["gpu_memory_gb"] = 80
    # (the 72B writer in FP8 does not fit 80 GB either: its data jobs are left out here)
    [error] = preflight.check_gpu_memory(paper, {"judge": 1, "generate_data_gpu": 0})
    assert error.startswith("rule judge: model meta-llama/Llama-3.3-70B-Instruct (judge) needs about 168 GB")
    # The fixes a vllm judge can take: FP8 (about 84 GB) does not fit 80 GB either.
    assert "one GPU of 80 GB (cluster.gpu_memory_gb). Fix: a smaller model, or a GPU with more memory" in error
    paper["judge"]["backend"] = "hf"
    [error] = preflight.check_gpu_memory(paper, {"judge": 1, "generate_data_gpu": 0})
    assert "Fix: judge.quantization: nf4 (about 48 GB), or a GPU with more memory" in error
    # A judge kept off the GPU, or a check switched off, asks nothing of it.
    off = {**paper, "judge": {**paper["judge"], "device": "cpu"}}
    assert preflight.check_gpu_memory(off, {"judge": 1, "generate_data_gpu": 0}) == []
    assert preflight.check_gpu_memory({**paper, "cluster": {"gpu_memory_gb": None}}) == []


def test_dry_run_refuses_vllm_sampling_that_cannot_be_imported_here(tmp_path: Path, tiny_model_dir: Path) -> None:
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable in this environment: the refusal cannot happen here")
    workdir = workdir_with_model(tmp_path, tiny_model_dir, **{"sampling.backend": "vllm"})
    result = snakemake(workdir, "--configfile", "check.yaml", "-n", check=False, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sampling.backend is 'vllm', but the jobs of rule sample (model tiny-llama) run in" in text, text[-3000:]
    assert "cannot import vllm. Fix: run with --sdm conda" in text
    # Only planning: the same dry run lists the jobs.
    planned = snakemake(workdir, "--configfile", "check.yaml", "-n", "--cores", "1", env=PLAN_ONLY, timeout=300)
    assert planned_jobs(planned.stdout)["sample"] == 1
    # With --sdm conda the rule's environment file decides: a vllm back-end's rules (sample, and judge,
    # judge_training_data and judge_calibration for a vllm judge) run in envs/vllm.yaml, which has vLLM.
    (workdir / "judge.yaml").write_text(
        yaml.safe_dump(
            smoke(
                **{"sampling.backend": "vllm", "judge.backend": "vllm", "judge.model": "resources/models/tiny-llama"}
            ),
            sort_keys=False,
        )
    )
    result = snakemake(workdir, "--configfile", "judge.yaml", "-n", "--sdm", "conda", check=False, timeout=300)
    text = result.stdout + result.stderr
    assert "is 'vllm', but" not in text, text[-3000:]
    # Past the preflight, Snakemake deploys the environments: it plans where conda is installed, and here,
    # without conda, stops at looking it up.
    assert result.returncode == 0 or "Error running conda info" in text, text[-3000:]


def test_dry_run_refuses_a_model_that_cannot_fit_its_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    workdir = workdir_with_model(
        tmp_path,
        tiny_model_dir,
        **{
            "judge.backend": "hf",
            "judge.model": "meta-llama/Llama-3.3-70B-Instruct",
            "judge.revision": "6f6073b423013f6a7d4d9f39144961bfbfbc386b",
            "cluster.gpu_memory_gb": 80,
        },
    )
    result = snakemake(workdir, "--configfile", "check.yaml", "-n", check=False, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "rule judge: model meta-llama/Llama-3.3-70B-Instruct (judge) needs about 168 GB of GPU memory" in text, text[
        -3000:
    ]
    assert "Fix: judge.quantization: nf4 (about 48 GB)" in text
