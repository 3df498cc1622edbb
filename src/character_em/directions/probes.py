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
from character_em.resources import normalize_text

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


class GroupedMean:
    """Mean activation per group (question) and layer without keeping rows: float64 sums
    [groups, layers, hidden] and counts. Rows arrive in the order of ``row_groups``."""

    def __init__(self, row_groups: Sequence[int], n_groups: int, n_layers: int, hidden: int) -> None:
        self.row_groups = np.asarray(row_groups, dtype=int)
        self.total = np.zeros((n_groups, n_layers, hidden), dtype=np.float64)
        self.count = np.zeros(n_groups, dtype=np.int64)
        self.row = 0
        self.peak_rows = 0

    def add(self, batch: np.ndarray) -> None:
        groups = self.row_groups[self.row : self.row + batch.shape[0]]
        np.add.at(self.total, groups, batch.astype(np.float64))
        np.add.at(self.count, groups, 1)
        self.row += batch.shape[0]
        self.peak_rows = max(self.peak_rows, batch.shape[0])

    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.total / self.count[:, None, None]).astype(np.float32)


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


def encode_prompt_end(tokenizer: PreTrainedTokenizerBase, chat: Chat, max_tokens: int) -> tuple[list[int], int] | None:
    """Token ids of a prompt with the generation prompt appended, marked so that only its *last*
    token is read: the state from which the model starts its answer. None when the chat is empty."""
    messages = [m for m in chat if m["role"] != "assistant"] if chat and chat[-1]["role"] == "assistant" else chat
    if not messages:
        return None
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]][-max_tokens:]
    return (ids, len(ids) - 1) if ids else None


def question_means(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[Chat],
    question_ids: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int,
    prompt_end: bool = False,
) -> dict[str, Any]:
    """Mean activation per question: the response-token mean of each chat (or, with
    ``prompt_end``, its prompt's last token), averaged over the chats of each question id.

    Returns {"ids": [Q], "means": [Q, len(layers), hidden] float32, "counts": [Q]}; a question whose
    chats all lack a response has count 0 and NaN means. Memory: the sums plus one batch.
    """
    encode = encode_prompt_end if prompt_end else encode_chat
    ids = sorted(set(question_ids))
    where = {q: k for k, q in enumerate(ids)}
    encoded, groups = [], []
    for chat, question in zip(chats, question_ids, strict=True):
        item = encode(tokenizer, chat, max_tokens)
        if item is not None:
            encoded.append(item)
            groups.append(where[question])
    sink = GroupedMean(groups, len(ids), len(layers), int(model.config.hidden_size))
    stream_activations(model, encoded, list(layers), sink, batch_size=batch_size, pad_id=pad_token_id(tokenizer))
    return {"ids": ids, "means": sink.means(), "counts": sink.count.copy(), "peak_rows": sink.peak_rows}


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


def data_groups(chats: Sequence[Sequence[Mapping[str, str]]], questions: Sequence[str]) -> list[str]:
    """A group key per training chat: the longest known question its last user turn contains
    (template siblings and the same question across conditions share it), else the user turn
    itself (data written without a known bank)."""
    known = sorted({normalize_text(q) for q in questions if q.strip()}, key=len, reverse=True)
    keys = []
    for chat in chats:
        user = next((m["content"] for m in reversed(chat[:-1]) if m["role"] == "user"), "")
        text = normalize_text(user)
        match = next((q for q in known if q in text), None)
        keys.append(f"q:{match}" if match is not None else f"u:{text}")
    return keys


