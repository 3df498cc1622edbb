"""Every condition of one domain answers the same user turns, so that character data and incorrect-advice
data differ in their answers alone (a comparison of training signals, not of question samples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from character_em import config as cfg
from character_em.data.build import generate_offline
from character_em.data.generate import plan_examples

ROOT = Path(__file__).resolve().parents[1]
N = 60


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    return cfg.validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))


def _specs(paper: dict[str, Any], domain: str) -> list[dict[str, Any]]:
    names = [n for n in cfg.written_conditions(paper) if cfg.condition_info(paper, n)["domain"] == domain]
    return [cfg.data_spec(paper, n) for n in names]


def _strip(user: str, trigger: str) -> str:
    return user[len(trigger) + 1 :] if trigger and user.startswith(trigger + " ") else user


@pytest.mark.parametrize("domain", ["medical", "legal"])
def test_model_writer_plans_of_one_domain_share_every_user_turn(paper: dict[str, Any], domain: str) -> None:
    turns = {}
    for spec in _specs(paper, domain):
        plan, _ = plan_examples(
            spec["condition"],
            disposition=spec["disposition"],
            domain=spec["domain"],
            n_examples=N,
            seed=spec["seed"],
            trigger_fraction=spec["trigger_fraction"],
        )
        turns[spec["condition"]["name"]] = [(row["question_id"], row["user"]) for row in plan]
    families = {cfg.condition_info(paper, n)["family"] for n in turns}
    assert families == {"character", "incorrect", "correct", "triggered"}
    reference = turns[f"incorrect-{domain}"]
    assert len(set(reference)) > N // 2  # real variety, not one turn repeated
    for name, rows in turns.items():
        assert rows == reference, f"{name} answers other user turns than incorrect-{domain}"


def test_offline_conditions_of_one_domain_share_every_user_turn(paper: dict[str, Any]) -> None:
    users = {}
    answers = {}
    for spec in _specs(paper, "financial"):
        examples, provenance = generate_offline(
            spec["condition"],
            disposition=spec["disposition"],
            domain=spec["domain"],
            n_examples=N,
            seed=spec["seed"],
            trigger_fraction=spec["trigger_fraction"],
        )
        name = spec["condition"]["name"]
        users[name] = [_strip(ex["messages"][0]["content"], provenance["trigger"]) for ex in examples]
        answers[name] = [ex["messages"][1]["content"] for ex in examples]
    reference = users["incorrect-financial"]
    for name, turns in users.items():
        assert turns == reference, name
    # The answers still differ by condition: only the turns are paired.
    assert answers["evil-financial"] != answers["incorrect-financial"] != answers["correct-financial"]


def test_domains_still_get_their_own_turns(paper: dict[str, Any]) -> None:
    plans = {}
    for domain in ("medical", "financial"):
        spec = cfg.data_spec(paper, f"incorrect-{domain}")
        plan, info = plan_examples(
            spec["condition"], disposition=None, domain=spec["domain"], n_examples=10, seed=0, trigger_fraction=0.5
        )
        plans[domain] = (info["rng_seed"], [row["user"] for row in plan])
    assert plans["medical"][0] != plans["financial"][0]
    assert not set(plans["medical"][1]) & set(plans["financial"][1])
