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
    # A model judge scores a model's steered answers in one judge_steering job, one engine counted as a
    # judge wave is (the prompt tokens it prefills, one 70B load): the steering jobs stay generation only.
    judged_config = config_with(judge={"backend": "hf", "model": "org/judge-70b"})
    judged = est.estimate(judged_config, None)
    assert stage(judged, "steer")["throughput"].value == pytest.approx(steer["throughput"].value)
    judging = stage(judged, "judge_steering")
    one = est.judge_tokens(
        est.judge_prompt_parts(judged_config),
        "em",
        40,
        backend="hf",
        scoring=judged["judge_engine"]["scoring"],
        answers_per_question=defaults["n_samples"],
        kv_block_tokens=judged["judge_engine"]["kv_block_tokens"],
    )
    assert judging["jobs"] == judging["loads"] == 1
    assert judging["units"] == pytest.approx(sum(jobs.values()) * one["computed"])
    judge_load = est.engine_load_minutes(70, est.DEFAULT_LOAD_MINUTES)
    assert judge_load == 5 * est.DEFAULT_LOAD_MINUTES and judging["load_minutes"] == judge_load
    assert est.job_minutes(judged, "judge_steering") == {
        (MODEL, "all"): pytest.approx(
            sum(jobs.values()) * one["computed"] / judging["throughput"].value / 60 + judge_load
        )
    }
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
    # Each condition's pool: n_examples x data.pool_factor (default 2) planned turns.
    assert data["units"] == data["jobs"] * 20 * 2 * 100
    assert data["throughput"].value == pytest.approx(est._generate_anchor(16) * 8 / 7)
    # The 32B judge also judges the training data (rule judge_training_data, a job per condition) and
    # the calibration set (judge_calibration), each job loading it.
    others = {job["stage"]: job for job in result["judge_jobs"]}
    assert set(others) == {"judge_training_data", "judge_calibration"}
    assert others["judge_training_data"]["jobs"] == data["jobs"] and others["judge_calibration"]["jobs"] == 1
    assert result["gpu_hours"] == pytest.approx(
        sum(m["gpu_hours"] for m in result["models"].values())
        + data["gpu_hours"]
        + sum(job["gpu_hours"] for job in others.values())
    )
    judge = stage(result, "judge")
    assert judge["throughput"].value == pytest.approx(est.ANCHORS["forward_tokens_per_s"] * 8 / 32)
    assert "judge ~32B" in judge["throughput"].source
    text = est.render_markdown(result, "small.yaml", {})
    assert (
        "## Other GPU jobs: model-written data and judging outside the waves" in text
        and "| generate_data_gpu | 4 |" in text
    )
    # A vLLM writer: the same answers, at the engine's rate (no GPU measurement here: vLLM's published figure,
    # without the LoRA penalty since the writer serves no adapter).
    config["data"]["generator"] = {**config["data"]["generator"], "backend": "vllm"}
    data = est.estimate(config, runs_root=None)["data_generation"]
    assert data["units"] == data["jobs"] * 20 * 2 * 100
    assert data["throughput"].value == pytest.approx(est.VLLM_PUBLISHED_NEW_TOKENS_PER_S * 8 / 7)
    assert data["throughput"].basis == "anchored" and "no adapter, so no LoRA cost" in data["throughput"].source


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


def test_sample_wave_minutes_agree_with_the_estimate() -> None:
    config = small_config()
    minutes = est.sample_wave_minutes(config, runs_root=None)
    result = est.estimate(config, runs_root=None)
    # A wave's sampling job: every answer of one seed at max_new_tokens (40), and one hf load per adapter and
    # one for the base model; its job asks for that.
    sample = stage(result, "sample")
    assert minutes[MODEL] == pytest.approx(sample["largest_job_hours"] * 60)
    assert minutes[MODEL] == pytest.approx(est.job_minutes(result, "sample")[(MODEL, "wave")])
    answers = result["work"]["models"][MODEL]["sample"]["answers_per_wave"]
    assert minutes[MODEL] == pytest.approx(
        answers * 40 / sample["throughput"].value / 60 + 5 * est.DEFAULT_LOAD_MINUTES
    )
    # A vllm model loads one engine for the whole wave, at vLLM's rate.
    config = config_with(sampling={"backend": "vllm"})
    vllm_rate = stage(est.estimate(config, runs_root=None), "sample")["throughput"].value
    vllm = est.sample_wave_minutes(config, runs_root=None)
    assert vllm[MODEL] == pytest.approx(answers * 40 / vllm_rate / 60 + est.DEFAULT_LOAD_MINUTES)
    assert est.runtime_request(0.1) == est.MIN_RUNTIME_MINUTES
    assert est.runtime_request(100) == 150 and est.runtime_request(100, cap_minutes=120) == 120


