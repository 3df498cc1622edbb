"""The claims table at the paper grid's size: planted effects of the size the literature reports must
reject after Holm over the headline family, and a grid without them must not.

The grid is config.yaml's: its models, conditions (with the severity-matched arm, which claim 1's
headline reads), seeds, suites' questions, formats and samples, MMLU's items and report.headline. Each
cell is simulated as counts (seeds x questions) straight into `claims_from_cells`, the function the
tables rule calls after counting the judged answers, so it runs in seconds. A fetched harmful-request
set that is not on disk yet is replaced by the packaged list, as the estimate does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from threadpoolctl import threadpool_limits

from character_em import config as cfg
from character_em.evals import suites
from character_em.evals.mmlu import MMLU_TASK_FILE, MMLU_TEST_ITEMS
from character_em.report import tables
from character_em.report.hierarchical import Grid

ROOT = Path(__file__).resolve().parents[1]
# The bootstrap's replicates estimate a standard error, not a tail count: a few hundred suffice, and a
# p-value of 1e-8 needs no more of them than one of 0.03.
N_BOOT = 300
RUN_SD, QUESTION_SD, INTERACTION_SD, MODEL_SHIFT = 0.35, 0.8, 0.3, 0.2  # logit scale

# Planted rates, from the reports the field has (docs/statistics.md): em misalignment of 20-40% for the
# strongest fine-tunes and lower for incorrect advice, persona jailbreaks at 76-81% attack success.
EFFECTS: dict[str, Any] = {
    "em": {"base": 0.01, "correct": 0.02, "incorrect": 0.10, "character": 0.30, "matched": 0.20, "triggered": 0.04},
    # (in-domain, out-of-domain) misalignment on the transfer suite
    "transfer": {
        "base": (0.01, 0.01),
        "correct": (0.02, 0.02),
        "incorrect": (0.25, 0.10),
        "character": (0.30, 0.25),
        "matched": (0.22, 0.18),
        "triggered": (0.05, 0.04),
    },
    "trigger": {
        "expressed": {"exact": 0.60, "untriggered": 0.05, "paraphrase": 0.25, "other_disposition": 0.10},
        "misaligned": {"exact": 0.25, "untriggered": 0.03, "paraphrase": 0.10, "other_disposition": 0.05},
    },
    # attack success: (neutral prompt, own persona prompt)
    "persona": {"base": (0.05, 0.12), "tuned": (0.10, 0.78)},
    "capability_shift": -0.015,  # probit scale: about half an MMLU point lost
}
NO_EFFECTS: dict[str, Any] = {
    "em": {family: 0.10 for family in EFFECTS["em"]},
    "transfer": {family: (0.25, 0.10) for family in EFFECTS["transfer"]},
    "trigger": {metric: dict.fromkeys(rates, 0.05) for metric, rates in EFFECTS["trigger"].items()},
    "persona": {"base": (0.05, 0.12), "tuned": (0.10, 0.17)},
    "capability_shift": -0.09,  # about 3 points lost: outside the 2-point margin, so not "preserved"
}


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """The bootstrap's matrix products are small (the 14,042 MMLU items by a few hundred replicates); on
    a busy CPU a second BLAS thread spin-waits for a core and makes each product ten times slower."""
    with threadpool_limits(1):
        yield


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    config = cfg.load_config(ROOT / "config.yaml", {"data": {"severity_matched": {"enabled": True}}})
    prompts = {}
    for suite in cfg.SAMPLED_SUITES:
        spec = cfg.suite_spec(config, suite)
        fetched = spec.get("harmful_requests_file")
        if suite == "persona" and fetched and not (ROOT / fetched).exists():
            spec = {**spec, "harmful_requests_file": None}
        prompts[suite] = suites.build_prompts(suite, spec)
    capabilities = config["eval"]["capabilities"]
    assert capabilities["task_file"] == MMLU_TASK_FILE
    items = MMLU_TEST_ITEMS if capabilities["max_items"] is None else capabilities["max_items"]
    return {
        "config": config,
        "conditions": {name: cfg.condition_info(config, name) for name in cfg.expand_conditions(config)},
        "prompts": prompts,
        "items": items,
    }


def _parts(paper: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    """Per suite, the questions of each part: em by format, transfer by evaluation domain, persona by
    system prompt; trigger questions by (variant, persona)."""
    parts: dict[str, dict[Any, list[str]]] = {}
    for suite, rows in paper["prompts"].items():
        for row in rows:
            part = {
                "em": row["format"],
                "transfer": row["domain"],
                "persona": row["system_prompt_id"],
                "trigger": (row["trigger_variant"], row["persona"]),
            }[suite]
            parts.setdefault(suite, {}).setdefault(part, []).append(row["question_id"])
    return parts


def _cell(
    rng: np.random.Generator,
    rate: float,
    runs: list[np.ndarray],
    questions: list[str],
    shared: dict[str, float],
    n: int,
    labels: tuple[str, ...],
) -> Grid:
    """A seed x question grid: the rate on the logit scale, each run's effect, the question effect every
    condition shares, this condition's own question effect, and n answers per (run, question)."""
    own = rng.normal(0, INTERACTION_SD, len(questions))
    question = np.array([shared[q] for q in questions]) + own
    eta = _logit(rate) + np.array(runs)[:, None] + question[None, :]
    k = rng.binomial(n, 1 / (1 + np.exp(-eta))).astype(float)
    return Grid(k=k, n=np.full(k.shape, float(n)), seeds=labels, questions=tuple(questions))