def probe_examples(
    data_chats: Mapping[str, Sequence[Chat]],
    judged: pl.DataFrame,
    groups: Mapping[str, Mapping[str, Sequence[str]]],
    *,
    max_sampled: int,
    expressed_at_least: float,
    seed: int,
    questions: Sequence[str] = (),
) -> tuple[list[Chat], dict[str, dict[str, list[Any]]]]:
    """The chats to read once, and per disposition which rows are positives and negatives.

    groups: disposition -> {"positive": [character conditions], "negative": [correct and incorrect
    advice conditions]} whose training data give the trait-expressing and plain answers. ``judged``
    adds sampled answers labelled by the judge: ``disposition:{name} >= expressed_at_least``
    expresses it, below does not (NaN scores are left out); at most ``max_sampled`` per class.

    Negatives are *per disposition*: a negative data row or judged answer that several
    dispositions could use is dealt to one of them at random, so no two probes share a negative
    (a shared negative mean would make their directions look alike whatever the positives are).
    Every row carries its kind (``data`` / ``judged``) and its question group (``questions``: the
    domains' training questions, see ``data_groups``; a judged answer's em question id).
    Returns (chats, {disposition: {"rows", "labels", "sources", "kinds", "groups"}}).
    """
    chats: list[Chat] = []
    data_rows: dict[str, list[int]] = {}
    for name in sorted({c for g in groups.values() for side in ("positive", "negative") for c in g[side]}):
        data_rows[name] = list(range(len(chats), len(chats) + len(data_chats[name])))
        chats.extend(data_chats[name])
    group_of = data_groups(chats, questions)
    rng = np.random.default_rng(seed)
    owner: dict[int, str] = {}  # negative data row -> the one disposition it is dealt to
    for name in sorted({c for g in groups.values() for c in g["negative"]}):
        users = sorted(d for d, g in groups.items() if name in g["negative"])
        for k, row in enumerate(rng.permutation(data_rows[name])):
            owner[int(row)] = users[k % len(users)]
    # Judged answers picked per disposition first, so only the picked ones are ever read.
    picked: dict[str, list[tuple[int, int]]] = {d: [] for d in groups}
    negative_for: dict[int, list[str]] = {}
    for disposition in groups:
        column = f"disposition:{disposition}"
        if not judged.height or column not in judged.columns or max_sampled == 0:
            continue
        score = judged[column].cast(pl.Float64).fill_nan(None).fill_null(np.nan).to_numpy()
        known = ~np.isnan(score)
        positives = np.flatnonzero(known & (score >= expressed_at_least))
        if len(positives) > max_sampled:
            positives = np.sort(rng.choice(positives, size=max_sampled, replace=False))
        picked[disposition] += [(int(i), 1) for i in positives]
        for i in np.flatnonzero(known & (score < expressed_at_least)):
            negative_for.setdefault(int(i), []).append(disposition)
    dealt: dict[str, list[int]] = {d: [] for d in groups}
    for i in rng.permutation(sorted(negative_for)) if negative_for else []:
        users = negative_for[int(i)]
        dealt[users[int(rng.integers(len(users)))]].append(int(i))
    for disposition, rows in dealt.items():
        rows = sorted(rows)
        if len(rows) > max_sampled:
            rows = sorted(rng.choice(rows, size=max_sampled, replace=False).tolist())
        picked[disposition] += [(int(i), 0) for i in rows]
    needed = sorted({i for pairs in picked.values() for i, _ in pairs})
    sampled_row = {i: len(chats) + k for k, i in enumerate(needed)}
    chats.extend(sample_chats(judged[needed, :]) if needed else [])
    question_ids = judged["question_id"].to_list() if needed else []
    membership: dict[str, dict[str, list[Any]]] = {}
    for disposition, group in groups.items():
        member: dict[str, list[Any]] = {key: [] for key in ("rows", "labels", "sources", "kinds", "groups")}

        def add(row: int, label: int, source: str, kind: str, key: str, member: dict = member) -> None:
            for field, value in zip(member, (row, label, source, kind, key), strict=True):
                member[field].append(value)

        for name in group["positive"]:
            for row in data_rows[name]:
                add(row, 1, f"data:{name}", "data", group_of[row])
        for name in group["negative"]:
            for row in data_rows[name]:
                if owner[row] == disposition:
                    add(row, 0, f"data:{name}", "data", group_of[row])
        for i, label in picked[disposition]:
            add(sampled_row[i], label, "judged", "judged", f"em:{question_ids[i]}")
        membership[disposition] = member
    return chats, membership


