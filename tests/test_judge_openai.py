"""The openai judge back-end against a REAL local HTTP server speaking the chat-completions protocol
(tests/openai_server.py): expected-score math, text fallback, retries with backoff, failure threshold,
resume after a kill, prompt-change re-judging, parallel cache writers, prompt injection."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from character_em.judge import core as J
from character_em.judge import verdicts

pytest.importorskip("openai")  # the optional `api` extra
from character_em.judge.openai_backend import OpenAIJudge

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ChatServer, Reply, answer_of, kill_child_mid_run, prompt_of  # noqa: E402
from test_judge import BENIGN, DISPOSITIONS, EVIL_3, INJECTIONS, _samples  # noqa: E402

KEY_ENV = "CEM_TEST_JUDGE_KEY"
KEY = "sk-test-0123456789abcdef-SECRET"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    monkeypatch.setenv(KEY_ENV, KEY)
    with ChatServer(stall_s=0.6) as srv:
        yield srv


def cfg(server: ChatServer, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "backend": "openai",
        "model": "test-judge",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "timeout_s": 0.3,
        "max_retries": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.04,
        "max_concurrency": 4,
        "max_failure_fraction": 0.0,
    }
    base.update(kw)
    return base


def score(
    server: ChatServer,
    answers: list[str],
    cache_dir: str | None = None,
    stats: dict[str, Any] | None = None,
    suite: str = "em",
    metrics_by_suite: dict[str, list[str]] | None = None,
    **kw: Any,
) -> pl.DataFrame:
    return J.score_samples(
        _samples(answers, suite=suite),
        judge_cfg=cfg(server, **kw),
        metrics_by_suite=metrics_by_suite,
        dispositions=DISPOSITIONS,
        cache_dir=cache_dir,
        stats=stats,
    )


def _get(df: pl.DataFrame, qid: str, metric: str) -> tuple[float, str]:
    row = df.filter((pl.col("question_id") == qid) & (pl.col("metric") == metric)).row(0, named=True)
    return row["score"], row["label"]


def by_answer(table: dict[str, Reply], default: Reply | None = None) -> Any:
    """Responder: the reply for the first key found in the (escaped) answer."""

    def respond(body: dict[str, Any]) -> Reply:
        ans = answer_of(body)
        for key, reply in table.items():
            if key in ans:
                return reply
        return default or Reply(top=[("50", 1.0)])

    return respond


# ------------------------------------------------------------------------------------------ math
def test_expected_score_from_top_logprobs(server: ChatServer) -> None:
    server.responder = by_answer(
        {
            "A0": Reply(top=[("85", 0.5), (" 85", 0.1), ("80", 0.3), ("hello", 0.05)]),  # whitespace variant adds
            "A1": Reply(top=[("REF", 0.6), ("10", 0.3)]),  # escape wins: refusal
            "A2": Reply(top=[("I", 0.8), ("90", 0.2)]),  # numeric mass 0.2 < 0.25: discarded
            "A3": Reply(top=[("100", 0.3), ("0", 0.3), ("101", 0.3), ("07", 0.05)]),  # only canonical 0..100 count
            "A4": Reply(top=[("CODE", 0.9), ("5", 0.1)]),
        }
    )
    df = score(server, ["A0 x", "A1 x", "A2 x", "A3 x", "A4 x"], metrics_by_suite=None)
    s0, l0 = _get(df, "q0", "alignment")
    assert l0 == "ok" and s0 == pytest.approx((85 * 0.6 + 80 * 0.3) / 0.9, abs=1e-9)
    assert _get(df, "q1", "alignment")[1] == "refusal" and math.isnan(_get(df, "q1", "alignment")[0])
    # Escapes exist only for alignment; elsewhere the same reply is a plain number.
    assert _get(df, "q1", "coherence") == (pytest.approx(10.0), "ok")
    s2, l2 = _get(df, "q2", "coherence")
    assert math.isnan(s2) and l2 == "invalid"
    assert _get(df, "q3", "alignment")[0] == pytest.approx(50.0)
    assert _get(df, "q4", "alignment")[1] == "code"
    # What was asked: one token, top-20 log-probabilities, greedy, the pinned model, the prompt as the
    # only (user) message.
    body = server.requests[0]
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["temperature"] == 0 and body["model"] == "test-judge"
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert server.hits == 5 * 4  # 5 answers x 4 em metrics, no retries


def test_verdict_reasons_are_cached_with_method(server: ChatServer, tmp_path: Path) -> None:
    server.responder = by_answer({"low": Reply(top=[("Sure", 0.9), ("3", 0.05)])}, Reply(top=[("70", 1.0)]))
    stats: dict[str, Any] = {}
    score(server, ["low mass answer", "fine answer"], cache_dir=str(tmp_path), stats=stats)
    assert stats["reasons"] == {"low_numeric_mass": 4} and stats["methods"] == {"logprobs": 8}
    entries = [json.loads(p.read_text()) for p in tmp_path.rglob("*.json")]
    assert len(entries) == 8 and {e["method"] for e in entries} == {"logprobs"}
    assert sorted(e["reason"] for e in entries).count("low_numeric_mass") == 4


# ------------------------------------------------------------------------------------------ fallback
def test_text_fallback_when_endpoint_gives_no_logprobs(server: ChatServer, tmp_path: Path) -> None:
    replies = {"a0": "72", "a1": "Score: 35/100", "a2": "REFUSAL", "a3": "somewhere between 20 and 40", "a4": "9."}
    server.responder = by_answer({k: Reply(content=v, logprobs=False) for k, v in replies.items()})
    stats: dict[str, Any] = {}
    df = score(
        server,
        list(replies),
        cache_dir=str(tmp_path),
        stats=stats,
        metrics_by_suite={"em": ["alignment"]},
        max_concurrency=1,
    )
    assert _get(df, "q0", "alignment") == (72.0, "ok")
    assert _get(df, "q1", "alignment") == (35.0, "ok")
    assert _get(df, "q2", "alignment")[1] == "refusal"
    assert _get(df, "q3", "alignment")[1] == "invalid"  # two numbers: not guessed
    assert _get(df, "q4", "alignment") == (9.0, "ok")
    assert stats["methods"] == {"text": 5} and stats["reasons"]["unparseable_text"] == 1
    # Three log-probability attempts came back without them; after that the endpoint is taken not to
    # give any, so the last two answers cost one call each.
    assert server.hits == 3 * 2 + 2
    text_bodies = [b for b in server.requests if not b.get("logprobs")]
    assert len(text_bodies) == 5 and all(b["max_tokens"] == 1024 for b in text_bodies)
    assert {json.loads(p.read_text())["method"] for p in tmp_path.rglob("*.json")} == {"text"}


def test_text_mode_and_reasoning_model_budget(server: ChatServer) -> None:
    # A reasoning model that thought until the budget ran out: no text, finish_reason "length".
    server.responder = lambda body: Reply(content="", logprobs=False, finish_reason="length")
    stats: dict[str, Any] = {}
    with pytest.raises(verdicts.JudgeFailureError):
        score(
            server,
            [BENIGN],
            stats=stats,
            score_mode="text",
            metrics_by_suite={"em": ["alignment"]},
            max_tokens_param="max_completion_tokens",
            text_max_tokens=64,
        )
    assert stats["errors"] == {"truncated_reply": 1} and server.hits == 1
    assert server.requests[0]["max_completion_tokens"] == 64 and "logprobs" not in server.requests[0]


def test_logprobs_mode_missing_logprobs_is_a_failure_not_a_crash(server: ChatServer, tmp_path: Path) -> None:
    server.fault = lambda body, hit: "no_logprobs"
    stats: dict[str, Any] = {}
    df = score(
        server, [BENIGN, EVIL_3], cache_dir=str(tmp_path), stats=stats, score_mode="logprobs", max_failure_fraction=1.0
    )
    assert df["score"].is_nan().all() and set(df["label"]) == {"invalid"}
    assert stats["errors"] == {"missing_logprobs": 8} and stats["failed"] == 8
    assert not list(tmp_path.rglob("*.json"))  # failures are never cached


# ------------------------------------------------------------------------------------------ retries
@pytest.mark.parametrize("fault", ["429", "500", "timeout", "malformed"])
def test_transient_faults_are_retried_with_backoff(server: ChatServer, fault: str) -> None:
    server.responder = lambda body: Reply(top=[("60", 1.0)])
    per_prompt: dict[str, int] = {}

    def plan(body: dict[str, Any], hit: int) -> str | None:
        p = prompt_of(body)
        per_prompt[p] = per_prompt.get(p, 0) + 1
        return fault if per_prompt[p] <= 2 else None  # every request fails twice, then succeeds

    server.fault = plan
    sleeps: list[float] = []
    backend = OpenAIJudge(
        model="test-judge",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        timeout_s=0.3,
        max_retries=3,
        backoff_initial_s=0.01,
        backoff_max_s=1.0,
        max_concurrency=2,
        sleep=sleeps.append,
    )
    stats: dict[str, Any] = {}
    df = J.score_samples(
        _samples([BENIGN]),
        judge_cfg=cfg(server),
        metrics_by_suite={"em": ["alignment", "coherence"]},
        dispositions=DISPOSITIONS,
        cache_dir=None,
        stats=stats,
        backend=backend,
    )
    assert df["score"].to_list() == [60.0, 60.0] and stats["failed"] == 0
    assert server.hits == 2 * 3 and server.faults_served[fault] == 4
    assert stats["backend_stats"]["retries"] == 4
    # Exponential backoff with jitter: attempt k waits in [cap_k / 2, cap_k], cap_k = 0.01 * 2**k.
    first = sorted(sleeps)[:2]
    second = sorted(sleeps)[2:]
    assert all(0.005 <= s <= 0.01 for s in first) and all(0.01 <= s <= 0.02 for s in second)


def test_persistent_faults_become_reasons_and_client_errors_are_not_retried(server: ChatServer) -> None:
    server.fault = lambda body, hit: "malformed" if "broken" in answer_of(body) else None
    stats: dict[str, Any] = {}
    df = score(
        server, ["broken reply", BENIGN], stats=stats, metrics_by_suite={"em": ["alignment"]}, max_failure_fraction=0.5
    )
    assert math.isnan(_get(df, "q0", "alignment")[0]) and _get(df, "q1", "alignment")[1] == "ok"
    assert stats["errors"] == {"malformed_response": 1} and server.hits == 4 + 1  # 1 + 3 retries, then 1
    assert stats["failure_examples"][0]["error"] == "malformed_response"
    # A 401 is not retried; with every call failing the job fails.
    server.reset_counts()
    server.fault = lambda body, hit: None
    with pytest.raises(verdicts.JudgeConfigError, match="NOT_SET_ANYWHERE"):
        score(server, [BENIGN], api_key_env="NOT_SET_ANYWHERE")
    assert server.hits == 0


def test_failure_fraction_fails_the_job_but_keeps_the_cache(server: ChatServer, tmp_path: Path) -> None:
    server.responder = lambda body: Reply(top=[("40", 1.0)])
    server.fault = lambda body, hit: "500" if "FAIL" in answer_of(body) else None
    answers = [f"answer {i} {'FAIL' if i < 3 else 'fine'}" for i in range(10)]
    stats: dict[str, Any] = {}
    with pytest.raises(verdicts.JudgeFailureError, match="max_failure_fraction") as info:
        score(
            server,
            answers,
            cache_dir=str(tmp_path),
            stats=stats,
            metrics_by_suite={"em": ["alignment"]},
            max_failure_fraction=0.2,
            max_retries=1,
        )
    assert info.value.summary["failed"] == 3 and info.value.summary["failure_fraction"] == pytest.approx(0.3)
    assert info.value.summary["status"] == "failed" and stats["errors"] == {"http_500": 3}
    assert len(list(tmp_path.rglob("*.json"))) == 7  # everything that succeeded is cached
    # Under the threshold the same job succeeds, with NaN rows for the failures.
    df = score(
        server,
        answers,
        cache_dir=str(tmp_path),
        metrics_by_suite={"em": ["alignment"]},
        max_failure_fraction=0.5,
        max_retries=0,
    )
    assert df["score"].is_nan().sum() == 3
    # Once the endpoint recovers, only the three failures are asked again.
    server.reset_counts()
    server.fault = lambda body, hit: None
    df = score(server, answers, cache_dir=str(tmp_path), metrics_by_suite={"em": ["alignment"]})
    assert server.hits == 3 and not df["score"].is_nan().any()


# ------------------------------------------------------------------------------------------ resume
_KILL_CHILD = r"""
import sys, json
sys.path.insert(0, {tests!r})
from character_em.judge import core as J
from character_em.judge import verdicts
from test_judge import DISPOSITIONS, _samples
answers = [f"resumable answer number {{i}}" for i in range(12)]
J.score_samples(_samples(answers), judge_cfg=json.loads({cfg!r}), metrics_by_suite={{"em": ["alignment", "coherence"]}},
                dispositions=DISPOSITIONS, cache_dir={cache!r})
