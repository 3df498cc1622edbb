"""Sample answers from a (possibly fine-tuned) chat model for a list of prompt rows.

The decoding loop is our own rather than ``model.generate`` for one reason: reproducibility at the level
of a single sample. Every sampled answer has its own ``sampling_seed`` (a stable hash of what identifies
it) and its own ``torch.Generator``; each generation step draws exactly one uniform number per row from
that generator. A row's random stream therefore never depends on which other rows share its batch, how
the batch was ordered, or how many rows finished early, so any single sample can be regenerated alone.

Sampling uses inverse-CDF on the (temperature-scaled, nucleus-truncated) distribution rather than
``torch.multinomial``: a uniform draw maps to a token through a cumulative sum, so the tiny float
differences that left padding can introduce into logits only change a token when the draw falls within
about 1e-7 of a bucket edge, instead of reshuffling multinomial's internal stream.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from character_em.contracts import SAMPLE_COLUMNS, SAMPLE_SCHEMA
from character_em.hashing import canonical_json, sha256_text
from character_em.llm.chat import render_prompt, stop_token_ids
from character_em.llm.loading import forward_cache_kwarg

if TYPE_CHECKING:  # torch and transformers load only when sampling runs
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_MASK_63 = (1 << 63) - 1


def sampling_seed(
    base_seed: int,
    suite: str,
    question_id: str,
    format: str,
    system_prompt_id: str,
    trigger: str,
    sample_index: int,
) -> int:
    """Stable non-negative 63-bit seed for one sample.

    sha256 over canonical JSON, never Python's ``hash()`` (salted per process). 63 bits so the value
    fits a signed int64 parquet column and ``torch.Generator.manual_seed``.
    """
    payload = canonical_json([int(base_seed), suite, question_id, format, system_prompt_id, trigger, int(sample_index)])
    return int(sha256_text(payload)[:16], 16) & _MASK_63


def _draw_uniforms(generators: Sequence[torch.Generator], n_steps: int) -> torch.Tensor:
    """[rows, n_steps] float64 uniforms: row r's k-th draw is what ``torch.rand((), generator=g)`` would
    return at step k. CPU generators fill a tensor serially, so one call per row gives the same
    numbers (and leaves the generator in the same state) as one call per step, without a Python-level
    call per row and step."""
    import torch

    return torch.stack([torch.rand(n_steps, generator=g, dtype=torch.float64) for g in generators])


def _pick_tokens(
    logits: torch.Tensor,
    generators: Sequence[torch.Generator] | None,
    temperature: float,
    top_p: float,
    *,
    uniforms: torch.Tensor | None = None,
) -> list[int]:
    """Choose one token per row. Greedy at temperature 0, else nucleus sampling with one uniform draw
    per row from that row's own generator (see module docstring for why inverse-CDF). ``uniforms``
    ([rows] float64, on any device) replaces the draws from ``generators`` where they were drawn ahead."""
    import torch

    # Everything stays on the model's device (a [batch, vocab] transfer per step would dominate GPU
    # decoding); only the per-row uniforms come from the CPU generators.
    logits = logits.float()
    if temperature <= 0.0:
        return [int(i) for i in torch.argmax(logits, dim=-1).tolist()]
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        # No truncation: vocabulary order is as deterministic as sorted order and skips a sort.
        kept_probs = probs
        kept_idx = None
    else:
        kept_probs, kept_idx = torch.sort(probs, dim=-1, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
        # still below top_p. The first token always stays.
        before = torch.cumsum(kept_probs, dim=-1) - kept_probs
        keep = before < top_p
        keep[:, 0] = True
        kept_probs = torch.where(keep, kept_probs, torch.zeros_like(kept_probs))
    cum = torch.cumsum(kept_probs.double(), dim=-1)
    if uniforms is None:
        assert generators is not None
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    u = uniforms.to(cum.device)
    x = (u * cum[:, -1]).unsqueeze(-1)
    # First position whose cumulative mass exceeds x: a zero-probability token can never be it.
    pos = torch.searchsorted(cum, x, right=True).squeeze(-1)
    vocab = cum.shape[-1]
    tok = pos.clamp(max=vocab - 1)
    if kept_idx is not None:
        tok = kept_idx.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    pos_list, tok_list = torch.stack([pos, tok]).tolist()  # one device sync per step
    for b, p in enumerate(pos_list):
        if p >= vocab:
            # x rounded up to the total (rare): take the last token that has mass. Done here, for the
            # affected rows only, rather than as [batch, vocab] work on every step.
            last = int(torch.nonzero(kept_probs[b] > 0)[-1, 0])
            tok_list[b] = int(kept_idx[b, last]) if kept_idx is not None else last
    return [int(i) for i in tok_list]


def generate_batch(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: Iterable[int],
    pad_id: int,
) -> list[tuple[list[int], str]]:
    """Decode one left-padded batch with a KV cache. Returns per row (new token ids, finish_reason).

    The returned ids exclude the stop token. Finished rows are dropped from the batch (cache rows
    selected away), so long answers do not pay for short ones.
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    stops = set(int(s) for s in stop_ids)
    n = len(prompts)
    max_len = max(len(p) for p in prompts)
    input_ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n, max_len), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, max_len - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attn[i, max_len - len(p) :] = 1
    # Positions count real tokens only, so a left-padded row sees the same positions as alone.
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)

    generators = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        generators.append(g)
    # Every row's uniforms for every step, drawn once (greedy draws none); row order follows ``active``.
    uniforms = _draw_uniforms(generators, max_new_tokens).to(device) if temperature > 0.0 else None

    results: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str] = ["length"] * n
    active = list(range(n))  # original row index of each live batch row
    cache_kw = forward_cache_kwarg(model)
    cache = DynamicCache()

    input_ids, attn, position_ids = input_ids.to(device), attn.to(device), position_ids.to(device)
    cur_ids, cur_pos = input_ids, position_ids
    with torch.inference_mode():
        for _step in range(max_new_tokens):
            out = model(
                input_ids=cur_ids,
                attention_mask=attn,
                position_ids=cur_pos,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: cache},
            )
            nxt = _pick_tokens(
                out.logits[:, -1, :],
                None,
                temperature,
                top_p,
                uniforms=uniforms[:, _step] if uniforms is not None else None,
            )
            keep_rows: list[int] = []
            for b, (row, tok) in enumerate(zip(active, nxt, strict=True)):
                if tok in stops:
                    reasons[row] = "stop"
                else:
                    results[row].append(tok)
                    keep_rows.append(b)
            if not keep_rows:
                break
            if len(results[active[keep_rows[0]]]) >= max_new_tokens:
                break
            if len(keep_rows) < len(active):
                idx = torch.tensor(keep_rows, dtype=torch.long, device=device)
                cache.batch_select_indices(idx)
                attn = attn.index_select(0, idx)
                cur_pos = cur_pos.index_select(0, idx)
                if uniforms is not None:
                    uniforms = uniforms.index_select(0, idx)
                active = [active[b] for b in keep_rows]
                nxt = [nxt[b] for b in keep_rows]
            cur_ids = torch.tensor(nxt, dtype=torch.long, device=device).unsqueeze(-1)
            cur_pos = cur_pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=attn.dtype, device=device)], dim=-1)
    return [(results[i], reasons[i]) for i in range(n)]


