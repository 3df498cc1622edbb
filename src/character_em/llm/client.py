"""One client for OpenAI-compatible chat-completions endpoints (OpenAI, vLLM, SGLang, llama.cpp, Ollama).

Judging and data generation both send their calls through ``ChatClient``; each parses replies its own
way. Transport: bounded concurrency (``map``), retries of 408/409/429/5xx, timeouts, connection errors
and malformed replies with exponential backoff and jitter (a server's ``Retry-After`` is honoured up to
``backoff_max_s``). A call that still fails returns a ``CallFailure``, never an exception. The official
client's own retries are off, so every attempt is counted here (``stats``).

Secrets: only the NAME of the environment variable holding the key is configured (``api_key_env``); the
key is read when the client is first used, kept off every public field, never logged, and scrubbed from
any error text a server echoes back.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "ChatClient",
    "CallFailure",
    "MissingCredentialError",
    "ReplyMalformed",
    "ReplyRejected",
    "RequestRejected",
    "RETRY_STATUS",
]

RETRY_STATUS = frozenset({408, 409, 429})
T = TypeVar("T")
R = TypeVar("R")


class MissingCredentialError(ValueError):
    """The configured key variable is not set in this job's environment."""


class ReplyMalformed(Exception):
    """Raised by a parser: the reply arrived but is not usable. The call is retried."""


class ReplyRejected(Exception):
    """Raised by a parser: the reply is well formed but unfit, and retrying will not help. It propagates
    to the caller, which decides what to do (for example fall back to another request shape)."""


class RequestRejected(Exception):
    """The server answered with a status the caller asked to handle itself (``reject_statuses``)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"http_{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class CallFailure:
    """A call that failed after all retries: ``error`` is a short code, ``detail`` scrubbed text."""

    error: str
    detail: str


@dataclass
class ChatClient:
    base_url: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    # The config key that names ``api_key_env``, for error messages ("judge.api_key_env").
    config_key: str = "api_key_env"
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_concurrency: int = 8
    # Injection points for tests: how to sleep between retries, and the jitter's random source.
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    rng: random.Random = field(default_factory=random.Random, repr=False)
    stats: Counter[str] = field(default_factory=Counter, repr=False)
    _client: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _secret: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if int(self.max_concurrency) < 1:
            raise ValueError(f"{self.config_key.rsplit('.', 1)[0]}.max_concurrency must be >= 1")

    def connect(self) -> Any:
        """The underlying ``openai.OpenAI`` client, made once. Fails fast when the key is missing."""
        with self._lock:
            if self._client is None:
                import openai

                if self.api_key_env:
                    key = os.environ.get(self.api_key_env)
                    if not key:
                        raise MissingCredentialError(
                            f"{self.config_key} names the environment variable {self.api_key_env!r}, which is not "
                            "set (or empty) in this job's environment; export it before running Snakemake, or set "
                            f"{self.config_key}: null for an endpoint without authentication"
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

    def scrub(self, text: str) -> str:
        if self._secret and self._secret in text:
            text = text.replace(self._secret, "***")
        return text

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with 'equal jitter' (half fixed, half random), so synchronized workers that
        hit a rate limit together spread out when they retry."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * (2.0**attempt))
        delay = cap / 2.0 + self.rng.uniform(0.0, cap / 2.0)
        if retry_after is not None and math.isfinite(retry_after):
            delay = max(delay, min(self.backoff_max_s, retry_after))
        return delay

    def call(
        self,
        kwargs: dict[str, Any],
        parse: Callable[[Any], R],
        *,
        reject_statuses: Iterable[int] = (),
    ) -> R | CallFailure:
        """One logical chat-completions call: request, parse, retry what is worth retrying.

        ``parse`` may raise ``ReplyMalformed`` (retried) or ``ReplyRejected`` (propagates). A status in
        ``reject_statuses`` raises ``RequestRejected`` instead of being retried or failed.
        """
        import openai

        client = self.connect()
        rejected = frozenset(int(s) for s in reject_statuses)
        last_error, detail = "unknown", ""
        for attempt in range(int(self.max_retries) + 1):
            retry_after: float | None = None
            self.count("attempts")
            try:
                return parse(client.chat.completions.create(**kwargs))
            except ReplyRejected:
                raise
            except openai.APIStatusError as exc:
                status = int(exc.status_code)
                last_error, detail = f"http_{status}", self.scrub(str(exc))[:300]
                if status in rejected:
                    raise RequestRejected(status, detail) from None
                retryable = status in RETRY_STATUS or status >= 500
                try:
                    retry_after = float(exc.response.headers.get("retry-after", ""))
                except (TypeError, ValueError, AttributeError):
                    retry_after = None
            except openai.APITimeoutError:
                last_error, detail, retryable = "timeout", f"no reply within {self.timeout_s}s", True
            except openai.APIConnectionError as exc:
                last_error, detail, retryable = "connection", self.scrub(str(exc))[:300], True
            except (openai.APIResponseValidationError, ReplyMalformed, ValueError) as exc:
                # ValueError covers a body that is not JSON (json.JSONDecodeError).
                last_error, detail, retryable = "malformed_response", self.scrub(repr(exc))[:300], True
            except openai.OpenAIError as exc:
                last_error, detail, retryable = "openai_error", self.scrub(repr(exc))[:300], False
            self.count(f"error_{last_error}")
            if not retryable or attempt >= int(self.max_retries):
                break
            self.count("retries")
            self.sleep(self.backoff(attempt, retry_after))
        return CallFailure(last_error, detail)

    def map(
        self,
        work: Callable[[T], R],
        items: Sequence[T],
        on_result: Callable[[int, R], None] | None = None,
        *,
        thread_name: str = "chat",
    ) -> list[R]:
        """``work`` over ``items`` with at most ``max_concurrency`` in flight; results in input order.
        ``on_result(i, result)`` runs as each finishes, so callers can cache progress as it comes."""
        if not items:
            return []
        self.connect()  # fail fast (missing key) before any thread starts
        results: list[Any] = [None] * len(items)
        with ThreadPoolExecutor(max_workers=int(self.max_concurrency), thread_name_prefix=thread_name) as pool:
            futures = {pool.submit(work, item): i for i, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    results[i] = future.result()
                    if on_result is not None:
                        on_result(i, results[i])
            except BaseException:
                # Do not wait for thousands of queued calls when the caller is failing.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return results
