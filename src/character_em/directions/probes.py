"""The character direction: activations read from disk-backed streams, probes with intervals,
projections of fine-tuned models, and the shared structure of directions from three sources.

Conventions:
- Layer ``i`` is the output of decoder block ``i`` (the residual stream after it), read with a
  forward hook (``character_em.directions.steering.layer_hook``): the place steering writes to.
- An activation is the mean over the *response* tokens of a chat (the last assistant turn as the
  chat template renders it), in float32.
- Activations never all sit in RAM: a forward batch is reduced to [batch, layers, hidden] inside the
  hooks and handed to a sink at once. ``MemmapWriter`` writes it into one ``.npy`` per layer (what the
  probes train on, loaded one layer at a time with ``mmap_mode="r"``); ``RunningMean`` keeps only a
  sum (what projections and difference directions need).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import polars as pl

from character_em.contracts import SAMPLE_KEY

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Chat = list[dict[str, str]]


# --------------------------------------------------------------------------- sinks


class ActivationSink(Protocol):
    peak_rows: int

    def add(self, batch: np.ndarray) -> None: ...


def read_chats(path: str | Path, limit: int) -> list[Chat]:
    """The first `limit` chats of a training-data JSONL file (its `messages` lists)."""
    chats: list[Chat] = []
    with open(path) as handle:
        for line in handle:
            if line.strip():
                chats.append(json.loads(line)["messages"])
            if len(chats) >= limit:
                break
    return chats


def layer_file(folder: str | Path, layer: int) -> Path:
    return Path(folder) / f"layer{layer:03d}.npy"


class MemmapWriter:
    """Rows [n_rows, hidden] per layer, written into ``layer{i:03d}.npy`` memmaps batch by batch.

    ``peak_rows`` is the largest batch ever held before it was written: the only activations in
    memory at any time (tests check it is bounded by the batch size).
    """

    def __init__(self, folder: str | Path, layers: Sequence[int], n_rows: int, hidden: int) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.layers = list(layers)
        self.n_rows = n_rows
        self.files = [
            np.lib.format.open_memmap(layer_file(folder, layer), mode="w+", dtype=np.float32, shape=(n_rows, hidden))
            for layer in self.layers
        ]
        self.row = 0
        self.peak_rows = 0

    def add(self, batch: np.ndarray) -> None:
        size = batch.shape[0]
        if self.row + size > self.n_rows:
            raise ValueError(f"writer holds {self.n_rows} rows; got {self.row + size}")
        for column, memmap in enumerate(self.files):
            memmap[self.row : self.row + size] = batch[:, column]
            memmap.flush()
        self.row += size
        self.peak_rows = max(self.peak_rows, size)

    def close(self) -> None:
        if self.row != self.n_rows:
            raise ValueError(f"writer expected {self.n_rows} rows, got {self.row}")
        for memmap in self.files:
            memmap.flush()
        self.files = []


class RunningMean:
    """Mean activation per layer without keeping rows: a float64 sum and a count."""

    def __init__(self, n_layers: int, hidden: int) -> None:
        self.total = np.zeros((n_layers, hidden), dtype=np.float64)
        self.count = 0
        self.peak_rows = 0

    def add(self, batch: np.ndarray) -> None:
        self.total += batch.astype(np.float64).sum(axis=0)
        self.count += batch.shape[0]
        self.peak_rows = max(self.peak_rows, batch.shape[0])

    def mean(self) -> np.ndarray:
        if self.count == 0:
            return np.full_like(self.total, np.nan, dtype=np.float32)
        return (self.total / self.count).astype(np.float32)


def load_layer(folder: str | Path, layer: int) -> np.ndarray:
    """One layer's rows, memory-mapped (read lazily from disk)."""
    return np.load(layer_file(folder, layer), mmap_mode="r")


# --------------------------------------------------------------------------- reading activations


def encode_chat(tokenizer: PreTrainedTokenizerBase, chat: Chat, max_tokens: int) -> tuple[list[int], int] | None:
    """Token ids of the whole chat and where the last assistant turn starts; None when the
    response is empty or truncated away. Rendered as text and tokenized without added specials,
    like ``llm.chat.render_prompt``, so prompts match what the sampler fed the model."""
    if not chat or chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip():
        return None
    prompt = tokenizer.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the full chat; cannot find the response tokens"
        )
    full_ids = full_ids[:max_tokens]
    if start >= len(full_ids):
        return None
    return [int(i) for i in full_ids], start