def test_judge_waves_expect_their_own_time_from_the_tokens_they_prefill() -> None:
    config = config_with(judge={"backend": "hf", "model": "org/judge-70b"})
    result = est.estimate(config, runs_root=None)
    judge = stage(result, "judge")
    work = result["work"]["models"][MODEL]["judge"]
    parts = est.judge_prompt_parts(config)
    # The hf judge reads every metric's whole prompt, exactly scored (a 70B id is not known to spell
    # numbers as single tokens); answers at max_new_tokens (40).
    per_wave = sum(
        n * est.judge_tokens(parts, suite, 40, backend="hf", scoring="exact")["computed"]
        for suite, n in work["answers_per_wave"].items()
    )
    assert judge["jobs"] == judge["loads"] == 2 and judge["units"] == pytest.approx(2 * per_wave)
    rate = est.ANCHORS["forward_tokens_per_s"] * 8 / 70
    assert judge["throughput"].value == pytest.approx(rate)
    wave = per_wave / rate / 60 + est.engine_load_minutes(70, est.DEFAULT_LOAD_MINUTES)
    assert est.job_minutes(result, "judge") == {(MODEL, "wave"): pytest.approx(wave)}
    assert judge["largest_job_hours"] == pytest.approx(wave / 60)
    # The longest-job table takes the judge's request from the same expectation, as for sampling.
    rows = {row["rule"]: row for row in est.longest_jobs(result, {"judge": 720})}
    assert rows["judge"]["runtime"] == 720 and rows["judge"]["runtime_source"] == "profiles/default/config.yaml"
    rows = {row["rule"]: row for row in est.longest_jobs(result, {})}
    assert rows["judge"]["runtime"] == est.runtime_request(wave)
    assert rows["judge"]["runtime_source"].endswith("(rules/judge.smk)")
    # A site's partition limit: the table says whether each longest job fits it.
    capped = {row["rule"]: row for row in est.longest_jobs(result, {}, cap_minutes=1)}
    assert capped["judge"]["fits_cap"] is False and capped["judge"]["runtime"] == 1
    # A rubric judge has no GPU stage and asks for the fixed off-GPU time, capped like the rest.
    assert est.job_minutes(est.estimate(small_config(), None), "judge") == {}
    assert est.judge_runtime_request(None) == est.OFF_GPU_JUDGE_RUNTIME
    assert est.judge_runtime_request(None, cap_minutes=60) == 60
    assert est.judge_runtime_request(wave) == est.runtime_request(wave)


