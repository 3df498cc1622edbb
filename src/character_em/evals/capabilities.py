"""General-capability check: zero-shot multiple choice scored by log-likelihood (MMLU-style).

The prompt is the question, the four lettered choices and ``Answer:``; the model's choice is the letter
whose continuation (" A", " B", " C", " D") has the highest log-likelihood, as lm-evaluation-harness
does for MMLU. No sampling and no answer parsing, so a fine-tuned model that chats differently is
still measured on what it knows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from character_em.files import iter_jsonl

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LETTERS = ("A", "B", "C", "D")


def load_mc_items(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file of items ``{"id", "question", "choices": [4 str], "answer": 0-3, "subject"}``.

    Validation errors name ``file:line``. Blank lines are skipped; ids must be unique.
    """
    p = Path(path)
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for where, obj in iter_jsonl(p):
        missing = [k for k in ("id", "question", "choices", "answer") if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        if not isinstance(obj["id"], str | int) or str(obj["id"]) == "":
            raise ValueError(f"{where}: 'id' must be a non-empty string or int")
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        choices = obj["choices"]
        if (
            not isinstance(choices, list)
            or len(choices) != 4
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise ValueError(f"{where}: 'choices' must be a list of 4 non-empty strings")
        ans = obj["answer"]
        if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans <= 3:
            raise ValueError(f"{where}: 'answer' must be an integer 0-3")
        subject = obj.get("subject", "general")
        if not isinstance(subject, str):
            raise ValueError(f"{where}: 'subject' must be a string")
        item_id = str(obj["id"])
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        items.append(
            {"id": item_id, "question": obj["question"], "choices": list(choices), "answer": ans, "subject": subject}
        )
    if not items:
        raise ValueError(f"{p}: no items")
    return items


def format_mc_prompt(item: dict[str, Any]) -> str:
    """Zero-shot context ending in ``Answer:``; the continuation supplies the leading space."""
    subject = str(item.get("subject", "general")).replace("_", " ")
    lines = [f"The following is a multiple choice question about {subject}.", "", item["question"].strip()]
    lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(LETTERS, item["choices"], strict=True)]
    lines.append("Answer:")
    return "\n".join(lines)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """BOS id when the tokenizer defines one (Llama), else nothing (Qwen has no BOS). Added by hand
    because we encode with ``add_special_tokens=False``: some tokenizers' post-processors also append
    EOS, which would corrupt the context/continuation split."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context (with BOS if any) and continuation, split at the token level.

    We tokenize the whole string and take the continuation as the tokens past the context's own
    encoding (lm-evaluation-harness's method), so the continuation is tokenized as the model saw such
    text in training. Trailing spaces of the context move into the continuation first. If the
    whole string's prefix does not reproduce the context's tokens (a merge across the boundary), we
    fall back to encoding the two parts separately, which is always a valid split.
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    prefix = _bos_prefix(tokenizer)
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    ctx = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return prefix + ctx, whole[len(ctx) :]
    cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
    return prefix + ctx, cont


def continuation_logliks(
    model: PreTrainedModel,
    pairs: list[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    pad_id: int,
) -> list[float]:
    """Sum of log-probabilities of each continuation given its context (right padding, one forward
    per batch). Returned in input order."""
    import torch

    device = next(model.parameters()).device
    out: list[float] = [math.nan] * len(pairs)
    # Longest first so memory peaks at the first batch (fails fast) and padding stays low.
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
                attn[r, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(chunk):
                ctx, cont = pairs[i]
                # Token at position t is predicted by the logits at t-1.
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                targets = torch.tensor(cont, dtype=torch.long)
                out[i] = float(logprobs[r, positions, targets].sum())
    return out


def next_token_logprobs(
    model: PreTrainedModel,
    contexts: list[list[int]],
    candidates: list[list[int]],
    *,
    batch_size: int,
    pad_id: int,
) -> list[list[float]]:
    """log p(candidate token | context) for each context's candidate ids: one forward pass per
    context, logits only at its last position. Left padding with explicit position ids, so a padded
    row computes what it would alone. Returned in input order."""
    import torch

    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in contexts]
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(contexts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, width - len(contexts[i]) :] = torch.tensor(contexts[i], dtype=torch.long)
                attn[r, width - len(contexts[i]) :] = 1
            positions = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = (
                model(
                    input_ids=ids.to(device),
                    attention_mask=attn.to(device),
                    position_ids=positions.to(device),
                    logits_to_keep=1,
                )
                .logits[:, -1, :]
                .float()
            )
            logprobs = torch.log_softmax(logits, dim=-1).cpu()
            for r, i in enumerate(chunk):
                out[i] = [float(logprobs[r, t]) for t in candidates[i]]
    return out


def evaluate_multiple_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_items: int | None = None,
) -> dict[str, Any]:
    """Zero-shot log-likelihood accuracy over ``items`` (first ``max_items`` if given).

    Returns {"accuracy", "n", "n_correct", "per_subject": {subject: accuracy}, "per_item": [{"id",
    "subject", "answer", "pred", "logliks": [4 floats], "correct"}]}. Ties go to the lowest letter.
    """
    if max_items is not None:
        items = items[:max_items]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Items whose four continuations are single tokens after one shared context (the usual case:
    # " A".." D" after "Answer:") need one forward pass, not four: the four log-likelihoods are
    # read off the same next-token distribution. lm-evaluation-harness does the same (it groups
    # one-token continuations by context). Other items score each continuation in full.
    shared: list[tuple[int, list[int], list[int]]] = []  # (item index, context, 4 letter ids)
    pairs: list[tuple[list[int], list[int]]] = []
    pair_owner: list[int] = []
    for k, item in enumerate(items):
        context = format_mc_prompt(item)
        encoded = [encode_pair(tokenizer, context, " " + letter) for letter in LETTERS]
        if any(not ctx for ctx, _ in encoded):
            raise ValueError(f"item {item['id']!r}: empty context after tokenization")
        if all(ctx == encoded[0][0] and len(cont) == 1 for ctx, cont in encoded):
            shared.append((k, encoded[0][0], [cont[0] for _, cont in encoded]))
        else:
            pairs.extend(encoded)
            pair_owner.extend([k] * 4)

    was_training = bool(getattr(model, "training", False))
    model.eval()
    lls: list[float] = [math.nan] * (4 * len(items))
    try:
        if shared:
            rows = next_token_logprobs(
                model,
                [ctx for _, ctx, _ in shared],
                [ids for _, _, ids in shared],
                batch_size=max(1, batch_size),
                pad_id=int(pad_id),
            )
            for (k, _, _), row in zip(shared, rows, strict=True):
                lls[4 * k : 4 * k + 4] = row
        if pairs:
            full = continuation_logliks(model, pairs, batch_size=max(1, batch_size * 4), pad_id=int(pad_id))
            for j in range(0, len(full), 4):
                k = pair_owner[j]
                lls[4 * k : 4 * k + 4] = full[j : j + 4]
    finally:
        if was_training:
            model.train()

    per_item: list[dict[str, Any]] = []
    for k, item in enumerate(items):
        scores = lls[4 * k : 4 * k + 4]
        pred = max(range(4), key=lambda j: (scores[j], -j))
        correct = pred == item["answer"]
        per_item.append(
            {
                "id": item["id"],
                "subject": item.get("subject", "general"),
                "answer": item["answer"],
                "pred": pred,
                "logliks": scores,
                "correct": correct,
            }
        )
    return summarize_items(per_item)


def summarize_items(per_item: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per subject from per-item rows ({"subject", "correct", ...}), whichever
    back-end scored them."""
    by_subject: dict[str, list[bool]] = {}
    for row in per_item:
        by_subject.setdefault(str(row.get("subject", "general")), []).append(bool(row["correct"]))
    n = len(per_item)
    n_correct = sum(1 for r in per_item if r["correct"])
    return {
        "accuracy": n_correct / n if n else math.nan,
        "n": n,
        "n_correct": n_correct,
        "per_subject": {s: sum(v) / len(v) for s, v in sorted(by_subject.items())},
        "per_item": per_item,
    }
