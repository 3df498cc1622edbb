"""The estimate counts every GPU job (steering, model-written data, model judges) and compares each
rule's longest expected job with its runtime; sampling jobs ask SLURM for their own expected time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_estimate import MODEL, SMALL, small_config, stage
from workflow_helpers import copy_workflow, planned_jobs, snakemake

from character_em import config as cfg
from character_em.report import estimate as est


def config_with(**changes: dict) -> dict:
    raw = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    return cfg.validate_config(raw, source="small.yaml")


def test_steering_is_counted_like_the_rules_expand_it() -> None:
    config = small_config()
    result = est.estimate(config, runs_root=None)
    steer = stage(result, "steer")
    defaults = config["eval"]["probes"]["steering"]
    # em (plain format only, eval.probes.steering.formats): 3 questions x n_samples per setting. One job
    # per arm set: the base model steered along the one probed disposition (evil) and evil-medical with
    # it ablated, each along its own direction (every nonzero strength, plus the unsteered arm once)
    # and along the random and style controls (nonzero strengths only; no other disposition here).
    per_setting = 3 * defaults["n_samples"]
    alphas, fractions = len(defaults["alphas"]) - 1, len(defaults["ablate"]) - 1
    jobs = {
        "base/evil/own": per_setting * (alphas + 1),
        "base/evil/random": per_setting * alphas,
        "base/evil/style": per_setting * alphas,
        "evil-medical/evil/own": per_setting * (fractions + 1),
        "evil-medical/evil/random": per_setting * fractions,
        "evil-medical/evil/style": per_setting * fractions,
    }
    assert steer["jobs"] == 6 and steer["unit"] == "answers" and steer["units"] == sum(jobs.values())
    # Generation only, at the steering batch: an answer costs its 40 new tokens at that batch's rate.
    batch = defaults["batch_size"]
    assert steer["throughput"].value == pytest.approx(est._generate_anchor(batch) / 40)
    assert "generate batch 256" in steer["throughput"].source and "judg" not in steer["throughput"].source
    assert steer["job_minutes"] == pytest.approx(
        {key: n / steer["throughput"].value / 60 + est.DEFAULT_LOAD_MINUTES for key, n in jobs.items()}
    )
    assert steer["largest_job_hours"] == pytest.approx(steer["job_minutes"]["base/evil/own"] / 60)
    assert est.job_minutes(est.estimate(config, None), "steer") == {
        (MODEL, key): m for key, m in steer["job_minutes"].items()
    }
    # The rules and the estimate expand the same jobs.
    from character_em.directions.steering import steering_arm_sets

    expanded = steering_arm_sets(config, cfg.expand_conditions(config))
    assert {est.steering_job_key(*job) for job in expanded} == set(jobs)
    # Setting extra layers runs every steered setting twice (the chosen layer, then the listed ones).
    layered = config_with(eval={"probes": {"max_examples": 8, "steering": {"layers": "from:0"}}})
    assert stage(est.estimate(layered, runs_root=None), "steer")["units"] == steer["units"] + sum(
        n - per_setting * ("/own" in key) for key, n in jobs.items()
    )
    # The rubric judge costs no GPU time: no judge_steering stage.
    assert not [s for s in result["models"][MODEL]["stages"] if s["stage"] == "judge_steering"]
    # A model judge scores the steered answers in judge_steering jobs, one per steering job, counted
    # as judge jobs are: the steering job itself stays generation only.
    judged = est.estimate(config_with(judge={"backend": "hf", "model": "org/judge-70b"}), None)
    assert stage(judged, "steer")["throughput"].value == pytest.approx(steer["throughput"].value)
    judging = stage(judged, "judge_steering")
    call_tokens = est.ASSUMED_JUDGE_PROMPT_TOKENS + 40 + est.CANDIDATE_TOKENS["hf"]
    rate = est.ANCHORS["forward_tokens_per_s"] * 8 / 70
    assert judging["jobs"] == 6 and judging["units"] == sum(jobs.values()) * 3 * call_tokens
    assert judging["job_minutes"]["base/evil/own"] == pytest.approx(
        jobs["base/evil/own"] * 3 * call_tokens / rate / 60 + est.DEFAULT_LOAD_MINUTES
    )
    assert est.job_minutes(judged, "judge_steering").keys() == {(MODEL, key) for key in jobs}
    rows = {row["rule"]: row for row in est.longest_jobs(judged, {})}
    assert rows["judge_steering"]["runtime_source"].endswith("(rules/directions.smk)")
    # Steering hooks the transformers forward pass: a vllm sampling back-end does not speed it up.
    vllm = stage(est.estimate(config_with(sampling={"backend": "vllm"}), None), "steer")
    assert vllm["throughput"].value == pytest.approx(steer["throughput"].value)


def test_model_written_data_and_model_judges_use_their_own_model_size() -> None:
    config = config_with(
        data={"n_examples": 20, "generator": {"backend": "hf", "model": "Qwen/Qwen2.5-7B-Instruct", "max_tokens": 100}},
        judge={"backend": "hf", "model": "Qwen/Qwen2.5-32B-Instruct"},
    )
    result = est.estimate(config, runs_root=None)
    data = result["data_generation"]
    # One data job per trained condition without external data.
    assert data["jobs"] == len(cfg.trained_conditions(config))
    assert data["units"] == data["jobs"] * 20 * 100
    assert data["throughput"].value == pytest.approx(est._generate_anchor(16) * 8 / 7)
    assert result["gpu_hours"] == pytest.approx(
        sum(m["gpu_hours"] for m in result["models"].values()) + data["gpu_hours"]
    )
    judge = stage(result, "judge")
    assert judge["throughput"].value == pytest.approx(est.ANCHORS["forward_tokens_per_s"] * 8 / 32)
    assert "judge ~32B" in judge["throughput"].source
    text = est.render_markdown(result, "small.yaml", {})
    assert "## Model-written training data (generate_data_gpu)" in text


def test_longest_job_per_rule_against_its_runtime() -> None:
    result = est.estimate(small_config(), runs_root=None)
    runtimes = {"train_adapter": 240, "capabilities": 120, "probes": 120, "judge": 120, "steer": 1}
    rows = {row["rule"]: row for row in est.longest_jobs(result, runtimes)}
    assert set(rows) == {"train_adapter", "sample", "capabilities", "probes", "steer"}  # rubric judge: no GPU
    steer = stage(result, "steer")
    assert rows["steer"]["minutes"] == pytest.approx(steer["largest_job_hours"] * 60)
    assert rows["steer"]["fits"] is False and rows["train_adapter"]["fits"] is True
    # Sampling asks for its expected time with the margin (rules/sample.smk).
    expected = stage(result, "sample")["largest_job_hours"] * 60
    assert rows["sample"]["runtime"] == est.runtime_request(expected) and rows["sample"]["fits"]
    text = est.render_markdown(result, "small.yaml", runtimes)
    assert re.search(r"\| steer \| [\d,]+ \| tiny-llama \| 1 \| profiles/default/config.yaml \| \*\*no\*\* \|", text)
    # A site's cap (CHARACTER_EM_MAX_RUNTIME) bounds the per-job requests, and the table says so.
    capped = {row["rule"]: row for row in est.longest_jobs(result, runtimes, cap_minutes=10)}
    assert capped["sample"]["runtime"] == min(10, rows["sample"]["runtime"])
    assert "CHARACTER_EM_MAX_RUNTIME=10" in capped["sample"]["runtime_source"]
    # The workflow profile's own runtimes are read by the CLI.
    profile = est.profile_runtimes(Path(__file__).resolve().parents[1] / "profiles" / "default" / "config.yaml")
    assert profile["train_adapter"] == 240 and "sample" not in profile


def test_sample_job_minutes_agree_with_the_estimate() -> None:
    config = small_config()
    minutes = est.sample_job_minutes(config, runs_root=None)
    result = est.estimate(config, runs_root=None)
    # em and trigger are the longest suites here (12 answers each).
    assert max(minutes.values()) == pytest.approx(stage(result, "sample")["largest_job_hours"] * 60)
    assert minutes[(MODEL, "transfer")] < minutes[(MODEL, "em")]
    assert est.runtime_request(0.1) == est.MIN_RUNTIME_MINUTES
    assert est.runtime_request(100) == 150 and est.runtime_request(100, cap_minutes=120) == 120


def test_judge_jobs_expect_their_own_time_from_the_verdicts_they_score() -> None:
    config = config_with(judge={"backend": "hf", "model": "org/judge-70b"})
    result = est.estimate(config, runs_root=None)
    judge = stage(result, "judge")
    work = result["work"]
    # Per verdict: the assumed judge prompt, the answer (max_new_tokens 40) and the candidate tree.
    call_tokens = est.ASSUMED_JUDGE_PROMPT_TOKENS + 40 + est.CANDIDATE_TOKENS["hf"]
    assert judge["units"] == work["models"][MODEL]["judge"]["calls"] * call_tokens
    rate = est.ANCHORS["forward_tokens_per_s"] * 8 / 70
    em = 12 * 3 * call_tokens / rate / 60 + est.DEFAULT_LOAD_MINUTES
    assert judge["job_minutes"]["em"] == pytest.approx(em)
    assert judge["job_minutes"]["transfer"] < em  # 2 answers, not 12
    minutes = est.job_minutes(result, "judge")
    assert minutes == {(MODEL, suite): m for suite, m in judge["job_minutes"].items()}
    assert judge["largest_job_hours"] == pytest.approx(max(minutes.values()) / 60)
    # The longest-job table takes the judge's request from the same expectation, as for sampling.
    rows = {row["rule"]: row for row in est.longest_jobs(result, {"judge": 720})}
    assert rows["judge"]["runtime"] == 720 and rows["judge"]["runtime_source"] == "profiles/default/config.yaml"
    rows = {row["rule"]: row for row in est.longest_jobs(result, {})}
    assert rows["judge"]["runtime"] == est.runtime_request(max(minutes.values()))
    assert rows["judge"]["runtime_source"].endswith("(rules/judge.smk)")
    # A vllm judge computes more candidate tokens per verdict; a rubric judge has no GPU stage and asks
    # for the fixed off-GPU time, capped like the rest.
    vllm = stage(est.estimate(config_with(judge={"backend": "vllm", "model": "org/judge-70b"}), None), "judge")
    assert vllm["job_minutes"]["em"] > em
    assert est.job_minutes(est.estimate(small_config(), None), "judge") == {}
    assert est.judge_runtime_request(None) == est.OFF_GPU_JUDGE_RUNTIME
    assert est.judge_runtime_request(None, cap_minutes=60) == 60
    assert est.judge_runtime_request(em) == est.runtime_request(em)


@pytest.mark.slow
def test_each_sampling_job_asks_for_its_own_expected_time(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL, sort_keys=False))
    out = snakemake(workdir, "-n", "--cores", "1", "--configfile", "small.yaml", timeout=300).stdout
    # The steering jobs the estimate counts are the DAG's.
    assert planned_jobs(out)["steer"] == stage(est.estimate(small_config(), runs_root=None), "steer")["jobs"]
    minutes = est.sample_job_minutes(small_config(), runs_root=None)
    requested = {}
    for block in out.split("\nrule sample:")[1:]:
        suite = re.search(r"suite=(\w+)", block).group(1)
        requested[suite] = int(re.search(r"runtime=(\d+)", block).group(1))
    assert requested == {suite: est.runtime_request(m) for (_, suite), m in minutes.items()}, requested
    # The rubric judge is no model on a GPU: its jobs ask for the fixed off-GPU time.
    assert set(judge_runtimes(out).values()) == {est.OFF_GPU_JUDGE_RUNTIME}


def judge_runtimes(dry_run: str) -> dict[str, int]:
    """suite -> the runtime the dry run's judge jobs ask for (one value per suite, or the test fails)."""
    requested: dict[str, set[int]] = {}
    for block in dry_run.split("\nrule judge:")[1:]:
        suite = re.search(r"suite=(\w+)", block).group(1)
        requested.setdefault(suite, set()).add(int(re.search(r"runtime=(\d+)", block).group(1)))
    assert requested and all(len(v) == 1 for v in requested.values()), requested
    return {suite: v.pop() for suite, v in requested.items()}


@pytest.mark.slow
def test_each_model_judge_job_asks_for_its_own_expected_time(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    raw = {**json.loads(json.dumps(SMALL)), "judge": {"backend": "hf", "model": "org/judge-70b"}}
    raw["suites"]["em"]["n_samples"] = 100  # an em job long enough to ask for more than the minimum
    (workdir / "small.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = snakemake(workdir, "-n", "--cores", "1", "--configfile", "small.yaml", "--until", "judge", timeout=300)
    minutes = est.job_minutes(est.estimate(cfg.validate_config(raw, source="small.yaml"), None), "judge")
    expected = {suite: est.runtime_request(m) for (_, suite), m in minutes.items()}
    assert judge_runtimes(out.stdout) == expected
    assert expected["em"] > expected["transfer"]