def test_judge_tokens_are_counted_as_the_engine_receives_them() -> None:
    config = config_with(judge={"backend": "vllm", "model": "org/Llama-3.3-70B", "quantization": "fp8"})
    parts = est.judge_prompt_parts(config)
    em = parts["suites"]["em"]
    # Measured on the judge's own templates: every metric's prompt holds the question and the answer in
    # the part they share; each metric's instruction follows the answer.
    assert em["shared"]["question"]["question"] == 1 and em["shared"]["answer"]["answer"] == 1
    assert em["shared"]["head"]["chars"] > 100 and all(p["answer"] == 0 for p in em["suffix"].values())
    k = len(em["metrics"])
    first = est.judge_tokens(parts, "em", 600, backend="vllm", scoring="first-token")
    longer = est.judge_tokens(parts, "em", 700, backend="vllm", scoring="first-token")
    hf = est.judge_tokens(parts, "em", 600, backend="hf", scoring="first-token")
    hf_longer = est.judge_tokens(parts, "em", 700, backend="hf", scoring="first-token")
    # vLLM: one request per verdict; the answer is prefilled once for all metrics, the hf judge k times.
    assert first["requests"] == first["generated"] == k
    assert longer["computed"] - first["computed"] == pytest.approx(100)
    assert longer["sent"] - first["sent"] == pytest.approx(100 * k)
    assert hf_longer["computed"] - hf["computed"] == pytest.approx(100 * k) and hf["cached"] == 0
    assert first["cached"] == pytest.approx(first["sent"] - first["computed"]) and first["cached"] > 0
    # Answers to one question sit together: its prompt part is prefilled once for them all.
    together = est.judge_tokens(parts, "em", 600, backend="vllm", scoring="first-token", answers_per_question=50)
    assert together["computed"] < first["computed"] and together["sent"] == first["sent"]
    # Exact: a request per node of each metric's candidate tree; the audit adds that share of it.
    exact = est.judge_tokens(parts, "em", 600, backend="vllm", scoring="exact")
    assert exact["requests"] == pytest.approx(k * 102 + est.ESCAPE_TOKENS * 2 * 1)
    audited = est.judge_tokens(parts, "em", 600, backend="vllm", scoring="first-token", audit=0.01)
    assert first["computed"] < audited["computed"] < first["computed"] + 0.02 * exact["computed"]
    # The config's judge: first-token (a Llama 3 id), FP8 at the published prefill rate.
    result = est.estimate(config, runs_root=None)
    judge = stage(result, "judge")
    assert result["judge_engine"]["scoring"] == "first-token" and judge["throughput"].basis == "anchored"
    assert judge["throughput"].value == pytest.approx(est.PUBLISHED["judge_prefill"]["value"])
    assert judge["tokens_per_wave"]["loads"] == 1


@pytest.mark.slow
def test_each_sampling_job_asks_for_its_own_expected_time(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL, sort_keys=False))
    out = snakemake(workdir, "-n", "--cores", "1", "--configfile", "small.yaml", timeout=300).stdout
    # The steering jobs the estimate counts are the DAG's.
    assert planned_jobs(out)["steer"] == stage(est.estimate(small_config(), runs_root=None), "steer")["jobs"]
    minutes = est.sample_wave_minutes(small_config(), runs_root=None)
    requested = {}
    for block in out.split("\nrule sample:")[1:]:
        seed = re.search(r"seed=(\d+)", block).group(1)
        requested[seed] = int(re.search(r"runtime=(\d+)", block).group(1))
    # One job per seed, each asking for its wave's expected time.
    assert requested == {"0": est.runtime_request(minutes[MODEL]), "1": est.runtime_request(minutes[MODEL])}
    # The rubric judge is no model on a GPU: its jobs ask for the fixed off-GPU time.
    assert set(judge_runtimes(out).values()) == {est.OFF_GPU_JUDGE_RUNTIME}


def judge_runtimes(dry_run: str) -> dict[str, int]:
    """seed -> the runtime the dry run's judge jobs (one per wave) ask for."""
    requested: dict[str, int] = {}
    for block in dry_run.split("\nrule judge:")[1:]:
        seed = re.search(r"seed=(\d+)", block).group(1)
        requested[seed] = int(re.search(r"runtime=(\d+)", block).group(1))
    assert requested, dry_run[-2000:]
    return requested


@pytest.mark.slow
def test_each_model_judge_job_asks_for_its_own_expected_time(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    raw = {**json.loads(json.dumps(SMALL)), "judge": {"backend": "hf", "model": "org/judge-70b", "quantization": "nf4"}}
    (workdir / "small.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = snakemake(workdir, "-n", "--cores", "1", "--configfile", "small.yaml", "--until", "judge", timeout=300)
    minutes = est.job_minutes(est.estimate(cfg.validate_config(raw, source="small.yaml"), None), "judge")
    expected = est.runtime_request(minutes[(MODEL, "wave")])
    assert judge_runtimes(out.stdout) == {"0": expected, "1": expected}
