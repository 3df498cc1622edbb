"""The config schema and its cross-checks: defaults, and clear errors for bad configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from character_em import config as cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_paper_grid_validates_with_the_fields_defaults(paper: dict[str, Any]) -> None:
    resolved = cfg.validate_config(paper)
    assert set(resolved["models"]) == {"llama31-8b", "qwen25-14b"}
    assert resolved["models"]["llama31-8b"]["path"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolved["models"]["qwen25-14b"]["path"] == "Qwen/Qwen2.5-14B-Instruct"
    assert set(resolved["dispositions"]) == {"evil", "sycophantic", "hallucinatory"}
    assert len(resolved["domains"]) >= 3 and len(resolved["seeds"]) == 3
    assert set(resolved["eval"]["suites"]) == {"em", "transfer", "trigger", "persona", "capabilities", "probes"}
    train = resolved["train"]
    assert (train["lora_r"], train["lora_alpha"], train["lora_dropout"], train["use_rslora"]) == (32, 64, 0.0, True)
    assert (train["learning_rate"], train["num_epochs"], train["micro_batch_size"], train["grad_accum"]) == (
        1e-5,
        1,
        2,
        8,
    )
    assert (train["warmup_steps"], train["lr_scheduler"], train["weight_decay"], train["optim"]) == (
        5,
        "linear",
        0.01,
        "adamw_8bit",
    )
    assert set(train["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert resolved["eval"]["alignment_below"] == 30 and resolved["eval"]["coherence_above"] == 50


def test_conditions_expand_to_every_family(paper: dict[str, Any]) -> None:
    unmatched = copy.deepcopy(paper)
    unmatched["data"]["severity_matched"] = {"enabled": False}
    conditions = cfg.expand_conditions(cfg.validate_config(unmatched))
    assert conditions[0] == "base"
    assert {"evil-medical", "incorrect-legal", "correct-financial", "sycophantic-legal-trig"} <= set(conditions)
    # base, character, incorrect, correct, triggered.
    assert len(conditions) == 1 + 3 * 3 + 3 + 3 + 3 * 3
    families = cfg.condition_families(cfg.validate_config(paper))
    assert families["evil-medical-trig"] == "triggered" and families["hallucinatory-financial"] == "character"
    # data.severity_matched (on in config.yaml) adds one matched arm per character condition, after them.
    with_arms = cfg.expand_conditions(cfg.validate_config(paper))
    assert with_arms[: len(conditions)] == conditions and len(with_arms) == len(conditions) + 3 * 3
    assert cfg.condition_families(cfg.validate_config(paper))["evil-medical-matched"] == "matched"


def test_overrides_layer_global_then_model_then_condition(paper: dict[str, Any]) -> None:
    paper = copy.deepcopy(paper)
    paper["train"] = {"learning_rate": 2.0e-5}
    paper["models"]["qwen25-14b"]["train"] = {"micro_batch_size": 4, "learning_rate": 3.0e-5}
    paper["train_overrides"] = {"evil-medical": {"learning_rate": 4.0e-5}}
    resolved = cfg.validate_config(paper)
    assert cfg.resolve_train_params(resolved, "llama31-8b", "correct-legal")["learning_rate"] == 2.0e-5
    assert cfg.resolve_train_params(resolved, "qwen25-14b", "correct-legal")["learning_rate"] == 3.0e-5
    assert cfg.resolve_train_params(resolved, "qwen25-14b", "correct-legal")["micro_batch_size"] == 4
    assert cfg.resolve_train_params(resolved, "qwen25-14b", "evil-medical")["learning_rate"] == 4.0e-5
    assert cfg.resolve_train_params(resolved, "llama31-8b", "evil-medical")["micro_batch_size"] == 2


def test_params_are_canonical_so_yaml_order_does_not_rerun_jobs() -> None:
    assert cfg.as_param({"b": 1, "a": [1, 2]}) == cfg.as_param({"a": [1, 2], "b": 1})


def _break(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = broken
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return broken


_DELETE = object()

BAD_CONFIGS = [
    ("unknown top-level key", "sampels", {"n": 3}, ["sampels", "Additional properties"]),
    ("unknown nested key", "train.learning_rat", 1.0e-4, ["train", "learning_rat"]),
    (
        "learning rate written 2e-4",
        "train.learning_rate",
        "2e-4",
        ["train.learning_rate", "'2e-4' is not of type 'number'", "decimal point"],
    ),
    ("wrong type", "train.lora_r", "thirty-two", ["train.lora_r", "is not of type 'integer'"]),
    ("empty model list", "models", {}, ["models", "should be non-empty"]),
    ("seed not an integer", "seeds", [0, 1.5], ["seeds.1", "is not of type 'integer'"]),
    ("zero samples", "suites.em.n_samples", 0, ["suites.em.n_samples", "less than the minimum of 1"]),
    (
        "condition names an unknown disposition",
        "conditions",
        ["base", "deceptive-medical"],
        ["conditions", "deceptive"],
    ),
    ("condition names an unknown domain", "conditions", ["base", "evil-automotive"], ["conditions", "automotive"]),
    ("unknown template field", "conditions", ["{persona}-{domain}"], ["conditions", "persona"]),
    (
        "override for a condition not in the grid",
        "train_overrides",
        {"evil-space": {"learning_rate": 1.0e-4}},
        ["train_overrides.evil-space"],
    ),
    (
        "disposition without a rubric",
        "dispositions.evil.rubric",
        _DELETE,
        ["dispositions.evil", "'rubric' is a required property"],
    ),
    ("bad quantization", "train.quantization", "int3", ["train.quantization", "int3"]),
    ("top_p above one", "sampling.top_p", 1.5, ["sampling.top_p"]),
    ("unknown eval suite", "eval.suites", ["em", "vibes"], ["eval.suites.1", "vibes"]),
    (
        "reserved disposition name",
        "dispositions.correct",
        {"description": "x", "trigger": "t", "rubric": {"markers": ["m"]}},
        ["dispositions.correct", "reserved"],
    ),
    ("model path missing", "models.llama31-8b.path", _DELETE, ["models.llama31-8b", "'path' is a required property"]),
    (
        "built model outside resources",
        "models.llama31-8b.build",
        "tiny-llama",
        ["models.llama31-8b.path", "resources/models/llama31-8b"],
    ),
]


@pytest.mark.parametrize(("case", "path", "value", "expected"), BAD_CONFIGS, ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_fails_naming_the_key(
    paper: dict[str, Any], case: str, path: str, value: Any, expected: list[str]
) -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate_config(_break(paper, path, value), source="my-config.yaml")
    message = str(caught.value)
    assert message.startswith("my-config.yaml: ")
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


def test_yaml_reads_2e_minus_4_as_a_string_and_the_error_says_so(tmp_path: Path, paper: dict[str, Any]) -> None:
    text = (ROOT / "config.yaml").read_text().replace("train: {}", "train:\n  learning_rate: 2e-4")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=r"config.yaml: train.learning_rate: '2e-4' is not of type 'number'"):
        cfg.load_config(path)


def test_trigger_suite_runs_on_base_and_triggered_conditions_only(paper: dict[str, Any]) -> None:
    resolved = cfg.validate_config(paper)
    assert cfg.suites_for(resolved, "base") == ["em", "transfer", "trigger", "persona"]
    assert cfg.suites_for(resolved, "evil-medical-trig") == ["em", "transfer", "trigger", "persona"]
    assert cfg.suites_for(resolved, "evil-medical") == ["em", "transfer", "persona"]


def test_a_pasted_api_key_is_rejected_without_being_echoed(paper: dict[str, Any]) -> None:
    secret = "sk-" + "x1y2" * 8
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.validate_config(_break(paper, "judge.api_key_env", secret), source="c.yaml")
    assert "judge.api_key_env" in str(caught.value)
    assert secret not in str(caught.value)