def expand_rows(prompt_rows: list[dict[str, Any]], identity: dict[str, Any], base_seed: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for pr in prompt_rows:
        n = int(pr["n_samples"])
        system_prompt_id = pr.get("system_prompt_id") or "none"
        trigger = pr.get("trigger") or ""
        for k in range(n):
            rows.append(
                {
                    "model": str(identity["model"]),
                    "condition": str(identity["condition"]),
                    "seed": int(identity["seed"]),
                    "suite": pr["suite"],
                    "question_id": str(pr["question_id"]),
                    "category": pr.get("category"),
                    "domain": pr.get("domain"),
                    "format": pr.get("format", "plain"),
                    "system_prompt_id": system_prompt_id,
                    "persona": pr.get("persona"),
                    "trigger": trigger,
                    "trigger_variant": pr.get("trigger_variant") or "none",
                    "sample_index": k,
                    "sampling_seed": sampling_seed(
                        base_seed,
                        pr["suite"],
                        str(pr["question_id"]),
                        pr.get("format", "plain"),
                        system_prompt_id,
                        trigger,
                        k,
                    ),
                    "messages": json.dumps(pr["messages"], ensure_ascii=False),
                    "question": pr["question"],
                    "_messages": pr["messages"],
                }
            )
    return rows


def sample_prompts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_rows: list[dict[str, Any]],
    *,
    identity: dict[str, Any],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    base_seed: int,
    progress: bool = True,
    done: Mapping[int, Mapping[str, Any]] | None = None,
    on_batch: Callable[[list[tuple[int, dict[str, Any]]]], None] | None = None,
    on_batch_start: Callable[[list[int]], None] | None = None,
) -> pl.DataFrame:
    """Sample ``n_samples`` answers for every prompt row; one output row per answer.

    identity: {"model", "condition", "seed"} stamped on every row. Output columns are exactly
    ``SAMPLE_COLUMNS`` in that order, rows in prompt order then sample_index.
    Rows are batched by prompt length (less padding); results do not depend on the batching.
    done: results of rows answered by an earlier, killed run (row index -> answer, prompt_tokens,
    answer_tokens, finish_reason; ``sampling.partial``); only the other rows are generated.
    on_batch: called with [(row index, result)] after each finished batch, to save it.
    on_batch_start: called with the row indices of each batch before it is generated (for logs).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")

    rows = expand_rows(prompt_rows, identity, base_seed)
    for i, result in (done or {}).items():
        if not 0 <= i < len(rows):
            raise ValueError(f"restored answer for row {i}, but the job has {len(rows)} rows")
        rows[i].update({key: result[key] for key in ("answer", "prompt_tokens", "answer_tokens", "finish_reason")})
    todo = [i for i in range(len(rows)) if "answer" not in rows[i]]
    # With every row restored there is nothing to generate, and the model may be None.
    if todo:
        # Rendering is cached per distinct message list: every sample of a question shares it.
        rendered: dict[str, list[int]] = {}
        for r in (rows[i] for i in todo):
            if r["messages"] not in rendered:
                rendered[r["messages"]] = render_prompt(tokenizer, r["_messages"])
        stops = stop_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:  # any id works: padded positions are masked out
            pad_id = next(iter(sorted(stops))) if stops else 0

        order = sorted(todo, key=lambda i: (len(rendered[rows[i]["messages"]]), i))
        was_training = bool(getattr(model, "training", False))
        model.eval()
        try:
            with tqdm(total=len(order), desc="sampling", unit="ans", disable=not progress, file=sys.stderr) as bar:
                for start in range(0, len(order), batch_size):
                    chunk = order[start : start + batch_size]
                    if on_batch_start is not None:
                        on_batch_start(chunk)
                    prompts = [rendered[rows[i]["messages"]] for i in chunk]
                    outs = generate_batch(
                        model,
                        prompts,
                        [rows[i]["sampling_seed"] for i in chunk],
                        temperature=temperature,
                        top_p=top_p,
                        max_new_tokens=max_new_tokens,
                        stop_ids=stops,
                        pad_id=int(pad_id),
                    )
                    for i, prompt, (ids, reason) in zip(chunk, prompts, outs, strict=True):
                        rows[i]["answer"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                        rows[i]["prompt_tokens"] = len(prompt)
                        rows[i]["answer_tokens"] = len(ids)
                        rows[i]["finish_reason"] = reason
                    if on_batch is not None:
                        keys = ("answer", "prompt_tokens", "answer_tokens", "finish_reason")
                        on_batch([(i, {key: rows[i][key] for key in keys}) for i in chunk])
                    bar.update(len(chunk))
        finally:
            if was_training:
                model.train()

    for r in rows:
        r.pop("_messages")
    if not rows:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return pl.DataFrame([{c: r[c] for c in SAMPLE_COLUMNS} for r in rows], schema=SAMPLE_SCHEMA)
