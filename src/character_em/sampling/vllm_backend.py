"""Optional ``vllm`` sampling back-end (config ``sampling.backend: vllm``), for GPU nodes.

UNTESTED ON CPU AND NOT RUN IN CI: vLLM is not installed where this project is developed and tested. Only
the parts that need no vLLM (request building, the conversion of vLLM's outputs into Samples rows, the
error when vLLM is missing) have unit tests (``tests/test_sample_vllm.py``), against a fake output built
to vLLM's documented ``RequestOutput`` / ``CompletionOutput`` shape. Install the ``vllm`` extra on a
GPU node and compare a few rows against the ``hf`` back-end before trusting it for a paper run.

What it does, and why:

- The LoRA adapter is served unmerged: ``LLM(enable_lora=True, max_lora_rank=...)`` and one
  ``LoRARequest(name, 1, adapter_dir)`` per job. vLLM batches LoRA matmuls itself; merging would need a
  merged copy of the weights on disk per condition.
- Prompts are rendered by ``character_em.llm.chat.render_prompt`` (the same chat template call as the
  ``hf`` back-end) and passed as token ids (``{"prompt_token_ids": [...]}``), so both back-ends see the
  same prompt tokens. vLLM's ``LLM.chat`` would render the template itself.
- One request per answer, ``SamplingParams(n=1, seed=sampling_seed)``: each answer has its own seeded
  random stream, as in the ``hf`` back-end, so a single row can be regenerated. The 50 requests of a
  question share their prompt through vLLM's prefix cache. ``n=50`` with one seed would give the
  samples one shared stream instead.
- Stop tokens are the same set as the ``hf`` back-end's (``stop_token_ids``); answers are decoded by our
  tokenizer with the same call, and token counts exclude the stop token.

What is NOT the same as ``hf``: vLLM draws its random numbers differently, so the same
``sampling_seed`` gives a different (equally valid) answer on the two back-ends. Rows regenerate
exactly only within one back-end, and within vLLM only as far as its kernels are batch-invariant
(vLLM does not promise bitwise equality across batch compositions). The back-end is therefore part
of the job's params: switching it reruns sampling. ``sampling.batch_size`` is not used: vLLM
schedules sequences and pages the KV cache itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import polars as pl

from character_em.contracts import SAMPLE_COLUMNS, SAMPLE_SCHEMA
from character_em.llm.chat import render_prompt, stop_token_ids
from character_em.sampling.hf import expand_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG_KEY = "sampling.backend"
# Ranks vLLM accepts for max_lora_rank (LoRAConfig.max_lora_rank); the adapter's r is rounded up.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def require_vllm() -> Any:
    """Import vLLM, or say which setting asked for it and what to do instead."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"config {CONFIG_KEY} is 'vllm', but the vllm package is not installed. Install the project's "
            "'vllm' extra on a GPU node (pip install 'character-em[vllm]'), or set "
            f"{CONFIG_KEY}: hf (the default)."
        ) from exc
    return vllm


def lora_rank(adapter_dir: str | Path) -> int:
    """The adapter's rank ``r`` (adapter_config.json), rounded up to a ``max_lora_rank`` vLLM accepts."""
    r = int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise ValueError(f"adapter {adapter_dir} has rank {r}; vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}")


def llm_kwargs(
    base_model: str,
    adapter_dir: str | Path | None,
    *,
    base_seed: int,
    max_model_len: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``. ``max_model_len`` bounds the KV cache per sequence (the
    longest prompt + max_new_tokens) instead of the model's full context, so more sequences fit."""
    kw: dict[str, Any] = {
        "model": str(base_model),
        "tokenizer": str(base_model),
        "dtype": "auto",
        "seed": int(base_seed),
        "max_model_len": int(max_model_len),
    }
    if adapter_dir is not None:
        kw.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(adapter_dir))
    kw.update(extra or {})
    return kw


def lora_request_args(adapter_dir: str | Path | None, name: str) -> tuple[str, int, str] | None:
    """Positional arguments of ``vllm.lora.request.LoRARequest(lora_name, lora_int_id, lora_path)``;
    None without an adapter (the base model answers)."""
    if adapter_dir is None:
        return None
    return (name, 1, str(Path(adapter_dir).resolve()))


def sampling_params_kwargs(
    *, temperature: float, top_p: float, max_new_tokens: int, seed: int, stop_ids: Sequence[int]
) -> dict[str, Any]:
    """Keyword arguments of one answer's ``vllm.SamplingParams``."""
    return {
        "n": 1,
        "temperature": float(temperature),  # 0 = greedy in vLLM, as in the hf back-end
        "top_p": float(top_p),
        "max_tokens": int(max_new_tokens),
        "seed": int(seed),
        "stop_token_ids": sorted(int(s) for s in stop_ids),
        "skip_special_tokens": True,
    }


