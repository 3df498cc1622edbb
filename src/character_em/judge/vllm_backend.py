"""The ``vllm`` judge back-end: the ``hf`` judge's exact expected score, computed by a vLLM engine.

The score is the ``hf`` judge's, term for term (``character_em.judge.hf_backend`` defines it): for every
candidate reply c ("0".."100", plus the metric's escapes) spelled as the tokenizer writes it after the
rendered prompt,

    log p(c) = sum_i log p(c_i | prompt, c_<i)  +  log sum_{e in E} p(e | prompt, c)

and the verdict comes from the same ``verdict_from_sequence_logprobs``. Only the arithmetic engine differs.

How vLLM computes it: one request per candidate, whose prompt is the judge prompt followed by the
candidate's tokens. ``prompt_logprobs=0`` returns the log-probability of each prompt token as it stands,
which gives the first sum; one generated step with ``logprob_token_ids=E`` returns the log-probability of
every end-of-turn token after the candidate, which gives the second term. Neither is a top-k list, so
nothing is cut off: a candidate outside the judge's top 20 still gets its probability.

Prefix caching: the 101+ requests of one judge prompt share the prompt, so all but the first read its
KV blocks from vLLM's prefix cache and compute only their last, partial block and the candidate. vLLM
skips cache reads for requests with prompt log-probabilities unless told otherwise, because prompt rows
inside cached blocks are never computed. We allow the reads and check ``num_cached_tokens`` of every
output: where the cache covered a row we need (a block that ends inside the candidate), that request is
sent again without cache reads. The result never depends on what the cache held.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from character_em.judge.hf_backend import (
    candidate_strings,
    continuation_ids,
    model_fingerprint,
    verdict_from_sequence_logprobs,
)
from character_em.judge.verdicts import DEFAULT_MIN_NUMERIC_MASS, JudgeRequest, JudgeResult, ResultCallback

log = logging.getLogger(__name__)

VLLM_JUDGE_VERSION = "vllm-exact-1"
SCORING = "exact-sequence"  # the same definition as the hf judge's


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "config judge.backend is 'vllm', but the vllm package is not installed in this environment. "
            "Run the judge where vLLM is installed (docs/vllm.md), or set judge.backend: hf."
        ) from exc
    return vllm


def terminator_ids(model_dir: str, tokenizer: Any) -> list[int]:
    """The ``hf`` judge's end-of-turn set (``llm.chat.stop_token_ids``), read from the model's config
    files without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    from character_em.llm.chat import stop_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except (OSError, ValueError):
        gen = None
    ids = sorted(
        stop_token_ids(SimpleNamespace(generation_config=gen, config=AutoConfig.from_pretrained(model_dir)), tokenizer)
    )
    if not ids:
        raise ValueError(f"judge model {model_dir}: no eos / end-of-turn token ids found")
    return ids


def candidate_logprob(output: Any, n_prompt: int, continuation: Sequence[int], terminators: Sequence[int]) -> float:
    """log P(continuation, then any terminator | prompt) from one vLLM ``RequestOutput`` whose prompt was
    prompt + continuation, requested with ``prompt_logprobs=0`` and ``logprob_token_ids=terminators``."""
    rows = output.prompt_logprobs
    total = 0.0
    for j, token in enumerate(continuation):
        entry = rows[n_prompt + j]
        if entry is None or token not in entry:
            raise RuntimeError(f"vLLM returned no prompt log-probability for position {n_prompt + j}")
        total += float(entry[token].logprob)
    step = output.outputs[0].logprobs
    if not step:
        raise RuntimeError("vLLM returned no log-probabilities for the step after the candidate")
    found = step[0]
    missing = [t for t in terminators if t not in found]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for terminator ids {missing}")
    lps = [float(found[t].logprob) for t in terminators]
    top = max(lps)
    return total + top + math.log(sum(math.exp(x - top) for x in lps))


