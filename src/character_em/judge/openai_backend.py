"""The ``openai`` judge back-end: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang,
llama.cpp, Ollama) through the official ``openai`` client.

How a score is obtained (``score_mode``):

* ``logprobs``: one request with ``max_tokens=1``, ``logprobs=True``, ``top_logprobs=k``. The score is
  the expectation over the integers 0..100 among the first token's top-k tokens, normalized by their
  mass (``character_em.judge.verdict_from_number_probs``); under ``min_numeric_mass`` (0.25) the
  verdict is NaN/"invalid"/"low_numeric_mass". Note that this reads ONE token: it is exact for
  tokenizers that spell every number 0..100 as one token (OpenAI's, Llama-3's); for tokenizers that
  split digits (Qwen) it only sees the first digit, so serve such judges with the ``hf`` back-end.
* ``text``: one request without log-probabilities and a larger token budget (reasoning models); the
  reply text is parsed (``verdict_from_text``). Scores are integers, a coarser estimator.
* ``auto`` (default): ``logprobs`` first; a reply without log-probabilities, or HTTP 400 to the
  log-probability request, falls back to ``text`` for that request. After three such replies and no
  log-probabilities ever seen, the endpoint is taken not to support them and later requests go
  straight to ``text``. Each verdict records its ``method`` ("logprobs" or "text").

Transport: bounded concurrency with a thread pool (``max_concurrency``); retries of 408/409/429/5xx,
timeouts, connection errors and malformed replies with exponential backoff and jitter (a server's
``Retry-After`` is honoured up to ``backoff_max_s``). A call that still fails becomes a result with
``error`` set (NaN, "invalid"), never an exception. The client's own retries are switched off so
that every attempt is counted here.

Secrets: only the NAME of the environment variable holding the key is configured (``api_key_env``);
the key is read at call time, never stored on the object's public fields, never logged, and scrubbed
from any error text the server might echo back.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from character_em.judge import (
    DEFAULT_MIN_NUMERIC_MASS,
    JudgeConfigError,
    JudgeRequest,
    JudgeResult,
    ResultCallback,
    _canonical,
    probs_from_top_logprobs,
    verdict_from_number_probs,
    verdict_from_text,
)

log = logging.getLogger(__name__)

# Bump when the request shape or the score computation changes: it is part of the judge hash.
OPENAI_JUDGE_VERSION = "openai-judge-1"
SCORE_MODES = ("auto", "logprobs", "text")
RETRY_STATUS = frozenset({408, 409, 429})
# After this many replies without log-probabilities (and none with), auto mode stops asking for them.
NO_LOGPROBS_STICKY_AFTER = 3


class _Malformed(Exception):
    """The reply arrived but is not a usable chat completion."""


class _NoLogprobs(Exception):
    """The reply has no log-probabilities for its first token."""


@dataclass
class OpenAIJudge:
    model: str
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    score_mode: str = "auto"
    temperature: float = 0.0
    top_logprobs: int = 20
    text_max_tokens: int = 1024
    max_tokens_param: str = "max_tokens"
    min_numeric_mass: float = DEFAULT_MIN_NUMERIC_MASS
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backend: str = "openai"
    # Injection points for tests: how to sleep between retries, and the jitter's random source.
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    rng: random.Random = field(default_factory=random.Random, repr=False)
    stats: Counter[str] = field(default_factory=Counter, repr=False)
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _secret: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise JudgeConfigError("judge.model: the openai back-end needs the endpoint's model name")
        if self.score_mode not in SCORE_MODES:
            raise JudgeConfigError(f"judge.score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise JudgeConfigError("judge.max_tokens_param must be max_tokens or max_completion_tokens")
        if self.max_concurrency < 1:
            raise JudgeConfigError("judge.max_concurrency must be >= 1")

    @classmethod
    def from_config(cls, judge_cfg: dict[str, Any]) -> OpenAIJudge:
        keys = (
            "base_url", "api_key_env", "score_mode", "temperature", "top_logprobs", "text_max_tokens",
            "max_tokens_param", "min_numeric_mass", "max_concurrency", "timeout_s", "max_retries",
            "backoff_initial_s", "backoff_max_s",
        )
        kwargs = {k: judge_cfg[k] for k in keys if judge_cfg.get(k) is not None}
        if "api_key_env" in judge_cfg and judge_cfg["api_key_env"] is None:
            kwargs["api_key_env"] = None  # an endpoint without authentication (local vLLM)
        return cls(model=str(judge_cfg.get("model") or ""), **kwargs)

    # ----------------------------------------------------------------------------------- identity
    def effective_params(self) -> dict[str, Any]:
        # Only what changes verdicts. The endpoint URL is left out on purpose: a self-hosted judge moves
        # between nodes and ports, and ``model`` is what names (and must pin) the judge.
        return {
            "version": OPENAI_JUDGE_VERSION,
            "score_mode": self.score_mode,
            "temperature": float(self.temperature),
            "top_logprobs": int(self.top_logprobs),
            "text_max_tokens": int(self.text_max_tokens),
            "min_numeric_mass": float(self.min_numeric_mass),
        }

    # ----------------------------------------------------------------------------------- client
    def _get_client(self) -> Any:
        with self._lock:
            if self._client is None:
                import openai

                if self.api_key_env:
                    key = os.environ.get(self.api_key_env)
                    if not key:
                        raise JudgeConfigError(
                            f"judge.api_key_env names the environment variable {self.api_key_env!r}, which is not "
                            "set (or empty) in this job's environment; export it before running Snakemake, or set "
                            "judge.api_key_env: null for an endpoint without authentication"
                        )
                    self._secret = key
                else:
                    key = "no-key"  # the client insists on a value; unauthenticated endpoints ignore it
                # Per-request INFO logs from the HTTP stack would flood job logs; they carry no key.
                for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2"):
                    logging.getLogger(name).setLevel(logging.WARNING)
                self._client = openai.OpenAI(
                    api_key=key, base_url=self.base_url, timeout=float(self.timeout_s), max_retries=0
                )
            return self._client

    def _scrub(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text

    # ----------------------------------------------------------------------------------- requests
    def _request_kwargs(self, prompt: str, *, logprobs: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": float(self.temperature),
        }
        if logprobs:
            kwargs.update({self.max_tokens_param: 1, "logprobs": True, "top_logprobs": int(self.top_logprobs)})
        else:
            kwargs[self.max_tokens_param] = int(self.text_max_tokens)
        return kwargs

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with 'equal jitter' (half fixed, half random), so synchronized workers
        that hit a rate limit together spread out when they retry."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * (2.0**attempt))
        delay = cap / 2.0 + self.rng.uniform(0.0, cap / 2.0)
        if retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, min(self.backoff_max_s, retry_after))
        return delay

    def _call(self, kwargs: dict[str, Any], parse: Callable[[Any], JudgeResult]) -> JudgeResult:
        """One logical call: request, parse, retry what is worth retrying. Never raises for a failed call
        except ``_NoLogprobs`` (from ``parse``) and ``_BadRequest`` for the auto-mode fallback."""
        import openai

        client = self._get_client()
        last_error, detail = "unknown", ""
        for attempt in range(int(self.max_retries) + 1):
            retry_after: float | None = None
            with self._lock:
                self.stats["attempts"] += 1
            try:
                response = client.chat.completions.create(**kwargs)
                return parse(response)
            except _NoLogprobs:
                raise
            except openai.APIStatusError as exc:
                status = int(exc.status_code)
                last_error, detail = f"http_{status}", self._scrub(str(exc))[:300]
                retryable = status in RETRY_STATUS or status >= 500
                try:
                    retry_after = float(exc.response.headers.get("retry-after", ""))
                except (TypeError, ValueError, AttributeError):
                    retry_after = None
                if status == 400 and kwargs.get("logprobs") and self.score_mode == "auto":
                    raise _BadRequest(detail) from None
            except openai.APITimeoutError:
                last_error, detail, retryable = "timeout", f"no reply within {self.timeout_s}s", True
            except openai.APIConnectionError as exc:
                last_error, detail, retryable = "connection", self._scrub(str(exc))[:300], True
            except (openai.APIResponseValidationError, _Malformed, ValueError) as exc:
                # ValueError covers a body that is not JSON (json.JSONDecodeError).
                last_error, detail, retryable = "malformed_response", self._scrub(repr(exc))[:300], True
            except openai.OpenAIError as exc:
                last_error, detail, retryable = "openai_error", self._scrub(repr(exc))[:300], False
            with self._lock:
                self.stats[f"error_{last_error}"] += 1
            if not retryable or attempt >= int(self.max_retries):
                break
            with self._lock:
                self.stats["retries"] += 1
            self.sleep(self._backoff(attempt, retry_after))
        method = "logprobs" if kwargs.get("logprobs") else "text"
        return JudgeResult(math.nan, "invalid", detail, method, error=last_error)

    # ----------------------------------------------------------------------------------- parsing
    def _parse_logprobs(self, metric: str) -> Callable[[Any], JudgeResult]:
        def parse(response: Any) -> JudgeResult:
            choice = _first_choice(response)
            lp = getattr(choice, "logprobs", None)
            content = getattr(lp, "content", None) if lp is not None else None
            if not content:
                raise _NoLogprobs()
            first = content[0]
            top = getattr(first, "top_logprobs", None)
            if not top:
                raise _NoLogprobs()
            try:
                pairs = [(str(t.token), float(t.logprob)) for t in top]
            except (AttributeError, TypeError, ValueError) as exc:
                raise _Malformed(f"bad top_logprobs entry: {exc!r}") from None
            numbers, escapes = probs_from_top_logprobs(metric, pairs)
            raw = _canonical({"top": [[t, round(lp_, 4)] for t, lp_ in pairs[:20]]})
            with self._lock:
                self.stats["logprobs_replies"] += 1
            return verdict_from_number_probs(
                metric, numbers, escapes, min_mass=self.min_numeric_mass, method="logprobs", raw=raw
            )

        return parse

    def _parse_text(self, metric: str) -> Callable[[Any], JudgeResult]:
        def parse(response: Any) -> JudgeResult:
            choice = _first_choice(response)
            message = getattr(choice, "message", None)
            if message is None:
                raise _Malformed("choice has no message")
            text = getattr(message, "content", None) or ""
            if not text.strip() and getattr(choice, "finish_reason", None) == "length":
                # Usually a reasoning model that spent the whole budget thinking: a setting to fix
                # (text_max_tokens), so it counts as a failure rather than a verdict.
                return JudgeResult(math.nan, "invalid", "", "text", error="truncated_reply")
            return verdict_from_text(metric, str(text), method="text")

        return parse

    # ----------------------------------------------------------------------------------- scoring
    def _logprobs_unavailable(self) -> bool:
        with self._lock:
            return self.stats["no_logprobs_replies"] >= NO_LOGPROBS_STICKY_AFTER and self.stats["logprobs_replies"] == 0

    def score_one(self, request: JudgeRequest) -> JudgeResult:
        mode = self.score_mode
        if mode == "auto" and self._logprobs_unavailable():
            mode = "text"
        if mode in ("auto", "logprobs"):
            try:
                return self._call(self._request_kwargs(request.prompt, logprobs=True), self._parse_logprobs(request.metric))
            except (_NoLogprobs, _BadRequest) as exc:
                with self._lock:
                    self.stats["no_logprobs_replies"] += 1
                if mode == "logprobs":
                    return JudgeResult(math.nan, "invalid", "", "logprobs", error="missing_logprobs")
                log.debug("no logprobs (%s); falling back to text", type(exc).__name__)
        return self._call(self._request_kwargs(request.prompt, logprobs=False), self._parse_text(request.metric))

    def score_batch(self, requests: Sequence[JudgeRequest], on_result: ResultCallback | None = None) -> list[JudgeResult]:
        if not requests:
            return []
        self._get_client()  # fail fast (missing key) before any thread starts
        results: list[JudgeResult | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=int(self.max_concurrency), thread_name_prefix="judge") as pool:
            futures = {pool.submit(self.score_one, r): i for i, r in enumerate(requests)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    if on_result is not None:
                        on_result(i, results[i])  # type: ignore[arg-type]
            except BaseException:
                # Do not wait for thousands of queued calls when the caller is failing.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return [r for r in results if r is not None]


class _BadRequest(Exception):
    """HTTP 400 to a log-probability request: the endpoint may not support them (auto mode falls back)."""


def _first_choice(response: Any) -> Any:
    choices = getattr(response, "choices", None)
    if not choices:
        raise _Malformed("reply has no choices")
    return choices[0]