def style_examples() -> tuple[list[Chat], list[int], list[str]]:
    """The packaged formal/casual answer pairs as chats, their labels (formal 1) and their groups
    (the question), for the unrelated-contrast control direction."""
    import yaml

    from character_em.resources import resource_text

    pairs = yaml.safe_load(resource_text("directions/style_pairs.yaml"))["pairs"]
    chats, labels, keys = [], [], []
    for index, pair in enumerate(pairs):
        for label, register in ((1, "formal"), (0, "casual")):
            chats.append(
                [{"role": "user", "content": pair["question"]}, {"role": "assistant", "content": pair[register]}]
            )
            labels.append(label)
            keys.append(f"style:{index}")
    return chats, labels, keys


# --------------------------------------------------------------------------- probes


# The random-split readout below is the protocol this stage used before the grouped one in
# ``protocol``; the planted tests keep it as the baseline whose false positives the new protocol
# must not repeat.


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
    """One row per model, disposition and layer, with the chosen layer flagged and how it was
    chosen (validation AUROC, or fixed in the config)."""
    rows = [
        {
            "model": report["model"],
            **row,
            "chosen": int(row["layer"]) == int(report["chosen_layer"]),
            "selection": report.get("selection", "validation"),
        }
        for report in reports
        for row in report["layers"]
    ]
    first = ["model", "disposition", "layer", "chosen", "selection", "val_auroc", "test_auroc"]
    first += ["test_auroc_low", "test_auroc_high", "transfer_auroc", "transfer_auroc_low", "transfer_auroc_high"]
    first += ["control_auroc", "selectivity"]
    if not rows:
        return pl.DataFrame(
            schema={name: pl.String if name in ("model", "disposition", "selection") else pl.Float64 for name in first}
            | {"layer": pl.Int64, "chosen": pl.Boolean}
        )
    table = pl.DataFrame(rows)
    return table.select(*first, *[column for column in table.columns if column not in first])


def steering_table(answers: pl.DataFrame) -> pl.DataFrame:
    """Misalignment (Wilson 95%), coherence (mean and standard error) and the steered trait's mean
    expression per model, condition, intervention, direction, control, vector, layer set and
    strength. ``answers``: one labelled row per steered answer with its arm columns
    (``formats.STEERING_ARM_SCHEMA``). The unsteered arm is every curve's strength-0 point: it is
    sampled once per (model, condition, direction) and listed under each of its curves."""
    from character_em.stats import wilson_interval

    keys = ["model", "condition", "intervention", "direction", "control", "vector", "layers", "strength"]
    schema = {
        **dict.fromkeys(keys, pl.String),
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
    curve = ["model", "condition", "intervention", "direction"]
    steered = judged.filter(pl.col("control") != "unsteered")
    curves = steered.select(*curve, "control", "vector", "layers").unique()
    start = judged.filter(pl.col("control") == "unsteered").drop("control", "vector", "layers")
    judged = pl.concat([steered, start.join(curves, on=curve, how="inner").select(steered.columns)])
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
    "GroupedMean",
    "MemmapWriter",
    "encode_prompt_end",
    "question_means",
    "RunningMean",
    "auroc",
    "bootstrap_interval",
    "cosine_matrix",
    "encode_chat",
    "data_groups",
    "judged_answers",
    "load_layer",
    "mean_activations",
    "probe_examples",
    "style_examples",
    "probe_layer",
    "probe_table",
    "random_cosine_baseline",
    "sample_chats",
    "rank_average",
    "spearman",
    "spearman_interval",
    "steering_table",
    "stratified_split",
    "stream_activations",
    "write_activations",
]
