"""The ``vllm`` judge back-end: the ``hf`` judge's scores, computed by one vLLM engine per judge job.

Two ways to score, both the ``hf`` judge's definitions term for term (``character_em.judge.hf_backend``),
chosen by ``judge.scoring`` (``auto``: first-token where the judge's tokenizer allows it, else exact):

**First-token** (a tokenizer that spells 0..100 as single tokens after the assistant header, as Llama 3's
does): a verdict is ONE request, the judge prompt, with ``max_tokens=1`` and ``logprob_token_ids`` set to
the 101 number tokens and the escapes' first tokens. vLLM returns their log-probabilities at the reply's
first position; nothing is read from a top-k list, so no number is cut off. No prompt log-probabilities
are asked for, so every request may read vLLM's prefix cache freely.

**Exact** (a tokenizer that splits digits, and the audit of first-token verdicts): for every candidate
reply c ("0".."100", plus the escapes) spelled as the tokenizer writes it after the prompt,

    log p(c) = sum_i log p(c_i | prompt, c_<i)  +  log sum_{e in E} p(e | prompt, c)

Every factor is a next-token probability after a prefix of the prompt + c, and the candidates share their
prefixes ("1", "10", "100"), so the prefixes form a tree (as the hf judge's ``CandidateTree``). Each node
is ONE request, prompt + the node's tokens, with ``max_tokens=1`` and ``logprob_token_ids`` = the tokens
that follow it in some candidate, plus the end-of-turn set E where a candidate ends there. About 105
requests a verdict, each of which prefills only its last tokens (the rest comes from the prefix cache),
and no request asks for prompt log-probabilities, whose rows vLLM would skip inside cached blocks.

The engine. ``judge.core.score_wave`` sends a whole wave (every answer of one model and seed) through one
judge object: the engine starts on the first request that the judge cache does not answer (never, on a
finished wave), and serves every later one. Requests arrive answer-major (all metrics of one answer
together), and the judge templates put the metric's instruction after the answer, so the metrics of an
answer share its prefill through the prefix cache. Each ``generate`` call carries ``requests_per_call``
requests (thousands), so vLLM keeps its batch full, and its verdicts reach the caller's callback (and the
judge cache) when the call returns: a killed job loses at most one call's work.

Quantization (``judge.quantization``): ``fp8`` quantizes the weights when the engine loads them (vLLM's
``quantization="fp8"``; GPUs with FP8, H100/H200), which puts a 70B judge on one GPU. ``none`` loads the
folder as it is, which is also how a pre-quantized checkpoint (its own ``quantization_config``) is loaded:
pin it with ``judge.revision``. vLLM does not load bitsandbytes NF4 here: ``nf4`` is refused at once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from character_em.job_settings import judge_quantization_problem
from character_em.judge.hf_backend import (
    FirstTokenPlan,
    candidate_strings,
    continuation_ids,
    model_fingerprint,
    resolve_scoring,
    verdict_from_first_token,
    verdict_from_sequence_logprobs,
)
from character_em.judge.verdicts import (
    DEFAULT_MIN_NUMERIC_MASS,
    EXACT_SCORING,
    FIRST_TOKEN,
    JudgeConfigError,
    JudgeRequest,
    JudgeResult,
    ResultCallback,
)

log = logging.getLogger(__name__)

VLLM_JUDGE_VERSION = "vllm-exact-1"
SCORING = "exact-sequence"  # the hf judge's exact definition, named as this engine's hashes always named it
# What each judge.quantization the vllm judge accepts (job_settings.JUDGE_QUANTIZATIONS) asks of vLLM.
VLLM_QUANTIZATIONS = {"none": None, "fp8": "fp8"}
# Engine requests per generate call: thousands in flight keep the batch full; a killed job loses at most
# one call. The exact path sends one request per node of a verdict's candidate tree, about 105.
REQUESTS_PER_CALL = 4096
EXACT_REQUESTS_PER_VERDICT = 105
ENGINE_STATS = (
    "verdicts",
    "first_token_verdicts",
    "exact_verdicts",
    "requests",
    "prompt_tokens",
    "cached_prompt_tokens",
    "generated_tokens",
    "generate_calls",
    "engine_loads",
)


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "config judge.backend is 'vllm', but the vllm package is not installed in this environment. "
            "Run the judge where vLLM is installed (docs/vllm.md), or set judge.backend: hf."
        ) from exc
    return vllm


def check_quantization(quantization: str | None) -> str:
    """``judge.quantization`` for the vllm judge, or a ``JudgeConfigError`` naming the key and the fix."""
    value = quantization or "none"
    problem = judge_quantization_problem({"backend": "vllm", "quantization": value})
    if problem:
        raise JudgeConfigError(problem)
    return value


def terminator_ids(model_dir: str, tokenizer: Any, revision: str | None = None) -> list[int]:
    """The ``hf`` judge's end-of-turn set (``llm.chat.stop_token_ids``), read from the model's config
    files without loading its weights."""
    from transformers import AutoConfig, GenerationConfig

    from character_em.llm.chat import stop_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_dir, revision=revision)
    except (OSError, ValueError):
        gen = None
    config = AutoConfig.from_pretrained(model_dir, revision=revision)
    ids = sorted(stop_token_ids(SimpleNamespace(generation_config=gen, config=config), tokenizer))
    if not ids:
        raise ValueError(f"judge model {model_dir}: no eos / end-of-turn token ids found")
    return ids


def first_step_logprobs(output: Any, token_ids: Sequence[int]) -> dict[int, float]:
    """The log-probabilities of ``token_ids`` at the first generated position of a vLLM output that asked
    for them with ``logprob_token_ids``."""
    step = output.outputs[0].logprobs
    if not step:
        raise RuntimeError("vLLM returned no log-probabilities for the first generated position")
    found = step[0]
    missing = [t for t in token_ids if t not in found]
    if missing:
        raise RuntimeError(f"vLLM returned no log-probability for token ids {missing[:5]}")
    return {int(t): float(found[t].logprob) for t in token_ids}


@dataclass
class _Engine:
    """What the views of one judge share (``VLLMJudge.with_scoring``): one engine, its tokenizer, the
    spellings computed so far and the counters of everything sent."""

    llm: Any = None
    tokenizer: Any = None
    terminators: list[int] = field(default_factory=list)
    spellings: dict[tuple[str, str], list[list[int]]] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ENGINE_STATS, 0))


@dataclass
class VLLMJudge:
    model: str  # a local folder or Hugging Face id that vLLM can load
    revision: str | None = None
    dtype: str = "auto"
    quantization: str = "none"
    # judge.scoring (its schema default is auto); built directly, a judge scores exactly unless told otherwise
    scoring: str = EXACT_SCORING
    min_numeric_mass: float = DEFAULT_MIN_NUMERIC_MASS
    max_model_len: int = 4096
    requests_per_call: int = REQUESTS_PER_CALL
    # False sends every request without prefix-cache reads (the equivalence test: sharing changes no score)
    read_prefix_cache: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "vllm"
    _shared: _Engine = field(default_factory=_Engine, repr=False, compare=False)
    _fingerprint_value: str | None = field(default=None, init=False, repr=False)
    _resolved_scoring: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.quantization = check_quantization(self.quantization)

    @classmethod
    def from_config(cls, judge_cfg: dict[str, Any]) -> VLLMJudge:
        if not judge_cfg.get("model"):
            raise ValueError("judge.model: the vllm back-end needs a local model folder or a Hugging Face id")
        keys = ("revision", "dtype", "quantization", "scoring", "min_numeric_mass")
        kwargs = {k: judge_cfg[k] for k in keys if judge_cfg.get(k) is not None}
        return cls(model=str(judge_cfg["model"]), **kwargs)

    @classmethod
    def from_engine(cls, engine: Any, model: str, **kwargs: Any) -> VLLMJudge:
        """A judge around an already started ``vllm.LLM`` for ``model`` (tests share one engine)."""
        judge = cls(model=model, **kwargs)
        judge._shared.llm = engine
        return judge

    @property
    def stats(self) -> dict[str, int]:
        return self._shared.stats

    @property
    def started(self) -> bool:
        """Whether an engine is loaded (a finished wave never starts one)."""
        return self._shared.llm is not None

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back, for a job that loads another model next."""
        import gc

        llm, self._shared.llm = self._shared.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if callable(getattr(core, "shutdown", None)):
            core.shutdown()
        del llm
        gc.collect()

    def with_scoring(self, scoring: str) -> VLLMJudge:
        """The same engine scoring another way (the exact audit of first-token verdicts); its verdicts
        have their own judge hash, since ``effective_params`` names the scoring."""
        view = dataclasses.replace(self, scoring=scoring)
        view._fingerprint_value = self._fingerprint_value
        return view

    def effective_params(self) -> dict[str, Any]:
        # Another engine's arithmetic than the hf judge's: its own version and back-end name keep its cache
        # entries apart. The scoring is named as resolved, and quantization only when there is one, so the
        # exact judge's hashes stay what they were.
        scoring = self.resolved_scoring()
        params: dict[str, Any] = {
            "version": VLLM_JUDGE_VERSION,
            "scoring": SCORING if scoring != FIRST_TOKEN else FIRST_TOKEN,
            "dtype": self.dtype,
            "min_numeric_mass": float(self.min_numeric_mass),
            "fingerprint": self._fingerprint(),
        }
        if self.quantization != "none":
            params["quantization"] = self.quantization
        return params

    def resolved_scoring(self) -> str:
        """``exact`` or ``first-token``: ``judge.scoring`` decided on the judge's tokenizer (no engine)."""
        if self._resolved_scoring is None:
            self._resolved_scoring = resolve_scoring(self.scoring, self._tokenizer, self.model)
        return self._resolved_scoring

    def _fingerprint(self) -> str | None:
        if self._fingerprint_value is None:
            self._fingerprint_value = model_fingerprint(self.model, self.revision) or ""
        return self._fingerprint_value or None

    def _tokenizer(self) -> Any:
        shared = self._shared
        if shared.tokenizer is None:
            from transformers import AutoTokenizer

            shared.tokenizer = AutoTokenizer.from_pretrained(self.model, revision=self.revision)
            shared.terminators = terminator_ids(self.model, shared.tokenizer, self.revision)
        return shared.tokenizer

    def _engine(self) -> Any:
        shared = self._shared
        if shared.llm is None:
            vllm = _require_vllm()
            from vllm.platforms import current_platform

            folder = Path(self.model)
            if folder.exists() and not (folder / "config.json").is_file():
                raise FileNotFoundError(f"judge.model {self.model}: no config.json, so vLLM cannot load it")
            on_gpu = bool(current_platform.is_cuda_alike())
            if self.quantization == "fp8" and not on_gpu:
                raise JudgeConfigError(
                    f"judge.quantization: fp8 needs a GPU with FP8 (H100, H200); this node has none. "
                    f"Set judge.quantization: none to load {self.model} unquantized here"
                )
            dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
            dtype = (
                ("bfloat16" if on_gpu else "float32") if self.dtype == "auto" else dtypes.get(self.dtype, self.dtype)
            )
            kwargs: dict[str, Any] = {
                "model": self.model,
                "revision": self.revision,
                "dtype": dtype,
                "quantization": VLLM_QUANTIZATIONS[self.quantization],
                "max_model_len": self.max_model_len,
                "enable_prefix_caching": True,
                "seed": 0,
                **({"enforce_eager": True} if current_platform.is_cpu() else {}),
                **self.engine_kwargs,
            }
            log.info(
                "vllm judge: starting the engine for %s (%s, quantization %s)", self.model, dtype, self.quantization
            )
            try:
                shared.llm = vllm.LLM(**kwargs)
            except Exception as exc:
                raise RuntimeError(
                    f"judge.model {self.model}: vLLM could not load it: {type(exc).__name__}: {exc}"
                ) from exc
            shared.stats["engine_loads"] += 1
        return shared.llm

    def _spellings(self, metric: str, prompt_text: str, prompt_ids: list[int]) -> list[list[int]]:
        # As in the hf judge: a reply's spelling depends only on the assistant header before it.
        key = (prompt_text[-64:], metric)
        spellings = self._shared.spellings
        if key not in spellings:
            spellings[key] = continuation_ids(self._tokenizer(), prompt_text, prompt_ids, candidate_strings(metric))
        return spellings[key]

    def _render(self, requests: Sequence[JudgeRequest]) -> list[tuple[list[int], list[list[int]]]]:
        """(prompt ids, candidate spellings) of each request; the prompts tokenized as one batch."""
        tok = self._tokenizer()
        texts = [tok.apply_chat_template(r.messages(), add_generation_prompt=True, tokenize=False) for r in requests]
        encoded = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        out = []
        for r, text, row in zip(requests, texts, encoded, strict=True):
            ids = [int(i) for i in row]
            conts = self._spellings(r.metric, text, ids)
            if len(ids) + max(len(c) for c in conts) + 1 > self.max_model_len:
                raise ValueError(
                    f"judge prompt of {len(ids)} tokens does not fit the vLLM judge's max_model_len {self.max_model_len}"
                )
            out.append((ids, conts))
        return out

    def _generate(self, prompts: list[dict[str, list[int]]], params: Any) -> list[Any]:
        outputs = list(self._engine().generate(prompts, params, use_tqdm=False))
        stats = self.stats
        stats["generate_calls"] += 1
        stats["requests"] += len(outputs)
        for out in outputs:
            stats["prompt_tokens"] += len(out.prompt_token_ids or ())
            stats["cached_prompt_tokens"] += int(out.num_cached_tokens or 0)
            stats["generated_tokens"] += len(out.outputs[0].token_ids) if out.outputs else 0
        return outputs

    # ----------------------------------------------------------------------------- first-token path

    def first_token_logprobs(self, requests: Sequence[JudgeRequest]) -> list[tuple[FirstTokenPlan, dict[int, float]]]:
        """Per request, the tokens a first-token verdict reads and their log-probabilities at the reply's
        first position: one engine request each, all in one ``generate`` call."""
        from vllm import SamplingParams

        plans: list[FirstTokenPlan] = []
        prompts: list[dict[str, list[int]]] = []
        params: list[Any] = []
        by_plan: dict[FirstTokenPlan, Any] = {}
        for r, (ids, conts) in zip(requests, self._render(requests), strict=True):
            plan = FirstTokenPlan.from_continuations(r.metric, conts)
            if plan not in by_plan:
                by_plan[plan] = SamplingParams(
                    max_tokens=1,
                    temperature=0.0,
                    logprob_token_ids=plan.token_ids,
                    skip_reading_prefix_cache=not self.read_prefix_cache,
                    detokenize=False,
                )
            plans.append(plan)
            prompts.append({"prompt_token_ids": ids})
            params.append(by_plan[plan])
        outputs = self._generate(prompts, params) if prompts else []
        return [(plan, first_step_logprobs(out, plan.token_ids)) for plan, out in zip(plans, outputs, strict=True)]

    def score_first_token(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """One engine request per verdict, all in one ``generate`` call."""
        results = [
            verdict_from_first_token(r.metric, plan, logprobs, min_mass=self.min_numeric_mass)
            for r, (plan, logprobs) in zip(requests, self.first_token_logprobs(requests), strict=True)
        ]
        self.stats["first_token_verdicts"] += len(results)
        return results

    # ----------------------------------------------------------------------------- exact path

    def score_exact(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """One engine request per node of each verdict's candidate tree, all in one ``generate`` call."""
        from vllm import SamplingParams

        rendered = self._render(requests)
        terminators = self._shared.terminators  # read with the tokenizer, which _render loads
        plans = []
        prompts: list[dict[str, list[int]]] = []
        params: list[Any] = []
        for r, (ids, conts) in zip(requests, rendered, strict=True):
            # prefix (tokens after the prompt) -> the ids whose probability is read after it
            reads: dict[tuple[int, ...], set[int]] = {}
            for c in conts:
                for i, token in enumerate(c):
                    reads.setdefault(tuple(c[:i]), set()).add(int(token))
                reads.setdefault(tuple(c), set()).update(terminators)
            node_of = {}
            for prefix, wanted in reads.items():
                node_of[prefix] = len(prompts)
                prompts.append({"prompt_token_ids": ids + list(prefix)})
                params.append(
                    SamplingParams(
                        max_tokens=1,
                        temperature=0.0,
                        logprob_token_ids=sorted(wanted),
                        skip_reading_prefix_cache=not self.read_prefix_cache,
                        detokenize=False,
                    )
                )
            plans.append((r, conts, node_of, reads))
        outputs = self._generate(prompts, params) if prompts else []
        results = []
        for r, conts, node_of, reads in plans:
            found = {prefix: first_step_logprobs(outputs[k], sorted(reads[prefix])) for prefix, k in node_of.items()}
            logps = []
            for c in conts:
                total = sum(found[tuple(c[:i])][int(token)] for i, token in enumerate(c))
                ends = [found[tuple(c)][t] for t in terminators]
                top = max(ends)
                logps.append(total + top + math.log(sum(math.exp(x - top) for x in ends)))
            results.append(
                verdict_from_sequence_logprobs(
                    r.metric, candidate_strings(r.metric), logps, min_mass=self.min_numeric_mass
                )
            )
        self.stats["exact_verdicts"] += len(results)
        return results

    # ----------------------------------------------------------------------------- the back-end interface

    def score_requests(self, requests: Sequence[JudgeRequest]) -> list[JudgeResult]:
        """Score a group of requests with one ``generate`` call."""
        if self.resolved_scoring() == FIRST_TOKEN:
            results = self.score_first_token(requests)
        else:
            results = self.score_exact(requests)
        self.stats["verdicts"] += len(results)
        return results

    def score_batch(
        self, requests: Sequence[JudgeRequest], on_result: ResultCallback | None = None
    ) -> list[JudgeResult]:
        # Chunks of requests_per_call engine requests: the exact path sends ~105 per verdict.
        per_verdict = 1 if self.resolved_scoring() == FIRST_TOKEN else EXACT_REQUESTS_PER_VERDICT
        group = max(1, self.requests_per_call // per_verdict)
        out: list[JudgeResult] = []
        for start in range(0, len(requests), group):
            for k, res in enumerate(self.score_requests(requests[start : start + group])):
                out.append(res)
                if on_result is not None:
                    on_result(start + k, res)
        return out
