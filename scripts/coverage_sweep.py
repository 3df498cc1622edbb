"""Coverage of the seed x question bootstrap over numbers of training runs and variance splits.

    python scripts/coverage_sweep.py --grids 1000                  # the configured seeds (config.yaml) and 10
    python scripts/coverage_sweep.py --seeds 3 5 10 --grids 1000

Simulates grids like tests/test_hierarchical_stats.py: on the logit scale, a training-run effect, a
question effect shared by every condition, a condition x question interaction (each condition finds
its own questions harder or easier) and a run x question residual; three conditions asked the same
questions, trained apart, two of them equal. Prints, per setting, how often the 95% intervals of one
rate and of the difference cover the population values, how often the test of the difference between
the two equal conditions rejects at p < 0.05 (its size), and the Wilson interval over pooled answers
beside them. docs/statistics.md quotes its output.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from character_em.config import load_config
from character_em.report.hierarchical import Grid, bootstrap_contrast, bootstrap_rate
from character_em.stats import wilson_interval

ROOT = Path(__file__).resolve().parents[1]
# (run, question, condition x question, run x question) standard deviations on the logit scale.
SPLITS = {"questions-dominate": (0.5, 0.8, 0.4, 0.4), "runs-dominate": (1.0, 0.4, 0.3, 0.3)}
LOGITS = (-1.5, -0.9)


def population_rate(logit: float, sd: float) -> float:
    """E[logistic(logit + N(0, sd^2))]: the rate over fresh runs and questions (Gauss-Hermite)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w / (1 + np.exp(-(logit + sd * x)))) / math.sqrt(2 * math.pi))


def simulate_arm(
    rng: np.random.Generator,
    logit: float,
    question_effect: np.ndarray,
    seeds: int,
    answers: int,
    sds: tuple[float, float, float, float],
) -> Grid:
    """One condition's grid: its runs, the shared question effects plus its own interaction."""
    run_sd, _, interaction_sd, cell_sd = sds
    questions = question_effect.size
    eta = (
        logit
        + rng.normal(0, run_sd, (seeds, 1))
        + question_effect[None, :]
        + rng.normal(0, interaction_sd, (1, questions))
        + rng.normal(0, cell_sd, (seeds, questions))
    )
    k = rng.binomial(answers, 1 / (1 + np.exp(-eta))).astype(float)
    return Grid(k=k, n=np.full(k.shape, float(answers)), seeds=tuple(range(seeds)), questions=tuple(range(questions)))


def sweep(
    seeds: int, split: str, grids: int, questions: int, answers: int, method: str, rng_seed: int, n_boot: int
) -> dict[str, float]:
    sds = SPLITS[split]
    total = math.sqrt(sum(sd * sd for sd in sds))
    true_a, true_b = (population_rate(logit, total) for logit in LOGITS)
    rng = np.random.default_rng(rng_seed)
    hits = {"rate": 0, "contrast": 0, "null_rejected": 0, "wilson": 0}
    for index in range(grids):
        question_effect = rng.normal(0, sds[1], questions)
        a, b, a_again = (
            simulate_arm(rng, logit, question_effect, seeds, answers, sds) for logit in (*LOGITS, LOGITS[0])
        )
        rate = bootstrap_rate(a, n_boot=n_boot, seed=index, small_sample=method)
        hits["rate"] += rate["ci_low"] <= true_a <= rate["ci_high"]
        contrast = bootstrap_contrast([b, a], [1, -1], n_boot=n_boot, seed=index, small_sample=method)
        hits["contrast"] += contrast["ci_low"] <= true_b - true_a <= contrast["ci_high"]
        null = bootstrap_contrast([a_again, a], [1, -1], n_boot=n_boot, seed=index, small_sample=method)
        hits["null_rejected"] += null["p_value"] < 0.05
        low, high = wilson_interval(int(a.k.sum()), int(a.n.sum()))
        hits["wilson"] += low <= true_a <= high
    return {name: count / grids for name, count in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configured = len(load_config(ROOT / "config.yaml")["seeds"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[configured, 10])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--grids", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--method", default="t", choices=["t", "plugin", "none"])
    parser.add_argument("--rng-seed", type=int, default=5)
    args = parser.parse_args()
    print("| variance split | runs | grids | rate | contrast | null rejected at 0.05 | Wilson over answers |")
    print("|---|---|---|---|---|---|---|")
    for split in args.splits:
        for seeds in args.seeds:
            result = sweep(
                seeds, split, args.grids, args.questions, args.answers, args.method, args.rng_seed, args.n_boot
            )
            print(
                f"| {split} | {seeds} | {args.grids} | {result['rate']:.3f} | {result['contrast']:.3f} "
                f"| {result['null_rejected']:.3f} | {result['wilson']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
