"""Rates and contrasts with intervals that respect training seeds and questions.

An evaluation here is a grid: a few training runs (seeds) of each condition, each asked the same
questions, each question answered several times. Answers to one question share its prompt, and
answers of one run share its weights, so neither answers nor (seed, question) cells are independent.
The interval of a rate must carry three sources of variation: which training runs happened, which
questions were written, and which answers were sampled.

Estimator. A cell's rate is the mean over its seeds of the mean over its questions of the
per-question rate k/n. It estimates the population rate E_seed E_question P(flag): the chance that
a fresh training run, asked a fresh question, gives a flagged answer. Each question and each seed
weighs the same whatever number of its answers could be judged, so a question whose answers were
often truncated or unscorable does not lose weight to one whose answers all scored. With every
question answered the same number of times it equals the pooled rate over answers.

Bootstrap. One replicate draws the seeds with replacement, then one set of questions with
replacement, and applies that question set to every drawn seed; answers stay grouped under their
question (a cell is never split). The questions are crossed with the seeds, not nested in them:
question q is the same prompt for every run, so its difficulty is shared. Drawing questions afresh
inside each seed would average that shared difficulty away and understate the question component
(the coverage test in the tests shows it). Drawing one set per replicate is the crossed
("pigeonhole") bootstrap; it is mildly conservative, counting the seed x question interaction once
too often, which is the safe side.

Pairing. A contrast is a weighted sum of cell rates. All cells are asked the same questions with the
same sampling seeds, so every replicate uses one question draw for all of them. Seeds pair only
where the cells are the same trained model (trigger on vs off, persona vs neutral prompt on one
fine-tune): such cells share a `seed_group` and the same seed draw. Different conditions are
different training runs; their seeds are drawn independently.

Small numbers of seeds. A bootstrap over n units sees (n - 1) / n of their variance, so over 3
seeds it understates the spread whenever training runs differ. `small_sample="t"` (the default)
splits each replicate's deviation from the estimate into the part the question draw makes and the
part each model's seed draw adds, rescales each part by sqrt(n / (n - 1)) for its own units, and
refers the result to Student's t with Welch-Satterthwaite degrees of freedom pooled from those parts
(about 2 when the seeds of a 3-seed arm carry all the variance, many when 40 questions do).
docs/statistics.md gives the coverage measured in tests/test_hierarchical_stats.py and
scripts/coverage_sweep.py, and the number of seeds needed for nominal coverage.

Tests and intervals (studentized). The bootstrap gives a standard error, not the p-value: se is the
standard deviation of the corrected replicates, t = estimate / se, and the two-sided p-value is
2 P(T_df > |t|) with the Welch-Satterthwaite df above. Its resolution does not depend on the number
of replicates (a percentile p-value cannot go below 2 / (n_boot + 1), which no Holm family of a
grid's size can use). The interval is the one that inverts the same test, estimate +- t_df * se:
p < 1 - level exactly when the interval leaves out 0. `equivalence_test` turns the same estimate,
se and df into a two one-sided test (TOST) against a margin, with its 1 - 2 alpha interval.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

__all__ = [
    "Grid",
    "grid_from_answers",
    "grid_from_counts",
    "point_rate",
    "bootstrap_rate",
    "bootstrap_contrast",
    "bootstrap_statistic",
    "equivalence_test",
    "holm",
    "student_t_sf",
    "student_t_quantile",
]


@dataclass(frozen=True)
class Grid:
    """Flag counts of one cell: row i is training seed `seeds[i]`, column j is question `questions[j]`.

    `k[i, j]` answers of `n[i, j]` usable ones carry the flag; n = 0 marks a (seed, question) with
    no usable answer, which the estimator skips.
    """

    k: np.ndarray
    n: np.ndarray
    seeds: tuple[Hashable, ...]
    questions: tuple[Hashable, ...]

    def __post_init__(self) -> None:
        if self.k.shape != self.n.shape or self.k.shape != (len(self.seeds), len(self.questions)):
            raise ValueError(
                f"grid counts of shape {self.k.shape} / {self.n.shape} do not match {len(self.seeds)} seeds x {len(self.questions)} questions"
            )
        if np.any(self.k > self.n) or np.any(self.k < 0):
            raise ValueError("grid has a cell with more flagged answers than answers, or a negative count")

    def reindex(self, seeds: Sequence[Hashable] | None = None, questions: Sequence[Hashable] | None = None) -> Grid:
        """The same counts on other seed / question axes; labels absent here get n = 0."""
        seeds = tuple(self.seeds if seeds is None else seeds)
        questions = tuple(self.questions if questions is None else questions)
        if seeds == self.seeds and questions == self.questions:
            return self
        k = np.zeros((len(seeds), len(questions)))
        n = np.zeros((len(seeds), len(questions)))
        row = {s: i for i, s in enumerate(self.seeds)}
        col = {q: j for j, q in enumerate(self.questions)}
        rows = [(i, row[s]) for i, s in enumerate(seeds) if s in row]
        cols = [(j, col[q]) for j, q in enumerate(questions) if q in col]
        if rows and cols:
            new_rows, old_rows = map(list, zip(*rows, strict=True))
            new_cols, old_cols = map(list, zip(*cols, strict=True))
            k[np.ix_(new_rows, new_cols)] = self.k[np.ix_(old_rows, old_cols)]
            n[np.ix_(new_rows, new_cols)] = self.n[np.ix_(old_rows, old_cols)]
        return Grid(k=k, n=n, seeds=seeds, questions=questions)

    @property
    def n_answers(self) -> int:
        return int(self.n.sum())


def grid_from_answers(
    answers: pl.DataFrame,
    flag: str,
    *,
    seed: str = "seed",
    question: str = "question_id",
    questions: Sequence[Hashable] | None = None,
) -> Grid:
    """Count a boolean column per (seed, question) of a table holding one cell's usable answers.

    Null flags are left out. `question` may name a column whose values combine several keys (e.g. a
    struct or a joined string) when the unit that repeats across cells is finer than a question id.
    """
    for column in (seed, question, flag):
        if column not in answers.columns:
            raise KeyError(f"answers have no column {column!r} (have {answers.columns})")
    usable = answers.filter(pl.col(flag).is_not_null())
    counts = usable.group_by(seed, question).agg(k=pl.col(flag).cast(pl.Int64).sum(), n=pl.len())
    return grid_from_counts(counts, seed=seed, question=question, questions=questions)


def grid_from_counts(
    counts: pl.DataFrame,
    *,
    seed: str = "seed",
    question: str = "question_id",
    questions: Sequence[Hashable] | None = None,
) -> Grid:
    """A grid from one row per (seed, question) with its flagged answers `k` of `n` usable ones.

    Seeds and (unless `questions` fixes them) questions are sorted by label; a question outside
    `questions` is dropped.
    """
    seed_labels = tuple(sorted(counts[seed].unique().to_list(), key=str))
    question_labels = (
        tuple(questions) if questions is not None else tuple(sorted(counts[question].unique().to_list(), key=str))
    )
    row = {s: i for i, s in enumerate(seed_labels)}
    col = {q: j for j, q in enumerate(question_labels)}
    k = np.zeros((len(seed_labels), len(question_labels)))
    n = np.zeros((len(seed_labels), len(question_labels)))
    kept = [
        (row[s], col[q], k_sq, n_sq)
        for s, q, k_sq, n_sq in counts.select(seed, question, "k", "n").iter_rows()
        if q in col
    ]
    if kept:
        rows, cols, k_values, n_values = (np.asarray(values) for values in zip(*kept, strict=True))
        k[rows, cols] = k_values
        n[rows, cols] = n_values
    return Grid(k=k, n=n, seeds=seed_labels, questions=question_labels)


SMALL_SAMPLE = ("t", "plugin", "none")


@functools.lru_cache(maxsize=4096)
def student_t_quantile(probability: float, df: float) -> float:
    """Quantile of Student's t with df degrees of freedom, 0.5 < probability < 1: `student_t_sf`
    inverted by Newton's method from the normal quantile (the tail is convex there, so the steps
    approach the root from below and never overshoot), to about 1e-12."""
    if not 0.5 < probability < 1 or df <= 0:
        raise ValueError(f"t quantile needs 0.5 < probability < 1 and df > 0, got {probability}, {df}")
    if math.isinf(df):
        return _normal_quantile(probability)
    tail = 1 - probability
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = _normal_quantile(probability)
    for _ in range(200):
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))
        step = (student_t_sf(x, df) - tail) / density
        x += step
        if abs(step) < 1e-12 * max(1.0, x):
            break
    return x


def _standard_error(parts: list[tuple[int, np.ndarray]], method: str) -> tuple[float, float]:
    """The standard error of the statistic and the degrees of freedom of its t reference.

    Each part is a replicate deviation from resampling `units` independent units (questions; one
    group's seeds). A bootstrap over n units sees the plug-in variance, (n - 1) / n of the unbiased
    one: "plugin" and "t" scale each part by sqrt(n / (n - 1)). "t" refers t = estimate / se to
    Student's t with Welch-Satterthwaite degrees of freedom pooled from the parts' variances; "plugin"
    and "none" (the raw bootstrap spread) to the normal (df = inf). df is NaN when no part has more
    than one unit (one seed and one question: nothing could vary), inf when the parts do not vary.
    """
    if method not in SMALL_SAMPLE:
        raise ValueError(f"small_sample must be one of {SMALL_SAMPLE}, got {method!r}")
    if method != "none":
        parts = [(units, part * math.sqrt(units / (units - 1)) if units > 1 else part) for units, part in parts]
    total = np.sum([part for _, part in parts], axis=0)
    finite = total[np.isfinite(total)]
    se = float(np.std(finite)) if finite.size > 1 else math.nan
    variances = [(units, float(np.nanvar(part))) for units, part in parts if units > 1]
    if not variances:
        return se, math.nan
    denominator = sum(v * v / (units - 1) for units, v in variances)
    if denominator <= 0 or method != "t":
        return se, math.inf
    return se, sum(v for _, v in variances) ** 2 / denominator


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz).

    Accurate to relative 1e-14 where the fraction converges fast (x < (a + 1) / (a + b + 2)); the
    other side goes through I_x(a, b) = 1 - I_{1-x}(b, a). Small tails keep their relative accuracy,
    which a p-value of 1e-12 needs.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_sf(x: float, df: float) -> float:
    """P(T > x) for Student's t with df degrees of freedom (any df > 0, inf = the normal)."""
    if math.isnan(x) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(df):
        return 0.5 * math.erfc(x / math.sqrt(2))
    if math.isinf(x):
        return 0.0 if x > 0 else 1.0
    tail = 0.5 * _incomplete_beta(df / (df + x * x), df / 2, 0.5)
    return tail if x >= 0 else 1.0 - tail


def _t_quantile(probability: float, df: float) -> float:
    return _normal_quantile(probability) if math.isinf(df) else student_t_quantile(probability, df)


@functools.lru_cache(maxsize=16)
def _normal_quantile(probability: float) -> float:
    # Bisection on erf: exact enough, no scipy needed for one number.
    low, high = 0.0, 10.0
    for _ in range(100):
        mid = (low + high) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < probability:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def _cell_rates(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    usable = grid.n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(usable, grid.k / np.where(usable, grid.n, 1), 0.0)
    return rate, usable.astype(float)


def _seed_average(numerator: np.ndarray, denominator: np.ndarray, seed_weights: np.ndarray) -> np.ndarray:
    """Mean over weighted seeds of the per-seed mean over weighted questions.

    numerator and denominator are (S, B): each seed's weighted sum of per-question rates and of usable
    questions in each of B replicates; seed_weights is (B, S), how often each seed was drawn. A seed with
    no usable drawn question drops out of its replicate; a replicate with no usable seed is NaN.
    """
    seed_has_data = denominator > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        seed_means = np.where(seed_has_data, numerator / np.where(seed_has_data, denominator, 1), 0.0)
        weights = seed_weights * seed_has_data.T  # (B, S)
        total = weights.sum(axis=1)
        return np.where(total > 0, (weights * seed_means.T).sum(axis=1) / np.where(total > 0, total, 1), np.nan)


def point_rate(grid: Grid) -> float:
    """The estimator: mean over seeds of the mean over questions of k / n (NaN with no usable answer)."""
    rate, usable = _cell_rates(grid)
    return float(
        _seed_average(rate.sum(axis=1)[:, None], usable.sum(axis=1)[:, None], np.ones((1, len(grid.seeds))))[0]
    )


def _draw_counts(rng: np.random.Generator, size: int, n_boot: int) -> np.ndarray:
    """How often each of `size` units is drawn (with replacement, `size` draws) in each of n_boot replicates."""
    counts = np.zeros((n_boot, size))
    if size == 0:
        return counts
    chunk = max(1, 4_000_000 // size)  # bounds the index array; one bincount per chunk of replicates
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        drawn = rng.integers(0, size, size=(rows, size)) + (np.arange(rows) * size)[:, None]
        counts[start : start + rows] = np.bincount(drawn.ravel(), minlength=rows * size).reshape(rows, size)
    return counts


@functools.lru_cache(maxsize=2)
def _question_draw(seed: int, size: int, n_boot: int) -> np.ndarray:
    """The question draw of every statistic with this bootstrap seed and number of questions. It is the
    same draw for all of them, so it is made once: 2,000 draws of the 14,042 MMLU items take seconds."""
    counts = _draw_counts(np.random.default_rng([seed, 0]), size, n_boot)
    counts.setflags(write=False)
    return counts


def bootstrap_statistic(
    grids: Sequence[Grid],
    combine: Callable[[np.ndarray], np.ndarray],
    *,
    seed_groups: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    small_sample: str = "t",
) -> dict[str, float]:
    """A statistic of several cell rates with a crossed seed x question bootstrap.

    `combine` maps an array whose first axis is the grids' rates (shape (len(grids), ...)) to the
    statistic, elementwise over the other axes; e.g. rate 0 minus the larger of rates 1 and 2.
    All grids share one question draw per replicate (they are asked the same questions; a question
    missing from a grid counts there as unanswered). Grids with the same `seed_groups` entry are
    one trained model and share one seed draw, aligned by seed label; by default every grid is its
    own group (independent training runs).

    Returns the estimate, its bootstrap standard error `se` (after the small-sample corrections of
    `small_sample`), the degrees of freedom `df` of its t reference, the interval estimate +- t_df *
    se at `level`, the two-sided p-value of "the statistic is 0", 2 P(T_df > |estimate / se|), and
    the sizes behind them. The interval inverts the test: p < 1 - level exactly when it leaves out 0.
    With no variation at all (se = 0) the p-value is 1 for an estimate of 0 and 0 otherwise; with no
    unit that could vary (one seed and one question) there is no test (NaN).
    """
    if not grids:
        raise ValueError("a bootstrap statistic needs at least one grid")
    groups = list(range(len(grids))) if seed_groups is None else list(seed_groups)
    if len(groups) != len(grids):
        raise ValueError(f"need one seed group per grid, got {len(groups)} for {len(grids)} grids")
    if all(grid.questions == grids[0].questions for grid in grids):
        questions = list(grids[0].questions)
    else:
        questions = list(dict.fromkeys(q for grid in grids for q in grid.questions))
    group_seeds: dict[Hashable, list[Hashable]] = {}
    for grid, group in zip(grids, groups, strict=True):
        labels = group_seeds.setdefault(group, [])
        labels.extend(s for s in grid.seeds if s not in labels)
    aligned = [grid.reindex(group_seeds[group], questions) for grid, group in zip(grids, groups, strict=True)]

    question_draw = _question_draw(seed, len(questions), n_boot)
    rng = np.random.default_rng([seed, 1])
    seed_draw = {group: _draw_counts(rng, len(labels), n_boot) for group, labels in group_seeds.items()}
    # Every grid's seeds x questions in one stack, so the question draw is applied in two matrix products
    # (the full MMLU set is 14,042 items; one product per grid and weighting took most of the time).
    rates, usable = (np.vstack(stack) for stack in zip(*(_cell_rates(grid) for grid in aligned), strict=True))
    numerator, denominator = rates @ question_draw.T, usable @ question_draw.T  # (sum of seeds, B)
    point = np.zeros(len(grids))
    full = np.zeros((len(grids), n_boot))
    questions_only = np.zeros((len(grids), n_boot))
    start = 0
    for i, (grid, group) in enumerate(zip(aligned, groups, strict=True)):
        rows = slice(start, start + len(grid.seeds))
        start += len(grid.seeds)
        ones_s = np.ones((1, len(grid.seeds)))
        sums = rates[rows].sum(axis=1)[:, None], usable[rows].sum(axis=1)[:, None]
        point[i] = _seed_average(*sums, ones_s)[0]
        full[i] = _seed_average(numerator[rows], denominator[rows], seed_draw[group])
        questions_only[i] = _seed_average(numerator[rows], denominator[rows], np.ones((n_boot, len(grid.seeds))))
    estimate = float(np.asarray(combine(point[:, None]))[0])
    # A replicate's deviation from the estimate splits into the part the question draw makes and,
    # per seed group, the part that group's seed draw adds on top; each is scaled by its own
    # small-sample factor, since 3 seeds and 40 questions need very different corrections. For a
    # linear statistic the parts add up to the raw deviation exactly.
    question_part = combine(questions_only) - estimate
    parts = [(len(questions), question_part)]
    for group, labels in group_seeds.items():
        mixed = questions_only.copy()
        rows = [i for i, g in enumerate(groups) if g == group]
        mixed[rows] = full[rows]
        parts.append((len(labels), combine(mixed) - combine(questions_only)))
    se, df = _standard_error(parts, small_sample)
    if se < 1e-12 * max(1.0, abs(estimate)):
        se = 0.0  # parts that cancel exactly leave rounding noise, not a standard error
    low = high = p_value = math.nan
    if np.isfinite(estimate) and not math.isnan(df):
        if se > 0:
            half = _t_quantile(1 - (1 - level) / 2, df) * se
            low, high = estimate - half, estimate + half
            p_value = min(1.0, 2 * student_t_sf(abs(estimate) / se, df))
        elif se == 0:
            low = high = estimate
            p_value = 1.0 if estimate == 0 else 0.0
    return {
        "estimate": estimate,
        "se": se,
        "df": df,
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
        "n_seeds": sum(len(labels) for labels in group_seeds.values()),
        "n_questions": len(questions),
        "n_answers": sum(grid.n_answers for grid in grids),
        "n_boot": int(n_boot),
    }


def bootstrap_contrast(
    grids: Sequence[Grid],
    weights: Sequence[float],
    *,
    seed_groups: Sequence[Hashable] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    small_sample: str = "t",
) -> dict[str, float]:
    """sum_i weights[i] * rate(grids[i]): a difference, a difference in differences, a pooled contrast.

    See `bootstrap_statistic` for the draws, the interval and the p-value.
    """
    if len(grids) != len(weights) or not grids:
        raise ValueError(f"need one weight per grid, got {len(grids)} grids and {len(weights)} weights")
    weights_array = np.asarray(weights, dtype=float)
    return bootstrap_statistic(
        grids,
        lambda rates: np.tensordot(weights_array, rates, axes=1),
        seed_groups=seed_groups,
        n_boot=n_boot,
        seed=seed,
        level=level,
        small_sample=small_sample,
    )


def bootstrap_rate(
    grid: Grid, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95, small_sample: str = "t"
) -> dict[str, float]:
    """The rate of one cell with its crossed-bootstrap interval (no p-value), within [0, 1]: estimate
    +- t * se of a one- or two-seed cell can otherwise reach past the values a rate can take (clipping
    keeps every true rate the interval covered)."""
    result = bootstrap_contrast([grid], [1.0], n_boot=n_boot, seed=seed, level=level, small_sample=small_sample)
    return {
        "rate": result["estimate"],
        "ci_low": max(0.0, result["ci_low"]) if not np.isnan(result["ci_low"]) else result["ci_low"],
        "ci_high": min(1.0, result["ci_high"]) if not np.isnan(result["ci_high"]) else result["ci_high"],
        "n_seeds": result["n_seeds"],
        "n_questions": result["n_questions"],
        "n_answers": result["n_answers"],
        "n_boot": result["n_boot"],
    }


def equivalence_test(result: Mapping[str, float], margin: float, *, alpha: float = 0.05) -> dict[str, float]:
    """Two one-sided tests (TOST) of |statistic| < margin, from a `bootstrap_statistic` result.

    H0: statistic <= -margin or statistic >= margin. Each side is a one-sided t test on the result's
    estimate, se and df; the TOST p-value is the larger of the two, and it is below alpha exactly when
    the 1 - 2 alpha interval, estimate +- t_{1 - alpha, df} * se (a 90% interval at alpha 0.05, also
    returned), lies inside (-margin, margin). NaN where the result has no test.
    """
    if margin <= 0:
        raise ValueError(f"an equivalence margin must be positive, got {margin}")
    estimate, se, df = result["estimate"], result["se"], result["df"]
    low = high = p_value = math.nan
    if np.isfinite(estimate) and not math.isnan(df) and se > 0:
        half = _t_quantile(1 - alpha, df) * se
        low, high = estimate - half, estimate + half
        p_value = max(student_t_sf((estimate + margin) / se, df), student_t_sf((margin - estimate) / se, df))
    elif np.isfinite(estimate) and not math.isnan(df) and se == 0:
        low = high = estimate
        p_value = 0.0 if abs(estimate) < margin else 1.0
    return {"p_value": p_value, "ci_low": low, "ci_high": high, "level": 1 - 2 * alpha, "margin": margin}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment; NaN p-values stay NaN and do not count in the family size.

    Controls the family-wise error rate under any dependence between the tests, which the claims
    have (they share base models, questions and seeds).
    """
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = present.size
    if m == 0:
        return adjusted
    order = present[np.argsort(p[present], kind="stable")]
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adjusted[order] = np.minimum(1.0, stepped)
    return adjusted