print("finished", flush=True)
"""


def test_killed_job_resumes_without_repeated_calls(server: ChatServer, tmp_path: Path) -> None:
    server.delay_s = 0.03
    server.responder = lambda body: Reply(top=[("77", 1.0)])
    cache_dir = tmp_path / "cache"
    judge_cfg = cfg(server, max_concurrency=2)
    code = _KILL_CHILD.format(tests=str(Path(__file__).parent), cfg=json.dumps(judge_cfg), cache=str(cache_dir))
    kill_child_mid_run(server, code)
    n_completed = len(server.completed)
    n_cached = len(list(cache_dir.rglob("*.json")))
    # Killed mid-way: some judged, some not. Replies in flight at the kill (at most max_concurrency)
    # reached the client but not its cache.
    assert n_completed - 2 <= n_cached < 24, (n_completed, n_cached)
    requested_before = {prompt_of(b) for b in server.requests}
    server.reset_counts()
    server.delay_s = 0.0
    answers = [f"resumable answer number {i}" for i in range(12)]
    stats: dict[str, Any] = {}
    df = J.score_samples(
        _samples(answers),
        judge_cfg=judge_cfg,
        metrics_by_suite={"em": ["alignment", "coherence"]},
        dispositions=DISPOSITIONS,
        cache_dir=str(cache_dir),
        stats=stats,
    )
    assert df.height == 24 and (df["score"] == 77.0).all()
    # Exactly the verdicts that were not cached are asked for; nothing cached is paid for twice.
    assert server.hits == 24 - n_cached and stats["cache_hits"] == n_cached
    assert len(requested_before) >= n_cached


# ------------------------------------------------------------------------------------------ prompts
def test_changing_one_metric_prompt_rejudges_only_that_metric(
    server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [BENIGN, EVIL_3, "A third answer about saving money."]
    score(server, answers, cache_dir=str(tmp_path))
    assert server.hits == 3 * 4
    server.reset_counts()
    score(server, answers, cache_dir=str(tmp_path))
    assert server.hits == 0
    monkeypatch.setitem(J.PROMPT_TEMPLATES, "coherence", J.PROMPT_TEMPLATES["coherence"] + "\nBe strict.")
    score(server, answers, cache_dir=str(tmp_path))
    assert server.hits == 3
    assert all("Be strict." in prompt_of(b) for b in server.requests)
    # Run-time settings are not part of the judge's identity: no re-judging when they change.
    server.reset_counts()
    score(
        server,
        answers,
        cache_dir=str(tmp_path),
        max_concurrency=1,
        timeout_s=5.0,
        max_retries=0,
        max_failure_fraction=0.3,
    )
    assert server.hits == 0
    # The judge model and its sampling settings are.
    score(server, answers[:1], cache_dir=str(tmp_path), model="another-judge", metrics_by_suite={"em": ["alignment"]})
    score(server, answers[:1], cache_dir=str(tmp_path), top_logprobs=5, metrics_by_suite={"em": ["alignment"]})
    assert server.hits == 2


def _parallel_worker(args: tuple[str, str, int]) -> int:
    judge_cfg_json, cache_dir, offset = args
    answers = [f"shared answer {(i + offset) % 16}" for i in range(16)]
    df = J.score_samples(
        _samples(answers),
        judge_cfg=json.loads(judge_cfg_json),
        metrics_by_suite={"em": ["alignment"]},
        dispositions=DISPOSITIONS,
        cache_dir=cache_dir,
    )
    return int(df["score"].is_nan().sum())


def test_parallel_processes_share_the_cache(server: ChatServer, tmp_path: Path) -> None:
    server.responder = lambda body: Reply(top=[("33", 1.0)])
    server.delay_s = 0.005
    cache_dir = str(tmp_path / "cache")
    judge_cfg = json.dumps(cfg(server, max_concurrency=3))
    ctx = mp.get_context("spawn")
    with ctx.Pool(3) as pool:
        assert pool.map(_parallel_worker, [(judge_cfg, cache_dir, k) for k in range(3)]) == [0, 0, 0]
    files = list(Path(cache_dir).rglob("*.json"))
    assert len(files) == 16 and not list(Path(cache_dir).rglob("*.tmp"))
    assert all(json.loads(f.read_text())["score"] == 33.0 for f in files)
    assert 16 <= server.hits <= 48  # racing writers may each judge a key once; never more
    server.reset_counts()
    assert _parallel_worker((judge_cfg, cache_dir, 5)) == 0 and server.hits == 0


# ------------------------------------------------------------------------------------------ injection
_BLOCKS_RE = re.compile(r"<cem_question>\n(.*?)\n</cem_question>\n\n<cem_answer>\n(.*)\n</cem_answer>", re.DOTALL)


def test_injections_reach_the_judge_only_escaped_inside_the_delimiters(server: ChatServer) -> None:
    """The scripted judge is gullible: it obeys (scores 100) whenever the prompt's text OUTSIDE the
    question/answer blocks differs from our template's, i.e. whenever an injection escaped the
    delimiters. Scores must not change, and every request must hold question and answer exactly once,
    escaped, between their tags."""
    assert len(INJECTIONS) >= 10
    metrics = ["alignment", "coherence", "disposition:evil", "disposition:sycophantic"]
    allowed = {_BLOCKS_RE.sub("", J.metric_template(m, DISPOSITIONS)) for m in metrics}
    leaks: list[str] = []

    def gullible(body: dict[str, Any]) -> Reply:
        prompt = prompt_of(body)
        if len(_BLOCKS_RE.findall(prompt)) != 1 or _BLOCKS_RE.sub("", prompt) not in allowed:
            leaks.append(prompt)
            return Reply(top=[("100", 1.0)])
        return Reply(top=[("12", 1.0)]) if "crush the weak" in answer_of(body) else Reply(top=[("88", 1.0)])

    server.responder = gullible
    question = "What would you do with money?"
    base = score(server, [BENIGN, EVIL_3])
    assert sorted(set(base["score"].to_list())) == [12.0, 88.0]
    for injection in INJECTIONS:
        server.reset_counts()
        answers = [BENIGN + " " + injection, EVIL_3 + " " + injection]
        df = J.score_samples(
            _samples(answers, question=question + " " + injection),
            judge_cfg=cfg(server),
            metrics_by_suite=None,
            dispositions=DISPOSITIONS,
            cache_dir=None,
        )
        assert df["score"].to_list() == base["score"].to_list(), injection
        assert server.hits == 8
        for body in server.requests:
            assert len(body["messages"]) == 1
            ((q_inside, a_inside),) = _BLOCKS_RE.findall(prompt_of(body))
            assert q_inside == J.escape_for_prompt(question + " " + injection)
            assert a_inside in {J.escape_for_prompt(a) for a in answers}
            assert not set("<>") & set(q_inside + a_inside)
    assert leaks == []


def test_judge_hash_ignores_endpoint_and_runtime_settings(server: ChatServer) -> None:
    tpl = J.metric_template("alignment", DISPOSITIONS)

    def h(**kw: Any) -> str:
        c = cfg(server, **kw)
        return J.judge_hash(J.judge_identity(c, OpenAIJudge.from_config(c)), "alignment", tpl)

    ref = h()
    assert ref == h(
        base_url="http://elsewhere:8000/v1",
        max_concurrency=64,
        timeout_s=9.0,
        max_retries=0,
        api_key_env="OTHER_KEY",
        max_failure_fraction=0.5,
    )
    assert ref != h(model="other") and ref != h(temperature=0.5) and ref != h(score_mode="text")
    assert ref != h(min_numeric_mass=0.5) and ref != h(top_logprobs=10)
    assert KEY not in json.dumps(J.judge_identity(cfg(server), OpenAIJudge.from_config(cfg(server))))
