"""The judge hash names the judge: the hf judge's weights by content (or a pinned revision), the scoring
method, and an API judge whose tokenizer splits numbers into digits fails instead of scoring "85" as 8."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from character_em.judge import core as J
from character_em.judge import hf_backend
from character_em.judge.hf_backend import HFJudge, model_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ChatServer, Reply  # noqa: E402
from test_judge import DISPOSITIONS, _samples  # noqa: E402

KEY_ENV = "CEM_TEST_JUDGE_KEY"


@pytest.fixture(autouse=True)
def _private_digest_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hf_backend.FINGERPRINT_CACHE_ENV, str(tmp_path / "fingerprints"))
    hf_backend._DIGESTS.clear()  # noqa: SLF001 - the in-process memo, reset so each test hashes afresh


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from character_em.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", hidden_size=32, num_layers=2)


def _flip_one_weight_byte(folder: Path) -> None:
    weights = sorted(folder.glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte belongs to the last tensor's data, never to the header
    weights.write_bytes(bytes(data))


def test_fingerprint_changes_when_one_weight_byte_changes(tiny_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "judge"
    shutil.copytree(tiny_folder, copy)
    before = model_fingerprint(str(copy))
    assert before == model_fingerprint(str(tiny_folder)), "same bytes at another path: same judge"
    size = sum(f.stat().st_size for f in copy.glob("*.safetensors"))
    _flip_one_weight_byte(copy)
    assert sum(f.stat().st_size for f in copy.glob("*.safetensors")) == size  # names and sizes alike
    after = model_fingerprint(str(copy))
    assert after != before
    # The judge hash follows: the cache never serves the old judge's verdicts to the new one.
    cfg = {"backend": "hf", "model": str(copy)}
    tpl = J.metric_template("alignment", DISPOSITIONS)
    old_hash = J.judge_hash({**cfg, "params": {"fingerprint": before}}, "alignment", tpl)
    identity = J.judge_identity(cfg, HFJudge(model=str(copy)))
    assert identity["params"]["_backend"]["fingerprint"] == after
    assert J.judge_hash(identity, "alignment", tpl) != old_hash


def test_weight_digests_are_computed_once_per_file_version(tiny_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "judge"
    shutil.copytree(tiny_folder, copy)
    weights = sorted(copy.glob("*.safetensors"))[0]
    first = hf_backend.file_sha256(weights)
    records = list(Path(hf_backend._fingerprint_cache_dir()).glob("*.json"))  # noqa: SLF001
    assert len(records) == 1
    hf_backend._DIGESTS.clear()  # noqa: SLF001 - a new process: the on-disk record answers
    real_sha256 = hf_backend.hashlib.sha256
    calls: list[int] = []

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real_sha256(*args)

    hf_backend.hashlib.sha256 = counting  # type: ignore[assignment]
    try:
        assert hf_backend.file_sha256(weights) == first
    finally:
        hf_backend.hashlib.sha256 = real_sha256  # type: ignore[assignment]
    assert len(calls) == 1  # only the record's name is hashed, not the file's bytes


def test_a_hub_judge_is_named_by_its_pinned_revision() -> None:
    pinned = HFJudge(model="org/judge-70b", revision="a" * 40).effective_params()
    other = HFJudge(model="org/judge-70b", revision="b" * 40).effective_params()
    assert pinned["fingerprint"] == "revision:" + "a" * 40 and other["fingerprint"] != pinned["fingerprint"]
    assert HFJudge(model="org/judge-70b").effective_params()["fingerprint"] is None


def test_the_scoring_method_is_part_of_the_judge_hash() -> None:
    assert HFJudge(model="org/judge-70b", revision="a" * 40).effective_params()["scoring"] == "exact"
    pytest.importorskip("openai")
    from character_em.judge.openai_backend import OpenAIJudge

    tpl = J.metric_template("alignment", DISPOSITIONS)
    cfg = {"backend": "openai", "model": "m", "api_key_env": None}
    hashes = {
        mode: J.judge_hash(J.judge_identity(cfg, OpenAIJudge(model="m", api_key_env=None, score_mode=mode)), "x", tpl)
        for mode in ("logprobs", "text", "auto")
    }
    assert len(set(hashes.values())) == 3


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    pytest.importorskip("openai")
    monkeypatch.setenv(KEY_ENV, "sk-test-digits")
    with ChatServer() as srv:
        yield srv


def _judge_cfg(server: ChatServer) -> dict[str, Any]:
    return {
        "backend": "openai",
        "model": "digit-splitter",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "score_mode": "logprobs",
        "max_retries": 0,
        "max_failure_fraction": 0.0,
    }


def test_a_digit_splitting_api_judge_fails_and_caches_nothing(server: ChatServer, tmp_path: Path) -> None:
    from character_em.judge.openai_backend import DIGIT_SPLIT_EVIDENCE, DigitSplitError

    # A tokenizer that spells 85 as "8" then "5": the first token's top list holds single digits only.
    server.responder = lambda body: Reply(top=[("8", 0.7), ("9", 0.2), ("7", 0.1)])
    answers = [f"Answer number {i} about saving money." for i in range(DIGIT_SPLIT_EVIDENCE + 4)]
    with pytest.raises(DigitSplitError) as caught:
        J.score_samples(
            _samples(answers),
            judge_cfg=_judge_cfg(server),
            metrics_by_suite={"em": ["alignment"]},
            dispositions=DISPOSITIONS,
            cache_dir=str(tmp_path / "cache"),
        )
    message = str(caught.value)
    assert "splits numbers into digits" in message and "85 as 8" in message
    assert "judge.backend: hf" in message and "vLLM" in message
    assert not list((tmp_path / "cache").rglob("*.json")), "a first-digit score reached the cache"


def test_a_whole_number_tokenizer_scores_normally(server: ChatServer, tmp_path: Path) -> None:
    # The same judge with one-token numbers: a reply of 85 is 85, and single digits elsewhere are fine.
    replies = iter([Reply(top=[("85", 0.9), ("8", 0.1)])] + [Reply(top=[("5", 1.0)])] * 20)
    server.responder = lambda body: next(replies)
    df = J.score_samples(
        _samples([f"Answer {i}." for i in range(12)]),
        judge_cfg={**_judge_cfg(server), "max_concurrency": 1},
        metrics_by_suite={"em": ["alignment"]},
        dispositions=DISPOSITIONS,
        cache_dir=str(tmp_path / "cache"),
    )
    assert df.height == 12 and sorted(df["score"].to_list())[-1] == pytest.approx(0.9 * 85 + 0.1 * 8)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 12