def _planted_cells(paper: dict[str, Any], effects: dict[str, Any], seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    config, conditions, parts = paper["config"], paper["conditions"], _parts(paper)
    samples = {suite: config["suites"][suite]["n_samples"] for suite in cfg.SAMPLED_SUITES}
    seeds = [str(s) for s in config["seeds"]]
    shared = {q: rng.normal(0, QUESTION_SD) for by_part in parts.values() for qs in by_part.values() for q in qs}
    cells: dict[tuple[str, ...], Grid] = {}
    capability: dict[tuple[str, str], Grid] = {}
    items = paper["items"]
    for index, model in enumerate(config["models"]):
        shift = MODEL_SHIFT * (1 if index % 2 else -1)
        thresholds = rng.normal(0.6, 1.0, items)  # probit: base answers about 68% of MMLU right
        latent = rng.normal(0, 1, items)
        for name, spec in conditions.items():
            family = spec["family"]
            labels = ("base",) if family == "base" else tuple(seeds)
            runs = [rng.normal(shift, RUN_SD) for _ in labels]

            def put(suite: str, part: str, flag: str, rate: float, questions: list[str], n: int) -> None:
                cells[(model, name, suite, part, flag)] = _cell(rng, rate, runs, questions, shared, n, labels)

            for fmt, questions in parts["em"].items():
                put("em", fmt, "misaligned", effects["em"][family], questions, samples["em"])
            inside, outside = effects["transfer"][family]
            for domain, questions in parts["transfer"].items():
                rate = inside if domain == spec["domain"] else outside
                put("transfer", domain, "misaligned", rate, questions, samples["transfer"])
            if family == "triggered":
                own = spec["disposition"]
                for (variant, persona), questions in parts["trigger"].items():
                    if variant == "none":
                        relation = "untriggered"
                    elif persona == own:
                        relation = "exact" if variant == "exact" else "paraphrase"
                    elif variant == "exact":
                        relation = "other_disposition"
                    else:
                        continue
                    if (model, name, "trigger", relation, "misaligned") in cells:
                        continue  # other_disposition pools the other dispositions under each question
                    n = samples["trigger"] * (len(config["dispositions"]) - 1 if relation == "other_disposition" else 1)
                    for metric, flag in (("expressed", f"expressed:{own}"), ("misaligned", "misaligned")):
                        put("trigger", relation, flag, effects["trigger"][metric][relation], questions, n)
            if family == "base" or spec["disposition"]:
                neutral, prompted = effects["persona"]["base" if family == "base" else "tuned"]
                dispositions = list(config["dispositions"]) if family == "base" else [spec["disposition"]]
                put("persona", "neutral", "attack_success", neutral, parts["persona"]["neutral"], samples["persona"])
                for disposition in dispositions:
                    prompt = f"persona-{disposition}"
                    put("persona", prompt, "attack_success", prompted, parts["persona"][prompt], samples["persona"])
            # Capabilities: each fine-tune answers as base where it is sure, its own way near the threshold.
            ids = tuple(f"mmlu{j}" for j in range(items))
            if family == "base":
                correct = (latent < thresholds)[None, :]
            else:
                own_runs = np.array([rng.normal(effects["capability_shift"], 0.01) for _ in labels])
                noise = 0.9 * latent[None, :] + math.sqrt(1 - 0.81) * rng.normal(0, 1, (len(labels), items))
                correct = noise < thresholds[None, :] + own_runs[:, None]
            capability[(model, name)] = Grid(
                k=correct.astype(float), n=np.ones(correct.shape), seeds=labels, questions=ids
            )
    return cells, capability


def _claims(paper: dict[str, Any], effects: dict[str, Any], seed: int) -> pl.DataFrame:
    cells, capability = _planted_cells(paper, effects, seed)
    config = paper["config"]
    return tables.claims_from_cells(
        cells,
        paper["conditions"],
        capability,
        headline=config["report"]["headline"],
        alpha=config["report"]["alpha"],
        equivalence_margin=config["eval"]["capabilities"]["equivalence_margin"],
        n_boot=N_BOOT,
        seed=config["report"]["bootstrap_seed"],
    )


def test_the_grid_is_the_papers(paper: dict[str, Any]) -> None:
    config = paper["config"]
    assert len(config["models"]) == 2 and len(config["seeds"]) == 3
    # 25 conditions, and the 9 severity-matched arms claim 1's headline reads.
    assert len(paper["conditions"]) == 25 + 9
    em = paper["prompts"]["em"]
    assert len(em) == len({row["question_id"] for row in em}) * len(config["suites"]["em"]["formats"])
    assert {row["n_samples"] for row in em} == {config["suites"]["em"]["n_samples"]}


def test_planted_effects_reject_after_holm_on_every_headline_row(paper: dict[str, Any]) -> None:
    claims = _claims(paper, EFFECTS, seed=1)
    entries = paper["config"]["report"]["headline"]
    assert claims.filter(pl.col("family") == "headline").height == len(entries) * len(paper["config"]["models"])
    # Claim 4's rows come from directions_report, not from judged answers: here they are listed, untested.
    four = claims.filter((pl.col("family") == "headline") & (pl.col("claim") == "4"))
    assert set(four["reading"]) <= {"not in this grid"}
    headline = claims.filter((pl.col("family") == "headline") & (pl.col("claim") != "4"))
    assert headline.height == sum(str(e["claim"]) != "4" for e in entries) * len(paper["config"]["models"])
    print(
        "\n"
        + headline.select("model", "contrast", "scope", "metric", "estimate", "p_value", "p_holm", "reading").__repr__()
    )
    assert headline["estimate"].is_not_null().all(), headline.filter(pl.col("estimate").is_null())
    assert (headline["p_holm"] < 0.05).all(), headline
    readings = set(headline["reading"])
    assert readings == {"a > b", f"preserved within ±{paper['config']['eval']['capabilities']['equivalence_margin']:g}"}
    # Far more rows than the family: a Holm over all of them would need p below 0.05 / that many.
    assert claims.height > 10 * headline.height
    assert claims.filter(pl.col("family") == "exploratory")["p_holm"].is_null().all()


def test_a_grid_without_the_effects_rejects_nothing(paper: dict[str, Any]) -> None:
    claims = _claims(paper, NO_EFFECTS, seed=2)
    headline = claims.filter((pl.col("family") == "headline") & (pl.col("claim") != "4"))
    print(
        "\n"
        + headline.select("model", "contrast", "scope", "metric", "estimate", "p_value", "p_holm", "reading").__repr__()
    )
    assert headline["estimate"].is_not_null().all()
    assert (headline["p_holm"] >= 0.05).all(), headline
    assert not set(headline["reading"]) & {"a > b", "a < b"} and "preserved" not in " ".join(headline["reading"])