@dataclass
class VLLMJudge:
    model: str  # a local folder or Hugging Face id that vLLM can load
    revision: str | None = None
    dtype: str = "auto"
    min_numeric_mass: float = DEFAULT_MIN_NUMERIC_MASS
    max_model_len: int = 4096
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "vllm"
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "candidates": 0, "resent_uncached": 0})
    _engine: Any = field(default=None, init=False, repr=False)
    _tokenizer: Any = field(default=None, init=False, repr=False)
    _terminators: list[int] = field(default_factory=list, init=False, repr=False)
    _fingerprint_value: str | None = field(default=None, init=False, repr=False)
    _cont_cache: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_config(cls, judge_cfg: dict[str, Any]) -> VLLMJudge:
        if not judge_cfg.get("model"):
            raise ValueError("judge.model: the vllm back-end needs a local model folder or a Hugging Face id")
        kwargs = {k: judge_cfg[k] for k in ("revision", "dtype", "min_numeric_mass") if judge_cfg.get(k) is not None}
        return cls(model=str(judge_cfg["model"]), **kwargs)

    @classmethod
    def from_engine(cls, engine: Any, model: str, **kwargs: Any) -> VLLMJudge:
        """A judge around an already started ``vllm.LLM`` for ``model`` (tests share one engine)."""
        judge = cls(model=model, **kwargs)
        judge._engine = engine
        return judge

    def effective_params(self) -> dict[str, Any]:
        # The same definition as the hf judge, but another engine's arithmetic: its own version and
        # back-end name keep its cache entries apart from the hf judge's.
        return {
            "version": VLLM_JUDGE_VERSION,
            "scoring": SCORING,
            "dtype": self.dtype,
            "min_numeric_mass": float(self.min_numeric_mass),
            "fingerprint": self._fingerprint(),
        }

    def _fingerprint(self) -> str | None:
        if self._fingerprint_value is None:
            self._fingerprint_value = model_fingerprint(self.model, self.revision) or ""
        return self._fingerprint_value or None

    def _load(self) -> tuple[Any, Any]:
        if self._engine is None:
            vllm = _require_vllm()
            from vllm.platforms import current_platform

            folder = Path(self.model)
            if folder.exists() and not (folder / "config.json").is_file():
                raise FileNotFoundError(f"judge.model {self.model}: no config.json, so vLLM cannot load it")
            on_gpu = bool(current_platform.is_cuda_alike())
            dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
            dtype = (
                ("bfloat16" if on_gpu else "float32") if self.dtype == "auto" else dtypes.get(self.dtype, self.dtype)
            )
            kwargs: dict[str, Any] = {
                "model": self.model,
                "revision": self.revision,
                "dtype": dtype,
                "max_model_len": self.max_model_len,
                "enable_prefix_caching": True,
                "seed": 0,
                **({"enforce_eager": True} if current_platform.is_cpu() else {}),
                **self.engine_kwargs,
            }
            try:
                self._engine = vllm.LLM(**kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"judge.model {self.model}: vLLM could not load it: {type(exc).__name__}: {exc}"
                ) from exc
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model, revision=self.revision)
            self._terminators = terminator_ids(self.model, self._tokenizer)
        return self._engine, self._tokenizer

    def _continuations(self, tokenizer: Any, metric: str, prompt_text: str, prompt_ids: list[int]) -> list[list[int]]:
        # As in the hf judge: a number's spelling depends only on the assistant header before it.
        key = (prompt_text[-64:], metric)
        if key not in self._cont_cache:
            self._cont_cache[key] = continuation_ids(tokenizer, prompt_text, prompt_ids, candidate_strings(metric))
        return self._cont_cache[key]

    def _params(self, *, read_cache: bool) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            logprob_token_ids=list(self._terminators),
            skip_reading_prefix_cache=not read_cache,
            detokenize=False,
        )

    def score_requests(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Score a group of requests with one ``generate`` call (every candidate of every request)."""
        engine, tok = self._load()
        plans = []
        prompts: list[dict[str, list[int]]] = []
        for r in requests:
            text = tok.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False)
            ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
            conts = self._continuations(tok, r.metric, text, ids)
            if len(ids) + max(len(c) for c in conts) + 1 > self.max_model_len:
                raise ValueError(
                    f"judge prompt of {len(ids)} tokens does not fit the vLLM judge's max_model_len {self.max_model_len}"
                )
            plans.append((r, ids, conts, len(prompts)))
            prompts.extend({"prompt_token_ids": ids + c} for c in conts)
        outputs = list(engine.generate(prompts, self._params(read_cache=True), use_tqdm=False))
        # A cached block that reaches into the candidate hides rows we need: send those again uncached.
        stale = []
        for _r, ids, conts, first in plans:
            for k in range(len(conts)):
                if int(outputs[first + k].num_cached_tokens or 0) > len(ids) - 1:
                    stale.append(first + k)
        if stale:
            again = engine.generate([prompts[i] for i in stale], self._params(read_cache=False), use_tqdm=False)
            for i, out in zip(stale, again, strict=True):
                outputs[i] = out
            self.stats["resent_uncached"] += len(stale)
        results = []
        for r, ids, conts, first in plans:
            logps = [candidate_logprob(outputs[first + k], len(ids), c, self._terminators) for k, c in enumerate(conts)]
            results.append(
                verdict_from_sequence_logprobs(
                    r.metric, candidate_strings(r.metric), logps, min_mass=self.min_numeric_mass
                )
            )
            self.stats["requests"] += 1
            self.stats["candidates"] += len(conts)
        return results

    def score_batch(
        self, requests: Sequence[JudgeRequest], on_result: ResultCallback | None = None, *, group: int = 8
    ) -> list[JudgeResult]:
        # Groups of a few prompts: large enough for vLLM to batch, small enough that a killed job keeps
        # (through on_result and the cache) nearly everything it judged.
        out: list[JudgeResult] = []
        for start in range(0, len(requests), group):
            for k, res in enumerate(self.score_requests(requests[start : start + group])):
                out.append(res)
                if on_result is not None:
                    on_result(start + k, res)
        return out
