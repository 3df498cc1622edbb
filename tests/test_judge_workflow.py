"""A real Snakemake judge job (and the judge_calibration rule) against the local chat-completions server,
with the API key in an environment variable: the key is used, and never lands in params, logs, results,
caches or .snakemake metadata. Also: a job over the failure threshold fails, keeps its cache and its
log, and the rerun asks only for what failed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

pytest.importorskip("openai")  # the optional `api` extra

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import ChatServer, Reply, answer_of  # noqa: E402
from test_judge import _samples  # noqa: E402
from workflow_helpers import ROOT, copy_workflow  # noqa: E402

KEY_ENV = "CEM_WORKFLOW_JUDGE_KEY"
KEY = "sk-live-DO-NOT-LEAK-7f3a9c2e51b84d06"
SCORES = "results/scores/tiny-llama/base/seed0/em.parquet"
SUMMARY = "results/scores/tiny-llama/base/seed0/em.judge.json"
SNAKEFILE = """\
# Test-only workflow: the project's judge and calibration rules, nothing upstream of the samples.
configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/judge.smk"
include: "rules/calibration.smk"
"""


def _run(workdir: Path, *targets: str, env_key: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    if env_key:
        env[KEY_ENV] = KEY
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        "Snakefile.judge_test",
        "--cores",
        "1",
        "--skip-script-cleanup",
        *targets,
    ]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)


def _setup(tmp_path: Path, server: ChatServer) -> Path:
    work = copy_workflow(tmp_path / "wf")
    (work / "Snakefile.judge_test").write_text(SNAKEFILE)
    config = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    config["judge"] = {
        "backend": "openai",
        "model": "test-judge",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "timeout_s": 2.0,
        "max_retries": 1,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.02,
        "max_concurrency": 4,
        "max_failure_fraction": 0.1,
        "cache_dir": ".cache/judge",
        "agreement_with": {"backend": "rubric"},
    }
    # One wave of one Samples file: the base model's em answers (its judge job judges every file of its wave).
    config["conditions"] = ["base"]
    config["eval"]["suites"] = ["em"]
    del config["train"]["eval_steps"]
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    answers = [f"I would save answer {i} for my family." for i in range(4)] + ["FAIL one", "FAIL two"]
    samples = _samples(answers)
    target = work / "results/samples/tiny-llama/base/seed0/em.parquet"
    target.parent.mkdir(parents=True)
    samples.write_parquet(target)
    return work


def _grep_everything(work: Path, *texts: str) -> list[str]:
    """Files under the work dir containing any of ``texts`` (raw, or base64 as .snakemake stores names)."""
    needles = [t.encode() for t in texts] + [base64.b64encode(t.encode()) for t in texts]
    hits = []
    for path in work.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                hits.append(str(path.relative_to(work)))
    return hits


def test_snakemake_judge_job_keeps_the_key_secret_and_fails_safely(tmp_path: Path) -> None:
    with ChatServer() as server:
        server.responder = lambda body: Reply(top=[("64", 0.8), ("70", 0.2)])
        server.fault = lambda body, hit: "500" if "FAIL" in answer_of(body) else None
        work = _setup(tmp_path, server)

        # 1. Two of six answers fail on every call (3 metrics each: the smoke preset has one disposition):
        # 6 of 18 requests > 10%: the job fails.
        first = _run(work, SCORES)
        assert first.returncode != 0
        assert not (work / SCORES).exists()
        log_text = (work / "logs/judge/tiny-llama/seed0.log").read_text()
        assert "judge summary" in log_text and "http_500" in log_text and "max_failure_fraction" in log_text
        cache_files = list((work / ".cache/judge").rglob("*.json"))
        assert len(cache_files) == 12  # the 4 good answers x 3 metrics survived the failed job
        assert all(h == f"Bearer {KEY}" for h in server.auth_headers)  # the key is really used

        # 2. The endpoint recovers: the rerun asks only for what failed, then calibration runs.
        server.fault = lambda body, hit: None
        server.reset_counts()
        second = _run(work, SCORES, SUMMARY, "results/tables/judge_calibration.csv")
        assert second.returncode == 0, second.stderr[-4000:]
        n_judge_calls = sum(1 for b in server.requests if "FAIL" in answer_of(b))
        assert n_judge_calls == 6
        scores = pl.read_parquet(work / SCORES)
        assert scores.height == 18 and (scores["score"] == 64 * 0.8 / 1.0 + 70 * 0.2).all()
        summary = json.loads((work / SUMMARY).read_text())
        assert summary["cache_hits"] == 12 and summary["judged"] == 6 and summary["status"] == "ok"
        assert summary["methods"] == {"logprobs": 18}
        table = pl.read_csv(work / "results/tables/judge_calibration.csv")
        assert set(table["kind"]) == {"accuracy", "agreement"}
        assert set(table["judge_backend"]) >= {"openai", "rubric", "openai~rubric"}

        # 3. Nothing more to do.
        third = subprocess.run(
            [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                "Snakefile.judge_test",
                "-n",
                SCORES,
                SUMMARY,
                "results/tables/judge_calibration.csv",
            ],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, KEY_ENV: KEY},
        )
        assert "Nothing to be done" in third.stdout + third.stderr

        # 4. The key is nowhere: not in outputs, logs, cache, benchmark files, .snakemake metadata or
        # the kept job scripts (which embed the job's params), nor in Snakemake's own output.
        assert (work / ".snakemake" / "metadata").is_dir() and list((work / ".snakemake" / "scripts").iterdir())
        assert _grep_everything(work, KEY) == []
        for proc in (first, second, third):
            assert KEY not in proc.stdout and KEY not in proc.stderr
        # What travels instead is the variable's NAME.
        params_seen: list[Any] = []
        for meta in (work / ".snakemake" / "metadata").iterdir():
            record = json.loads(meta.read_text())
            if record.get("rule") == "judge":
                params_seen.append(record.get("params"))
        assert params_seen and all(KEY_ENV in json.dumps(p) for p in params_seen)

        # 5. Without the variable, a job that must call the endpoint fails with a message naming it.
        # (One whose verdicts are all cached needs no key: the client is only built for real calls.)
        (work / SCORES).unlink()
        for f in (work / ".cache/judge").rglob("*.json"):
            f.unlink()
        fourth = _run(work, SCORES, env_key=False)
        assert fourth.returncode != 0
        assert f"{KEY_ENV!r}, which is not set" in (work / "logs/judge/tiny-llama/seed0.log").read_text()
