"""Coverage of the seed x question bootstrap over numbers of training runs and variance splits.

    python scripts/coverage_sweep.py --seeds 3 5 10 --grids 1000

Simulates grids like tests/test_hierarchical_stats.py (logit-normal run, question and cell effects;
two conditions asked the same questions, trained apart) and prints, per setting, how often the 95%
intervals of one rate and of the difference cover the population values, beside the Wilson interval
over pooled answers. docs/statistics.md quotes its output.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from character_em.report.hierarchical import Grid, bootstrap_contrast, bootstrap_rate
from character_em.stats import wilson_interval

SPLITS = {"questions-dominate": (0.5, 0.8, 0.4), "runs-dominate": (1.0, 0.4, 0.3)}
LOGITS = (-1.5, -0.9)


def population_rate(logit: float, sd: float) -> float:
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w / (1 + np.exp(-(logit + sd * x)))) / math.sqrt(2 * math.pi))


def sweep(
    seeds: int, split: str, grids: int, questions: int, answers: int, method: str, rng_seed: int
) -> dict[str, float]:
    run_sd, question_sd, cell_sd = SPLITS[split]
    total = math.sqrt(run_sd**2 + question_sd**2 + cell_sd**2)
    true_a, true_b = (population_rate(logit, total) for logit in LOGITS)
    rng = np.random.default_rng(rng_seed)
    hits = {"rate": 0, "contrast": 0, "wilson": 0}
    for index in range(grids):
        question_effect = rng.normal(0, question_sd, questions)
        arms = []
        for logit in LOGITS:
            eta = (
                logit + rng.normal(0, run_sd, (seeds, 1)) + question_effect + rng.normal(0, cell_sd, (seeds, questions))
            )
            k = rng.binomial(answers, 1 / (1 + np.exp(-eta))).astype(float)
            arms.append(
                Grid(
                    k=k,
                    n=np.full(k.shape, float(answers)),
                    seeds=tuple(range(seeds)),
                    questions=tuple(range(questions)),
                )
            )
        rate = bootstrap_rate(arms[0], n_boot=1000, seed=index, small_sample=method)
        hits["rate"] += rate["ci_low"] <= true_a <= rate["ci_high"]
        contrast = bootstrap_contrast([arms[1], arms[0]], [1, -1], n_boot=1000, seed=index, small_sample=method)
        hits["contrast"] += contrast["ci_low"] <= true_b - true_a <= contrast["ci_high"]
        low, high = wilson_interval(int(arms[0].k.sum()), int(arms[0].n.sum()))
        hits["wilson"] += low <= true_a <= high
    return {name: count / grids for name, count in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=list(SPLITS))
    parser.add_argument("--grids", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--answers", type=int, default=20)
    parser.add_argument("--method", default="t", choices=["t", "plugin", "none"])
    parser.add_argument("--rng-seed", type=int, default=5)
    args = parser.parse_args()
    print("| variance split | runs | grids | rate | contrast | Wilson over answers |")
    print("|---|---|---|---|---|---|")
    for split in args.splits:
        for seeds in args.seeds:
            result = sweep(seeds, split, args.grids, args.questions, args.answers, args.method, args.rng_seed)
            print(
                f"| {split} | {seeds} | {args.grids} | {result['rate']:.3f} | {result['contrast']:.3f} | {result['wilson']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