def build_requests(
    tokenizer: Any,
    prompt_rows: list[dict[str, Any]],
    *,
    identity: dict[str, Any],
    base_seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(sample rows without answers, vLLM prompts, SamplingParams kwargs), one entry per answer, in the
    order of ``sample_prompts``' output: prompt order, then sample_index."""
    rows = expand_rows(prompt_rows, identity, base_seed)
    rendered: dict[str, list[int]] = {}
    prompts, params = [], []
    for r in rows:
        if r["messages"] not in rendered:
            rendered[r["messages"]] = render_prompt(tokenizer, r["_messages"])
        prompts.append({"prompt_token_ids": rendered[r["messages"]]})
        params.append(
            sampling_params_kwargs(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                seed=r["sampling_seed"],
                stop_ids=stop_ids,
            )
        )
    return rows, prompts, params


def rows_from_outputs(
    rows: list[dict[str, Any]],
    prompts: list[dict[str, Any]],
    outputs: Sequence[Any],
    tokenizer: Any,
    stop_ids: Sequence[int],
) -> pl.DataFrame:
    """Fill answers from vLLM ``RequestOutput`` objects (``LLM.generate`` returns them in input order)
    and return the Samples frame. Each output must have ``prompt_token_ids`` and ``outputs[0]`` with
    ``token_ids`` and ``finish_reason`` ("stop" or "length")."""
    if len(outputs) != len(rows):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(rows)} requests")
    stops = set(int(s) for s in stop_ids)
    done = []
    for row, prompt, out in zip(rows, prompts, outputs, strict=True):
        if list(out.prompt_token_ids) != list(prompt["prompt_token_ids"]):
            raise RuntimeError("vLLM output does not belong to its request (prompt tokens differ)")
        if len(out.outputs) != 1:
            raise RuntimeError(f"expected one completion per request (n=1), got {len(out.outputs)}")
        comp = out.outputs[0]
        ids = [int(t) for t in comp.token_ids]
        reason = comp.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request {getattr(out, 'request_id', '?')} ended with {reason!r}")
        # A stop token may or may not be among token_ids; the hf back-end never counts it.
        if reason == "stop" and ids and ids[-1] in stops:
            ids = ids[:-1]
        new = {k: v for k, v in row.items() if k != "_messages"}
        new.update(
            answer=tokenizer.decode(ids, skip_special_tokens=True).strip(),
            prompt_tokens=len(prompt["prompt_token_ids"]),
            answer_tokens=len(ids),
            finish_reason=reason,
        )
        done.append({c: new[c] for c in SAMPLE_COLUMNS})
    if not done:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    return pl.DataFrame(done, schema=SAMPLE_SCHEMA)


def _stop_ids_for(base_model: str, tokenizer: Any) -> set[int]:
    """The hf back-end's stop set, from the model folder's generation/config files (no weights loaded)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(base_model))
    except (OSError, ValueError):
        gen = None
    cfg = AutoConfig.from_pretrained(str(base_model))
    return stop_token_ids(SimpleNamespace(generation_config=gen, config=cfg), tokenizer)


def sample_prompts_vllm(
    base_model: str,
    adapter_dir: str | Path | None,
    prompt_rows: list[dict[str, Any]],
    *,
    identity: dict[str, Any],
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    base_seed: int,
    tokenizer: PreTrainedTokenizerBase | None = None,
    llm_extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """The vLLM counterpart of ``character_em.sampling.hf.sample_prompts`` (same columns, same row order).
    Untested on CPU: see the module docstring."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    vllm = require_vllm()
    from vllm.lora.request import LoRARequest

    from character_em.llm.loading import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(base_model)
    stops = _stop_ids_for(base_model, tok)
    rows, prompts, params = build_requests(
        tok,
        prompt_rows,
        identity=identity,
        base_seed=base_seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        stop_ids=stops,
    )
    if not rows:
        return pl.DataFrame(schema=SAMPLE_SCHEMA)
    longest = max(len(p["prompt_token_ids"]) for p in prompts)
    llm = vllm.LLM(
        **llm_kwargs(
            base_model, adapter_dir, base_seed=base_seed, max_model_len=longest + max_new_tokens, extra=llm_extra
        )
    )
    lora_args = lora_request_args(adapter_dir, f"{identity['condition']}-seed{identity['seed']}")
    outputs = llm.generate(
        prompts,
        [vllm.SamplingParams(**p) for p in params],
        use_tqdm=progress,
        lora_request=LoRARequest(*lora_args) if lora_args else None,
    )
    return rows_from_outputs(rows, prompts, outputs, tok, stops)
