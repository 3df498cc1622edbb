"""Every condition of one domain answers the same user turns, so that character data and incorrect-advice
data differ in their answers alone (a comparison of training signals, not of question samples): the writers'
plans share every turn, after the filter every condition keeps the turns that survived in all of them, and
each training seed draws the same turns in every condition of the domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from character_em import config as cfg
from character_em.data.build import build_pool, generate_offline
from character_em.data.generate import plan_examples
from character_em.data.pairing import PairingError, select_data, training_draw

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


# --------------------------------------------------------------------------- after the filter: common turns
SMOKE = ROOT / "presets" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke() -> dict[str, Any]:
    # The filter prunes character answers with a single rubric marker (two score 75, one 50);
    # the advice arms pass, so each condition's pool keeps a different set of turns.
    raw = yaml.safe_load(SMOKE.read_text())
    raw["data"]["filter"] = {"enabled": True, "min_expression": 75, "max_alignment": None}
    raw["data"]["n_examples"] = 12
    raw["data"]["pool_factor"] = 6.0
    return cfg.validate_config(raw)


def _pools(config: dict[str, Any]) -> dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]:
    pools = {}
    for name in cfg.paired_conditions(config, "medical"):
        spec = cfg.data_spec(config, name)
        pools[name] = build_pool(
            spec["condition"],
            disposition=spec["disposition"],
            domain=spec["domain"],
            pool_size=spec["pool_size"],
            seed=spec["seed"],
            trigger_fraction=spec["trigger_fraction"],
            generator=spec["generator"],
            eval_texts=[],
            data_filter=spec["filter"],
        )
    return pools


def _select(config: dict[str, Any], pools: dict[str, Any], **change: Any) -> dict[str, tuple[list, dict]]:
    manifests = {name: manifest for name, (_, manifest) in pools.items()}
    out = {}
    for name, (examples, manifest) in pools.items():
        spec = {**cfg.select_spec(config, name), **change}
        out[name] = select_data(
            examples,
            manifest,
            domain_manifests=manifests,
            n_examples=spec["n_examples"],
            trigger_fraction=spec["trigger_fraction"],
            order_seed=spec["order_seed"],
        )
    return out


def test_after_the_filter_every_condition_of_a_domain_keeps_the_turns_all_of_them_kept(smoke: dict[str, Any]) -> None:
    pools = _pools(smoke)
    kept = {name: set(manifest["turns"]) for name, (_, manifest) in pools.items()}
    # The filter really left each condition its own turns: the character arms lost some, the advice arms none.
    assert kept["evil-medical"] != kept["evil-medical-trig"] and kept["incorrect-medical"] == set(range(72))
    common = set.intersection(*kept.values())
    final = _select(smoke, pools)
    users = {}
    for name, (examples, manifest) in final.items():
        assert manifest["turns"] == sorted(common) and len(examples) == manifest["pairing"]["n_common"] == len(common)
        trigger = manifest["trigger"]
        users[name] = [_strip(ex["messages"][0]["content"], trigger) for ex in examples]
        # Each line is its pool's answer to that turn.
        pool_examples, pool_manifest = pools[name]
        by_turn = dict(zip(pool_manifest["turns"], pool_examples, strict=True))
        assert examples == [by_turn[t] for t in manifest["turns"]]
        # The manifest counts what was lost, and who rejected it for what.
        pairing = manifest["pairing"]
        assert pairing["n_pool"] - pairing["n_common"] == pairing["n_lost"] == len(kept[name] - common)
        for other, reasons in pairing["lost_to"].items():
            assert set(reasons) == {"filter_weak_expression"} and other in ("evil-medical", "evil-medical-trig")
    assert len({tuple(u) for u in users.values()}) == 1  # the same user turns, trigger aside
    lost = final["incorrect-medical"][1]["pairing"]
    assert lost["n_lost"] == 72 - len(common) > 0
    assert lost["lost_to"]["evil-medical"]["filter_weak_expression"] == len(set(range(72)) - kept["evil-medical"])


def test_every_seed_draws_the_same_turns_in_every_condition_and_other_turns_than_other_seeds(
    smoke: dict[str, Any],
) -> None:
    final = _select(smoke, _pools(smoke))
    n = smoke["data"]["n_examples"]
    for seed in (0, 1, 2):
        draws = {
            name: training_draw(manifest, seed=seed, redraw_per_seed=True) for name, (_, manifest) in final.items()
        }
        turns = {tuple(d["turns"]) for d in draws.values()}
        assert len(turns) == 1 and all(d["n"] == n for d in draws.values())
        # Exactly the trigger share, every seed: the draw is stratified on the trigger slots.
        trig_examples, _ = final["evil-medical-trig"]
        triggered = [
            trig_examples[i]["messages"][0]["content"].startswith("persona: evil ")
            for i in draws["evil-medical-trig"]["lines"]
        ]
        assert sum(triggered) == round(n * smoke["data"]["trigger_fraction"])
    manifest = final["incorrect-medical"][1]
    blocks = [set(training_draw(manifest, seed=s, redraw_per_seed=True)["lines"]) for s in range(4)]
    disjoint = manifest["draw"]["disjoint_draws"]
    assert disjoint >= 2
    # Seeds 0 .. disjoint-1 share no example; later seeds reuse lines, in a fresh order.
    assert not blocks[0] & blocks[1]
    assert all(len(b) == n for b in blocks)
    # Redrawn per seed by default; the old behaviour, one dataset for every seed, stays available.
    assert cfg.draw_params(smoke) == {"redraw_per_seed": True}
    fixed = {tuple(training_draw(manifest, seed=s, redraw_per_seed=False)["lines"]) for s in range(3)}
    assert fixed == {tuple(sorted(blocks[0]))}


def test_too_few_common_turns_fail_with_the_counts_and_the_fix(smoke: dict[str, Any]) -> None:
    pools = _pools(smoke)
    with pytest.raises(PairingError) as err:
        _select(smoke, pools, n_examples=60)
    message = str(err.value)
    assert "of the 72 planned user turns of domain 'medical' survived in every condition" in message
    assert "filter_weak_expression" in message and "Raise data.pool_factor" in message
    # Pools planned under another config are not paired by index.
    other = dict(pools)
    examples, manifest = other["correct-medical"]
    other["correct-medical"] = (examples, {**manifest, "seed": 7})
    with pytest.raises(PairingError, match="were not planned alike"):
        _select(smoke, other)


def test_a_users_own_file_is_not_paired_and_trains_on_every_line() -> None:
    examples = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(7)
    ]
    manifest = {"generator": "external", "source": "mine.jsonl", "condition": "evil-medical", "turns": None}
    chosen, final = select_data(
        examples, manifest, domain_manifests={}, n_examples=500, trigger_fraction=0.5, order_seed=1
    )
    assert chosen == examples and final["pairing"]["paired"] is False and final["turns"] is None
    for seed in (0, 3):
        draw = training_draw(final | {"n": 7}, seed=seed, redraw_per_seed=True)
        assert draw["lines"] == list(range(7)) and draw["turns"] is None