def check_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    n_layers = int(model.config.num_hidden_layers)
    chosen = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"probe layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    return chosen


def stream_activations(
    model: PreTrainedModel,
    encoded: Sequence[tuple[list[int], int]],
    layers: Sequence[int],
    sink: ActivationSink,
    *,
    batch_size: int,
    pad_id: int,
) -> None:
    """Forward ``encoded`` chats in batches and hand each batch's response-token means
    [batch, len(layers), hidden] to ``sink``. Right padding: causal attention never lets a real
    token see a pad after it, so padded rows give the same activations as unpadded ones."""
    import torch

    from character_em.directions.steering import layer_hook

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    was_training = bool(getattr(model, "training", False))
    model.eval()
    state: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            for column, layer in enumerate(layers):
                stack.enter_context(layer_hook(model, layer, _reducer(state, column)))
            for begin in range(0, len(encoded), batch_size):
                chunk = encoded[begin : begin + batch_size]
                width = max(len(ids) for ids, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                response = torch.zeros((len(chunk), width), dtype=torch.float32)
                for row, (ids, start) in enumerate(chunk):
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[row, : len(ids)] = 1
                    response[row, start : len(ids)] = 1.0
                state["mask"] = response.to(device)
                state["out"] = np.zeros((len(chunk), len(layers), model.config.hidden_size), dtype=np.float32)
                with torch.inference_mode():
                    model(
                        input_ids=input_ids.to(device),
                        attention_mask=attention.to(device),
                        use_cache=False,
                        logits_to_keep=1,
                    )
                sink.add(state.pop("out"))
    finally:
        if was_training:
            model.train()


def _reducer(state: dict[str, Any], column: int) -> Any:
    """A hook body that reduces the layer output to the response-token mean at once, so a batch's
    full [batch, tokens, hidden] states are never kept for more than one layer at a time."""

    def reduce(hidden: torch.Tensor) -> None:
        mask = state["mask"]
        summed = (hidden.float() * mask.unsqueeze(-1)).sum(dim=1)
        state["out"][:, column] = (summed / mask.sum(dim=1, keepdim=True)).cpu().numpy()
        return None

    return reduce


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def write_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    layers: Sequence[int] | None,
    folder: str | Path,
    *,
    batch_size: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Response-token mean activations of ``chats`` streamed to ``folder/layer{i:03d}.npy``.

    Returns {"layers", "kept" (indices of chats with a response), "peak_rows", "hidden"}; row j of
    every layer file is chat ``kept[j]``.
    """
    chosen = check_layers(model, layers)
    encoded, kept = [], []
    for index, chat in enumerate(chats):
        item = encode_chat(tokenizer, chat, max_tokens)
        if item is not None:
            encoded.append(item)
            kept.append(index)
    writer = MemmapWriter(folder, chosen, len(encoded), int(model.config.hidden_size))
    stream_activations(model, encoded, chosen, writer, batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    writer.close()
    info = {"layers": chosen, "kept": kept, "peak_rows": writer.peak_rows, "hidden": int(model.config.hidden_size)}
    (Path(folder) / "index.json").write_text(json.dumps(info))
    return info


def mean_activations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    layers: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int,
) -> tuple[np.ndarray, int]:
    """[len(layers), hidden] mean response activation over ``chats`` and how many had a response."""
    encoded = [item for item in (encode_chat(tokenizer, chat, max_tokens) for chat in chats) if item is not None]
    sink = RunningMean(len(layers), int(model.config.hidden_size))
    stream_activations(model, encoded, list(layers), sink, batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    return sink.mean(), sink.count


def sample_chats(samples: pl.DataFrame) -> list[Chat]:
    """Chats of a Samples frame: the prompt messages the model saw plus its answer."""
    return [
        [*json.loads(messages), {"role": "assistant", "content": answer or ""}]
        for messages, answer in zip(samples["messages"], samples["answer"], strict=True)
    ]


# --------------------------------------------------------------------------- probe examples


def judged_answers(samples: pl.DataFrame, scores: pl.DataFrame, dispositions: Sequence[str]) -> pl.DataFrame:
    """Sampled answers with one ``disposition:{name}`` score column per disposition."""
    wanted = [f"disposition:{name}" for name in dispositions]
    scored = scores.filter(pl.col("metric").is_in(wanted))
    if scored.is_empty():
        return samples.with_columns([pl.lit(None, pl.Float64).alias(name) for name in wanted])
    wide = scored.pivot(on="metric", index=list(SAMPLE_KEY), values="score", aggregate_function="first")
    for name in wanted:
        if name not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(name))
    return samples.join(wide.select(*SAMPLE_KEY, *wanted), on=list(SAMPLE_KEY), how="inner")


def probe_examples(
    data_chats: Mapping[str, Sequence[Chat]],
    judged: pl.DataFrame,
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    max_sampled: int,
    expressed_at_least: float,
    seed: int,
) -> tuple[list[Chat], dict[str, dict[str, list[Any]]]]:
    """The chats to read once, and per disposition which rows are positives and negatives.

    groups: disposition -> {"positive": [character conditions], "negative": [correct conditions]}
    whose training data give the trait-expressing and plain answers. ``judged`` adds sampled
    answers labelled by the judge: ``disposition:{name} >= expressed_at_least`` expresses it,
    below does not (NaN scores are left out); at most ``max_sampled`` per class, drawn at random.
    Returns (chats, {disposition: {"rows", "labels", "sources"}}), rows indexing ``chats``.
    """
    chats: list[Chat] = []
    data_rows: dict[str, list[int]] = {}
    for name in sorted({c for g in groups.values() for side in ("positive", "negative") for c in g[side]}):
        data_rows[name] = list(range(len(chats), len(chats) + len(data_chats[name])))
        chats.extend(data_chats[name])
    rng = np.random.default_rng(seed)
    # Judged answers picked per disposition first, so only the picked ones are ever read.
    picked: dict[str, list[tuple[int, int]]] = {}
    for disposition in groups:
        picked[disposition] = []
        column = f"disposition:{disposition}"
        if not judged.height or column not in judged.columns or max_sampled == 0:
            continue
        score = judged[column].cast(pl.Float64).fill_nan(None).fill_null(np.nan).to_numpy()
        known = ~np.isnan(score)
        for label, mask in ((1, known & (score >= expressed_at_least)), (0, known & (score < expressed_at_least))):
            indices = np.flatnonzero(mask)
            if len(indices) > max_sampled:
                indices = np.sort(rng.choice(indices, size=max_sampled, replace=False))
            picked[disposition] += [(int(i), label) for i in indices]
    needed = sorted({i for pairs in picked.values() for i, _ in pairs})
    sampled_row = {i: len(chats) + k for k, i in enumerate(needed)}
    chats.extend(sample_chats(judged[needed, :]) if needed else [])
    membership: dict[str, dict[str, list[Any]]] = {}
    for disposition, group in groups.items():
        rows: list[int] = []
        labels: list[int] = []
        sources: list[str] = []
        for label, side in ((1, "positive"), (0, "negative")):
            for name in group[side]:
                rows += data_rows[name]
                labels += [label] * len(data_rows[name])
                sources += [f"data:{name}"] * len(data_rows[name])
        for i, label in picked[disposition]:
            rows.append(sampled_row[i])
            labels.append(label)
            sources.append("judged")
        membership[disposition] = {"rows": rows, "labels": labels, "sources": sources}
    return chats, membership


# --------------------------------------------------------------------------- probes


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/test split; each class keeps at least one row on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        if len(members) < 2:
            raise ValueError(f"a held-out probe needs at least 2 examples of class {value}; got {len(members)}")
        n_test = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum identity (ties count one half)."""
    labels = np.asarray(labels).astype(bool)
    positives, negatives = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if len(positives) == 0 or len(negatives) == 0:
        return math.nan
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def bootstrap_interval(
    labels: np.ndarray, scores: np.ndarray, statistic: Any, *, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of ``statistic(labels, scores)`` over resamples drawn within each class
    (stratified), so every draw has both classes and the class balance of the test set."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    groups = [np.flatnonzero(labels == value) for value in (0, 1)]
    values = []
    for _ in range(n_boot):
        draw = np.concatenate([rng.choice(group, size=len(group), replace=True) for group in groups])
        values.append(statistic(labels[draw], np.asarray(scores)[draw]))
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2
    return float(np.quantile(finite, tail)), float(np.quantile(finite, 1 - tail))


def _accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def probe_layer(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Logistic-regression probe and mean-difference direction on one layer's rows.

    The probe (standardised features, L2 logistic regression) and the held-out direction are fitted
    on ``train`` and scored on ``test``; the returned direction is the mean difference over all rows
    (the one projections and steering use). Returns (metrics row, direction).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=int)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y[train])
    scores = probe.decision_function(x[test])
    predicted = (scores > 0).astype(int)
    held_out_direction = x[train][y[train] == 1].mean(axis=0) - x[train][y[train] == 0].mean(axis=0)
    projection = x[test] @ held_out_direction
    direction = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)
    acc_low, acc_high = bootstrap_interval(y[test], predicted, _accuracy, n_boot=n_boot, seed=seed)
    auc_low, auc_high = bootstrap_interval(y[test], scores, auroc, n_boot=n_boot, seed=seed + 1)
    dir_low, dir_high = bootstrap_interval(y[test], projection, auroc, n_boot=n_boot, seed=seed + 2)
    row = {
        "probe_accuracy": _accuracy(y[test], predicted),
        "probe_accuracy_low": acc_low,
        "probe_accuracy_high": acc_high,
        "probe_auroc": auroc(y[test], scores),
        "probe_auroc_low": auc_low,
        "probe_auroc_high": auc_high,
        "direction_auroc": auroc(y[test], projection),
        "direction_auroc_low": dir_low,
        "direction_auroc_high": dir_high,
        "direction_norm": float(np.linalg.norm(direction)),
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "n_positive": int(y.sum()),
        "n_negative": int(len(y) - y.sum()),
    }
    return row, direction.astype(np.float32)


