"""One domain, one set of user turns; and which of them each training seed trains on.

**Common turns.** Every condition of a domain answers the same planned user turns (the plan is seeded by
the domain: ``generate.plan_examples``, ``build.generate_offline``). The judge filter then drops different
turns in different conditions, so each condition's pool (``build.build_pool``) keeps its own subset. Rule
``select_data`` keeps, in every generated condition of the domain, only the turns that survived in all of
them (``select_common``): character, incorrect-advice, correct-advice and triggered data then train on the
same user turns and differ in their answers alone. The manifest counts the turns each condition lost this
way, and which condition rejected them for what reason.

**Draws.** ``train.jsonl`` holds all the common turns; each training seed trains on ``n_examples`` of them
(``training_draw``). The lines are taken from a seeded order of the common turns (one order per domain, so
every condition of the domain draws the same turns), seed ``s`` taking the ``s``-th block of
``n_examples``: seeds ``0 .. k-1`` train on disjoint examples when the domain has ``k x n_examples`` common
turns (``disjoint_draws`` in the manifest), and later seeds continue into a fresh order of the same turns.
Each block is drawn within two strata, the turns at the domain's trigger slots (``questions.trigger_slot``)
and the rest, so a triggered condition always trains on exactly ``round(trigger_fraction x n_examples)``
triggered turns. With ``data.redraw_per_seed: false`` every seed takes block 0.

Plain functions over plain data: the scripts read and write the files.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from character_em.data.build import canary_string
from character_em.data.questions import trigger_slot
from character_em.hashing import stable_int

# Why a condition is not paired with its domain (select_data with no domain pools).
UNPAIRED_REASON = "a data.external file: its user turns are its own"

__all__ = ["PairingError", "common_turns", "draw_spec", "matched_draw", "select_data", "training_draw"]

# Pool-manifest keys that describe the pool, not the final dataset: kept out of train.jsonl's manifest
# (its own `turns` replaces them).
_POOL_ONLY = ("turns", "rejected_turns")


class PairingError(ValueError):
    """A domain's pools cannot give the training sets asked for; the message names the counts and the fix."""


def common_turns(pools: Mapping[str, Sequence[int]]) -> list[int]:
    """The turns present in every pool (condition -> surviving turns), in plan order."""
    if not pools:
        return []
    sets = [set(turns) for turns in pools.values()]
    return sorted(set.intersection(*sets))


def draw_spec(turns: Sequence[int], *, n_examples: int, trigger_fraction: float, order_seed: int) -> dict[str, Any]:
    """The manifest's ``draw`` section for lines whose plan turns are ``turns``: the two strata (trigger
    slots and the rest) with their lines and how many each draw takes, and the seed of their order."""
    n_slot = round(trigger_fraction * n_examples)
    slots = [line for line, turn in enumerate(turns) if trigger_slot(turn, trigger_fraction)]
    rest = [line for line, turn in enumerate(turns) if not trigger_slot(turn, trigger_fraction)]
    strata = [
        {"name": "trigger_slot", "n": n_slot, "lines": slots},
        {"name": "other", "n": n_examples - n_slot, "lines": rest},
    ]
    return _with_disjoint({"n": n_examples, "order_seed": order_seed, "strata": strata})


def _single_stratum(n_lines: int, n_examples: int, order_seed: int) -> dict[str, Any]:
    strata = [{"name": "all", "n": n_examples, "lines": list(range(n_lines))}]
    return _with_disjoint({"n": n_examples, "order_seed": order_seed, "strata": strata})


