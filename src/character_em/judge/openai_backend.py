"""The ``openai`` judge back-end: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang,
llama.cpp, Ollama) through the official ``openai`` client.

How a score is obtained (``score_mode``):

* ``logprobs``: one request with ``max_tokens=1``, ``logprobs=True``, ``top_logprobs=k``. The score is
  the expectation over the integers 0..100 among the first token's top-k tokens, normalized by their
  mass (``character_em.judge.core.verdict_from_number_probs``); under ``min_numeric_mass`` (0.25) the
  verdict is NaN/"invalid"/"low_numeric_mass". Note that this reads ONE token: it is exact for
  tokenizers that spell every number 0..100 as one token (OpenAI's, Llama-3's); for tokenizers that
  split digits (Qwen) it only sees the first digit, so serve such judges with the ``hf`` back-end.
* ``text``: one request without log-probabilities and a larger token budget (reasoning models); the
  reply text is parsed (``verdict_from_text``). Scores are integers, a coarser estimator.
* ``auto`` (default): ``logprobs`` first; a reply without log-probabilities, or HTTP 400 to the
  log-probability request, falls back to ``text`` for that request. After three such replies and no
  log-probabilities ever seen, the endpoint is taken not to support them and later requests go
  straight to ``text``. Each verdict records its ``method`` ("logprobs" or "text").

A prompt whose reply the judge writes in a fixed format (``reply: strongreject`` in
``judge.prompts_file``: reasoning, then three answers) is always one text request, with the prompt's
system message, whatever ``score_mode`` says; the reply is read by ``verdict_from_strongreject``.

Transport (concurrency, retries with backoff and jitter, key handling and scrubbing) is the project's
one OpenAI-compatible client, ``character_em.llm.client.ChatClient``; data generation uses the same
client as a peer. A call that still fails becomes a result with ``error`` set (NaN, "invalid"), never
an exception.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from character_em.hashing import canonical_json
from character_em.job_settings import JOB_PARAM_KEYS
from character_em.judge.verdicts import (
    DEFAULT_MIN_NUMERIC_MASS,
    JudgeConfigError,
    JudgeRequest,
    JudgeResult,
    ResultCallback,
    number_of_token,
    probs_from_top_logprobs,
    verdict_from_number_probs,
    verdict_from_strongreject,
    verdict_from_text,
)
from character_em.llm.client import (
    CallFailure,
    ChatClient,
    MissingCredentialError,
    ReplyMalformed,
    ReplyRejected,
    RequestRejected,
)

log = logging.getLogger(__name__)

# Bump when the request shape or the score computation changes: it is part of the judge hash.
OPENAI_JUDGE_VERSION = "openai-judge-1"
SCORE_MODES = ("auto", "logprobs", "text")
# After this many replies without log-probabilities (and none with), auto mode stops asking for them.
NO_LOGPROBS_STICKY_AFTER = 3
# Log-probability replies with numbers in their top tokens, none of them a two- or three-digit number,
# after which the judge's tokenizer is taken to split numbers into digits (see DigitSplitError).
DIGIT_SPLIT_EVIDENCE = 8


class DigitSplitError(JudgeConfigError):
    """The endpoint's tokenizer writes numbers digit by digit, so one token's log-probabilities cannot
    give a 0..100 score: "85" would be read as 8."""


class NoLogprobs(ReplyRejected):
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
    client: ChatClient = field(init=False, repr=False)
    _numeric_replies: int = field(default=0, init=False, repr=False)
    _multi_digit_seen: bool = field(default=False, init=False, repr=False)
    _digit_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise JudgeConfigError("judge.model: the openai back-end needs the endpoint's model name")
        if self.score_mode not in SCORE_MODES:
            raise JudgeConfigError(f"judge.score_mode must be one of {SCORE_MODES}, got {self.score_mode!r}")
        if self.max_tokens_param not in ("max_tokens", "max_completion_tokens"):
            raise JudgeConfigError("judge.max_tokens_param must be max_tokens or max_completion_tokens")
        if self.max_concurrency < 1:
            raise JudgeConfigError("judge.max_concurrency must be >= 1")
        self.client = ChatClient(
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            config_key="judge.api_key_env",
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            max_concurrency=self.max_concurrency,
            sleep=self.sleep,
            rng=self.rng,
        )

    @property
    def stats(self) -> Counter[str]:
        return self.client.stats

    @classmethod
    def from_config(cls, judge_cfg: dict[str, Any]) -> OpenAIJudge:
        # The settings a judge job receives (job_settings) that this class takes as arguments.
        own = {f.name for f in dataclasses.fields(cls) if f.init} - {"model", "backend"}
        keys = [key for key in JOB_PARAM_KEYS["openai"] if key in own]
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

    def generation_params(self) -> dict[str, Any]:
        # A reply written as text (reply: strongreject): its budget and temperature are already in
        # effective_params, so nothing more changes its verdicts.
        return {"max_tokens": int(self.text_max_tokens)}

    # ----------------------------------------------------------------------------------- requests
    def _request_kwargs(self, request: JudgeRequest, *, logprobs: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages(),
            "temperature": float(self.temperature),
        }
        if logprobs:
            kwargs.update({self.max_tokens_param: 1, "logprobs": True, "top_logprobs": int(self.top_logprobs)})
        else:
            kwargs[self.max_tokens_param] = int(self.text_max_tokens)
        return kwargs

    def _call(self, kwargs: dict[str, Any], parse: Callable[[Any], JudgeResult]) -> JudgeResult:
        """One verdict through the shared client. In auto mode a 400 to a log-probability request is
        raised (``RequestRejected``), so that the caller can fall back to text."""
        reject = (400,) if kwargs.get("logprobs") and self.score_mode == "auto" else ()
        outcome = self.client.call(kwargs, parse, reject_statuses=reject)
        if isinstance(outcome, CallFailure):
            method = "logprobs" if kwargs.get("logprobs") else "text"
            return JudgeResult(math.nan, "invalid", outcome.detail, method, error=outcome.error)
        return outcome

    # ----------------------------------------------------------------------------------- parsing
    def _parse_logprobs(self, metric: str) -> Callable[[Any], JudgeResult]:
        def parse(response: Any) -> JudgeResult:
            choice = _first_choice(response)
            lp = getattr(choice, "logprobs", None)
            content = getattr(lp, "content", None) if lp is not None else None
            if not content:
                raise NoLogprobs()
            first = content[0]
            top = getattr(first, "top_logprobs", None)
            if not top:
                raise NoLogprobs()
            try:
                pairs = [(str(t.token), float(t.logprob)) for t in top]
            except (AttributeError, TypeError, ValueError) as exc:
                raise ReplyMalformed(f"bad top_logprobs entry: {exc!r}") from None
            numbers, escapes = probs_from_top_logprobs(metric, pairs)
            self._note_number_tokens(pairs)
            raw = canonical_json({"top": [[t, round(lp_, 4)] for t, lp_ in pairs[:20]]})
            self.client.count("logprobs_replies")
            return verdict_from_number_probs(
                metric, numbers, escapes, min_mass=self.min_numeric_mass, method="logprobs", raw=raw
            )

        return parse

    def _parse_text(self, metric: str, reply: str = "score") -> Callable[[Any], JudgeResult]:
        def parse(response: Any) -> JudgeResult:
            choice = _first_choice(response)
            message = getattr(choice, "message", None)
            if message is None:
                raise ReplyMalformed("choice has no message")
            text = getattr(message, "content", None) or ""
            if not text.strip() and getattr(choice, "finish_reason", None) == "length":
                # Usually a reasoning model that spent the whole budget thinking: a setting to fix
                # (text_max_tokens), so it counts as a failure rather than a verdict.
                return JudgeResult(math.nan, "invalid", "", "text", error="truncated_reply")
            if reply == "strongreject":
                return verdict_from_strongreject(str(text), method="text")
            return verdict_from_text(metric, str(text), method="text")

        return parse

    # ----------------------------------------------------------------------------------- scoring
    def _logprobs_unavailable(self) -> bool:
        stats = self.client.stats
        return stats["no_logprobs_replies"] >= NO_LOGPROBS_STICKY_AFTER and stats["logprobs_replies"] == 0

    def score_one(self, request: JudgeRequest) -> JudgeResult:
        if request.reply != "score":
            # The rubric asks for reasoning before the answers: always a text request, whatever
            # score_mode says (score_mode chooses how a 0..100 reply is read).
            return self._call(
                self._request_kwargs(request, logprobs=False), self._parse_text(request.metric, request.reply)
            )
        mode = self.score_mode
        if mode == "auto" and self._logprobs_unavailable():
            mode = "text"
        if mode in ("auto", "logprobs"):
            try:
                return self._call(self._request_kwargs(request, logprobs=True), self._parse_logprobs(request.metric))
            except (NoLogprobs, RequestRejected) as exc:
                self.client.count("no_logprobs_replies")
                if mode == "logprobs":
                    return JudgeResult(math.nan, "invalid", "", "logprobs", error="missing_logprobs")
                log.debug("no logprobs (%s); falling back to text", type(exc).__name__)
        return self._call(self._request_kwargs(request, logprobs=False), self._parse_text(request.metric))

    # ----------------------------------------------------------------------------------- digit-split check
    def _note_number_tokens(self, pairs: Sequence[tuple[str, float]]) -> None:
        values = [n for n in (number_of_token(token) for token, _ in pairs) if n is not None]
        if not values:
            return
        with self._digit_lock:
            self._numeric_replies += 1
            self._multi_digit_seen = self._multi_digit_seen or any(n >= 10 for n in values)

    def _digit_split(self) -> bool:
        return not self._multi_digit_seen and self._numeric_replies >= DIGIT_SPLIT_EVIDENCE

    def _digit_split_error(self) -> DigitSplitError:
        return DigitSplitError(
            f"judge.model {self.model!r}: in {self._numeric_replies} log-probability replies the top tokens held"
            " numbers, but never a two-digit one (10..100): this tokenizer splits numbers into digits, so reading"
            " the first token would score a reply of 85 as 8. Use exact scoring: judge.backend: hf (every reply"
            " 0..100 scored as a whole token sequence) or the vLLM judge back-end; or judge.score_mode: text."
            " Nothing from this job was cached."
        )

    def score_batch(
        self, requests: Sequence[JudgeRequest], on_result: ResultCallback | None = None
    ) -> list[JudgeResult]:
        try:
            self.client.connect()  # fail fast (missing key) before any thread starts
        except MissingCredentialError as exc:
            raise JudgeConfigError(str(exc)) from None
        # Log-probability verdicts are held back (not passed on, so not cached) until a reply shows a
        # two-digit number token: a digit-splitting tokenizer must fail the job before any of its
        # first-digit scores reaches the cache. A real whole-number tokenizer shows one at once.
        held: list[tuple[int, JudgeResult]] = []

        def forward(i: int, result: JudgeResult) -> None:
            # client.map calls this from one thread, as each call finishes.
            if result.method == "logprobs" and not result.failed and not self._multi_digit_seen:
                held.append((i, result))
                if self._digit_split():
                    raise self._digit_split_error()
                return
            release = [*held, (i, result)] if self._multi_digit_seen else [(i, result)]
            if self._multi_digit_seen:
                held.clear()
            if on_result is not None:
                for j, r in release:
                    on_result(j, r)

        results = self.client.map(self.score_one, list(requests), forward, thread_name="judge")
        if self._digit_split():
            raise self._digit_split_error()
        if on_result is not None:
            for j, r in held:
                on_result(j, r)
        return results


def _first_choice(response: Any) -> Any:
    choices = getattr(response, "choices", None)
    if not choices:
        raise ReplyMalformed("reply has no choices")
    return choices[0]