def run_probes(
    folder: str | Path,
    layers: Sequence[int],
    kept: Sequence[int],
    membership: Mapping[str, Mapping[str, Sequence[Any]]],
    *,
    test_fraction: float,
    n_boot: int,
    seed: int,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Probe every disposition at every layer, one layer's memmap at a time.

    Returns (rows with disposition and layer, {disposition: [len(layers), hidden] directions}).
    Chats without a response (not in ``kept``) drop out of the membership here.
    """
    position = {chat: row for row, chat in enumerate(kept)}
    selections = {}
    for disposition, member in membership.items():
        pairs = [
            (position[r], label) for r, label in zip(member["rows"], member["labels"], strict=True) if r in position
        ]
        rows = np.array([p[0] for p in pairs], dtype=int)
        labels = np.array([p[1] for p in pairs], dtype=int)
        train, test = stratified_split(labels, test_fraction, seed)
        selections[disposition] = (rows, labels, train, test)
    results: list[dict[str, Any]] = []
    directions: dict[str, list[np.ndarray]] = {name: [] for name in membership}
    for layer in layers:
        matrix = load_layer(folder, layer)
        for disposition, (rows, labels, train, test) in selections.items():
            row, direction = probe_layer(np.asarray(matrix[rows]), labels, train, test, n_boot=n_boot, seed=seed)
            results.append({"disposition": disposition, "layer": int(layer), **row})
            directions[disposition].append(direction)
        del matrix
    return results, {name: np.stack(vectors) for name, vectors in directions.items()}


def choose_layer(rows: Sequence[Mapping[str, Any]], fixed: int | None) -> int:
    """The configured layer, or the one with the best held-out probe AUROC averaged over dispositions."""
    layers = sorted({int(row["layer"]) for row in rows})
    if fixed is not None:
        if fixed not in layers:
            raise ValueError(f"eval.probes.layer {fixed} is not among the probed layers {layers}")
        return int(fixed)
    means = {layer: np.nanmean([row["probe_auroc"] for row in rows if row["layer"] == layer]) for layer in layers}
    return max(layers, key=lambda layer: (means[layer], -layer))


# --------------------------------------------------------------------------- geometry


def unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return np.asarray(vector, dtype=np.float64) / norm if norm > 0 else np.full(np.shape(vector), np.nan)


def cosine_matrix(vectors: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    names = list(vectors)
    units = np.stack([unit(vectors[name]) for name in names]) if names else np.zeros((0, 0))
    return names, units @ units.T if names else np.zeros((0, 0))


def random_cosine_baseline(hidden: int, *, n_pairs: int, seed: int) -> dict[str, float]:
    """|cos| between independent random unit vectors in ``hidden`` dimensions: what unrelated
    directions look like (about sqrt(2 / (pi * hidden)) on average)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_pairs, hidden))
    b = rng.standard_normal((n_pairs, hidden))
    cos = np.abs((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return {
        "mean_abs_cos": float(cos.mean()),
        "p95_abs_cos": float(np.quantile(cos, 0.95)),
        "hidden": int(hidden),
        "n_pairs": int(n_pairs),
    }


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing their average rank."""
    values = np.asarray(values, dtype=float)
    sorter = np.argsort(values, kind="mergesort")
    inverse = np.empty_like(sorter)
    inverse[sorter] = np.arange(len(values))
    ordered = values[sorter]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    dense = first.cumsum()[inverse]
    bounds = np.r_[np.flatnonzero(first), len(values)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks; NaN when a side is constant."""
    rx, ry = rank_average(np.asarray(x)), rank_average(np.asarray(y))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(
    x: Sequence[float], y: Sequence[float], *, n_boot: int, seed: int, level: float = 0.95
) -> dict[str, float]:
    """Spearman's rho with a percentile interval from resampling the (x, y) pairs. Draws in which
    either side is constant have no rank correlation and are dropped."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    nan = {"rho": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": int(len(xs)), "n_boot": int(n_boot)}
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return nan
    rho = spearman(xs, ys)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        draw = rng.integers(0, len(xs), size=len(xs))
        if np.ptp(xs[draw]) == 0 or np.ptp(ys[draw]) == 0:
            continue
        values.append(spearman(xs[draw], ys[draw]))
    tail = (1 - level) / 2
    low, high = (
        (float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))) if values else (math.nan, math.nan)
    )
    return {"rho": rho, "ci_low": low, "ci_high": high, "n": int(len(xs)), "n_boot": int(n_boot)}


# --------------------------------------------------------------------------- tables


def probe_table(reports: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """One row per model, disposition and layer, with the chosen layer flagged."""
    rows = [
        {"model": report["model"], **row, "chosen": int(row["layer"]) == int(report["chosen_layer"])}
        for report in reports
        for row in report["layers"]
    ]
    if not rows:
        return pl.DataFrame(
            schema={
                "model": pl.String,
                "disposition": pl.String,
                "layer": pl.Int64,
                "chosen": pl.Boolean,
                "probe_auroc": pl.Float64,
            }
        )
    first = ["model", "disposition", "layer", "chosen", "probe_auroc", "probe_auroc_low", "probe_auroc_high"]
    table = pl.DataFrame(rows)
    return table.select(*first, *[column for column in table.columns if column not in first])


def projection_table(
    means: Sequence[Mapping[str, Any]],
    directions: Mapping[str, Mapping[str, np.ndarray]],
    misalignment: pl.DataFrame,
) -> pl.DataFrame:
    """Mean projection of every condition's own em activations onto each base direction, and the
    shift from the base model of the same model and seed.

    means: per (model, condition, seed) {"model", "condition", "seed", "family", "own": vector at the
    chosen layer, "n": answers}. directions: model -> disposition -> direction at the chosen layer.
    misalignment: model, condition, seed, rate (em suite).
    """
    base = {(m["model"], m["seed"]): m["own"] for m in means if m["condition"] == "base"}
    rows = []
    for m in means:
        for disposition, direction in directions.get(m["model"], {}).items():
            u = unit(direction)
            projection = float(np.asarray(m["own"], dtype=np.float64) @ u)
            reference = base.get((m["model"], m["seed"]))
            shift = (
                projection - float(np.asarray(reference, dtype=np.float64) @ u) if reference is not None else math.nan
            )
            rows.append(
                {
                    "model": m["model"],
                    "disposition": disposition,
                    "condition": m["condition"],
                    "family": m["family"],
                    "seed": int(m["seed"]),
                    "n": int(m["n"]),
                    "projection": projection,
                    "shift": shift,
                }
            )
    schema = {
        "model": pl.String,
        "disposition": pl.String,
        "condition": pl.String,
        "family": pl.String,
        "seed": pl.Int64,
        "n": pl.Int64,
        "projection": pl.Float64,
        "shift": pl.Float64,
    }
    table = pl.DataFrame(rows, schema=schema)
    rates = misalignment.select("model", "condition", pl.col("seed").cast(pl.Int64), misalignment_rate=pl.col("rate"))
    return table.join(rates, on=["model", "condition", "seed"], how="left").sort(
        "model", "disposition", "condition", "seed"
    )


def correlation_table(projections: pl.DataFrame, *, n_boot: int, seed: int) -> pl.DataFrame:
    """Spearman between projection shift and misalignment rate across fine-tuned conditions (and
    seeds), per model and disposition."""
    rows = []
    tuned = projections.filter(pl.col("condition") != "base")
    for (model, disposition), group in tuned.group_by("model", "disposition", maintain_order=True):
        result = spearman_interval(
            group["shift"].to_list(), group["misalignment_rate"].to_list(), n_boot=n_boot, seed=seed
        )
        rows.append({"model": model, "disposition": disposition, **result})
    schema = {
        "model": pl.String,
        "disposition": pl.String,
        "rho": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "n": pl.Int64,
        "n_boot": pl.Int64,
    }
    return pl.DataFrame(rows, schema=schema)


def cosine_table(
    vectors: Mapping[str, Mapping[str, np.ndarray]], baselines: Mapping[str, Mapping[str, float]]
) -> pl.DataFrame:
    """Long cosine matrix per model (row, column, cosine) with the random baseline of its size."""
    rows = []
    for model, named in vectors.items():
        names, matrix = cosine_matrix(named)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                rows.append(
                    {
                        "model": model,
                        "row": a,
                        "column": b,
                        "cosine": float(matrix[i, j]),
                        **{f"random_{k}": v for k, v in baselines[model].items() if k.endswith("cos")},
                    }
                )
    schema = {
        "model": pl.String,
        "row": pl.String,
        "column": pl.String,
        "cosine": pl.Float64,
        "random_mean_abs_cos": pl.Float64,
        "random_p95_abs_cos": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def steering_table(answers: pl.DataFrame) -> pl.DataFrame:
    """Misalignment (Wilson 95%) and coherence per model, condition, intervention, direction and strength."""
    from character_em.stats import wilson_interval

    keys = ["model", "condition", "intervention", "direction", "layer", "strength"]
    schema = {
        "model": pl.String,
        "condition": pl.String,
        "intervention": pl.String,
        "direction": pl.String,
        "layer": pl.Int64,
        "strength": pl.Float64,
        "n": pl.Int64,
        "k": pl.Int64,
        "rate": pl.Float64,
        "ci_low": pl.Float64,
        "ci_high": pl.Float64,
        "coherence": pl.Float64,
        "coherence_se": pl.Float64,
        "expression": pl.Float64,
    }
    if answers.is_empty():
        return pl.DataFrame(schema=schema)
    judged = answers.filter(pl.col("judged"))
    grouped = judged.group_by(keys).agg(
        n=pl.len(),
        k=pl.col("misaligned").cast(pl.Int64).sum(),
        coherence=pl.col("coherence").fill_nan(None).mean(),
        coherence_sd=pl.col("coherence").fill_nan(None).std(),
        expression=pl.col("direction_expression").cast(pl.Float64).fill_nan(None).mean(),
    )
    rows = []
    for row in grouped.iter_rows(named=True):
        low, high = wilson_interval(int(row["k"]), int(row["n"]))
        sd = row.pop("coherence_sd")
        se = sd / math.sqrt(row["n"]) if sd is not None and row["n"] > 0 else math.nan
        rows.append({**row, "rate": row["k"] / row["n"], "ci_low": low, "ci_high": high, "coherence_se": se})
    return pl.DataFrame(rows, schema=schema).sort(keys)


__all__ = [
    "MemmapWriter",
    "RunningMean",
    "auroc",
    "bootstrap_interval",
    "choose_layer",
    "correlation_table",
    "cosine_matrix",
    "cosine_table",
    "encode_chat",
    "judged_answers",
    "load_layer",
    "mean_activations",
    "probe_examples",
    "probe_layer",
    "probe_table",
    "projection_table",
    "random_cosine_baseline",
    "run_probes",
    "sample_chats",
    "rank_average",
    "spearman",
    "spearman_interval",
    "steering_table",
    "stratified_split",
    "stream_activations",
    "write_activations",
]