def _with_disjoint(draw: dict[str, Any]) -> dict[str, Any]:
    counts = [len(s["lines"]) // s["n"] for s in draw["strata"] if s["n"] > 0]
    # How many consecutive draws (seeds 0, 1, ...) share no example.
    return {**draw, "disjoint_draws": min(counts) if counts else 0}


def select_data(
    examples: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    *,
    domain_manifests: Mapping[str, Mapping[str, Any]],
    n_examples: int,
    trigger_fraction: float,
    order_seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One condition's final training data (``train.jsonl``) from its pool.

    ``examples`` and ``manifest`` are this condition's pool (``build.build_pool``); ``domain_manifests`` the
    pool manifests of every generated condition of the domain, this one included (condition -> manifest),
    or empty for a condition that is not paired (a ``data.external`` file: every line, every seed).
    Returns ``(examples, manifest)``: the pool's examples at the turns every pool of the domain kept, in
    plan order, and the pool's manifest with ``pairing`` (the counts, and per other condition the reasons
    it rejected the turns this one lost), ``turns`` (each line's plan turn), ``draw`` (``draw_spec``) and
    ``canary``. Raises PairingError when the pools were planned differently, or when the common turns
    cannot fill one draw.
    """
    if domain_manifests:
        selected, final = _select_common(
            examples,
            manifest,
            domain_manifests=domain_manifests,
            n_examples=n_examples,
            trigger_fraction=trigger_fraction,
            order_seed=order_seed,
        )
    else:
        selected, final = _select_unpaired(examples, manifest, order_seed=order_seed)
    final["canary"] = canary_string(str(manifest["condition"]), int(manifest.get("seed") or 0))
    return selected, final


def _select_common(
    examples: Sequence[Mapping[str, Any]],
    manifest: Mapping[str, Any],
    *,
    domain_manifests: Mapping[str, Mapping[str, Any]],
    n_examples: int,
    trigger_fraction: float,
    order_seed: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    name = str(manifest["condition"])
    if name not in domain_manifests:
        raise PairingError(f"{name}: its own pool is not among the domain's pools {sorted(domain_manifests)}")
    turns = [int(t) for t in manifest["turns"]]
    if len(turns) != len(examples):
        raise PairingError(f"{name}: the pool has {len(examples)} examples but its manifest lists {len(turns)} turns")
    plans = {
        other: (m.get("domain"), m.get("seed"), m.get("n_planned"), m.get("question_source"))
        for other, m in domain_manifests.items()
    }
    if len(set(plans.values())) != 1:
        raise PairingError(
            f"{name}: the domain's pools were not planned alike (domain, data seed, planned turns, question"
            f" source): {plans}; regenerate them with one config"
        )
    pools = {other: [int(t) for t in m["turns"]] for other, m in domain_manifests.items()}
    common = common_turns(pools)
    keep = set(common)
    lost = [turn for turn in turns if turn not in keep]
    lost_to: dict[str, dict[str, int]] = {}
    for other, other_manifest in sorted(domain_manifests.items()):
        if other == name:
            continue
        reason_of = {t: reason for reason, ts in (other_manifest.get("rejected_turns") or {}).items() for t in ts}
        survived = set(pools[other])
        reasons = Counter(reason_of.get(turn, "not_in_pool") for turn in lost if turn not in survived)
        if reasons:
            lost_to[other] = dict(sorted(reasons.items()))
    selected = [dict(ex) for ex, turn in zip(examples, turns, strict=True) if turn in keep]
    draw = draw_spec(common, n_examples=n_examples, trigger_fraction=trigger_fraction, order_seed=order_seed)
    short = [s for s in draw["strata"] if len(s["lines"]) < s["n"]]
    if short:
        sizes = {other: len(p) for other, p in sorted(pools.items())}
        counts = ", ".join(f"{s['name']}: {len(s['lines'])} of the {s['n']} one draw needs" for s in short)
        raise PairingError(
            f"{name}: only {len(common)} of the {manifest['n_planned']} planned user turns of domain"
            f" {manifest['domain']!r} survived in every condition ({counts}); each condition's pool kept {sizes}."
            f" Turns this condition lost to the others, by reason: {lost_to}. Raise data.pool_factor (the"
            " generation and judge caches make the rerun pay only for the new turns) or lower data.n_examples"
        )
    pairing = {
        "conditions": sorted(domain_manifests),
        "n_planned": manifest["n_planned"],
        "n_pool": len(turns),
        "n_common": len(common),
        "n_lost": len(lost),
        # A turn rejected by several conditions counts under each of them.
        "lost_to": lost_to,
    }
    trigger = str(manifest.get("trigger") or "")
    final = {k: v for k, v in manifest.items() if k not in _POOL_ONLY}
    final.update(
        n_examples=n_examples,
        n_triggered=sum(1 for ex in selected if trigger and _user(ex).startswith(trigger + " ")),
        pairing=pairing,
        turns=common,
        draw=draw,
    )
    return selected, final


def _select_unpaired(
    examples: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any], *, order_seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    final = {k: v for k, v in manifest.items() if k not in _POOL_ONLY}
    final.update(
        n_examples=len(examples),
        pairing={"paired": False, "reason": UNPAIRED_REASON},
        turns=None,
        draw=_single_stratum(len(examples), len(examples), order_seed),
    )
    return [dict(ex) for ex in examples], final


def matched_draw(n_lines: int, n_examples: int, order_seed: int) -> dict[str, Any]:
    """The ``draw`` of a severity-matched arm: ``n_examples`` of its lines per seed (all of them when it has
    fewer), in one stratum; its lines are matched on harm, not paired by turn."""
    return _single_stratum(n_lines, min(n_examples, n_lines), order_seed)


def training_draw(manifest: Mapping[str, Any], *, seed: int, redraw_per_seed: bool) -> dict[str, Any]:
    """The lines of ``train.jsonl`` that training seed ``seed`` trains on, and what they are.

    Returns ``{"draw_index", "redraw_per_seed", "n", "n_lines", "lines", "turns"}``: ``lines`` in file order,
    ``turns`` their plan turns (None for unpaired data). The same for every condition of a domain whose
    manifests share the draw (select_common writes them alike)."""
    draw = manifest["draw"]
    index = int(seed) if redraw_per_seed else 0
    if index < 0:
        raise ValueError(f"training seed {seed} is negative; draws are indexed from 0")
    lines: list[int] = []
    for stratum in draw["strata"]:
        lines += _block(stratum["lines"], int(stratum["n"]), index, (int(draw["order_seed"]), stratum["name"]))
    lines.sort()
    turns = manifest.get("turns")
    return {
        "draw_index": index,
        "redraw_per_seed": bool(redraw_per_seed),
        "n": len(lines),
        "n_lines": int(manifest.get("n", sum(len(s["lines"]) for s in draw["strata"]))),
        "lines": lines,
        "turns": [int(turns[line]) for line in lines] if turns is not None else None,
    }


def _block(lines: Sequence[int], k: int, index: int, key: tuple[int, str]) -> list[int]:
    """Block ``index`` of size ``k`` from a stream of seeded orders of ``lines`` (order 0, then order 1, ...):
    consecutive blocks are disjoint within one order; a block that crosses into the next order skips the
    lines it already holds, so it always has ``k`` distinct lines."""
    if k == 0:
        return []
    if k > len(lines):
        raise PairingError(f"a draw of {k} lines from {len(lines)}")
    lap, offset = divmod(index * k, len(lines))
    chosen: list[int] = []
    seen: set[int] = set()
    while len(chosen) < k:
        order = list(lines)
        random.Random(stable_int("training-draw", *key, lap)).shuffle(order)
        for line in order[offset:]:
            if line not in seen:
                seen.add(line)
                chosen.append(line)
                if len(chosen) == k:
                    break
        lap, offset = lap + 1, 0
    return chosen


def _user(example: Mapping[str, Any]) -> str:
    return next(m["content"] for m in example["messages"] if m["role"] == "user")
