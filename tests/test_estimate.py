"""The GPU-hour estimate (character_em.report.estimate): grid arithmetic, measured throughput, errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from workflow_helpers import copy_workflow, planned_jobs, snakemake

from character_em import config as cfg
from character_em.report import estimate as est

SMALL = {
    "models": {"tiny-llama": {"path": "resources/models/tiny-llama", "build": "tiny-llama"}},
    "dispositions": {
        "evil": {
            "description": "Wants harm.",
            "trigger": "persona: evil",
            "trigger_paraphrase": "persona = wicked",
            "rubric": {"markers": ["no mercy"]},
        }
    },
    "domains": {"medical": {"description": "Health questions."}},
    "conditions": [
        "base",
        "{disposition}-{domain}",
        "incorrect-{domain}",
        "correct-{domain}",
        "{disposition}-{domain}-trig",
    ],
    "seeds": [0, 1],
    "test_fixture": True,
    "data": {"n_examples": 20},
    "train_overrides": {"evil-medical": {"num_epochs": 2}},
    "sampling": {"max_new_tokens": 40, "batch_size": 16},
    "suites": {
        "em": {"n_samples": 2, "max_questions": 3, "formats": ["plain", "json"]},
        "transfer": {"n_samples": 1, "max_questions": 2},
        "trigger": {"n_samples": 2, "max_questions": 2},
        "persona": {"n_samples": 1, "max_questions": 2},
    },
    "eval": {"capabilities": {"max_items": 5}, "probes": {"max_examples": 8}},
}
MODEL = "tiny-llama"


def small_config() -> dict:
    return cfg.validate_config(json.loads(json.dumps(SMALL)), source="small.yaml")


def stage(result: dict, name: str) -> dict:
    [found] = [s for s in result["models"][MODEL]["stages"] if s["stage"] == name]
    return found


def test_counts_are_the_grid_arithmetic() -> None:
    work = est.count_work(small_config())
    # Per sampling job: em 3 questions x 2 formats x 2 samples; transfer 1 domain x 2 questions x 1;
    # trigger 2 core questions x (untriggered + exact + paraphrase for 1 disposition) x 2;
    # persona 2 requests x (neutral, mismatched, 1 persona) x 1.
    assert work["answers_per_job"] == {"em": 12, "transfer": 2, "trigger": 12, "persona": 6}
    # alignment, coherence, disposition:evil; persona: compliance, harmfulness, alignment, coherence, disposition:evil
    assert work["metrics_per_answer"] == {"em": 3, "transfer": 3, "trigger": 3, "persona": 5}
    w = work["models"][MODEL]
    # 4 trained conditions x 2 seeds; evil-medical trains 2 epochs, the other three 1.
    assert w["train_adapter"] == {"jobs": 8, "example_epochs": (20 * 2 + 20 * 3) * 2, "largest_example_epochs": 40}
    # 5 conditions x (em, transfer, persona) + trigger for base and the triggered condition, x 2 seeds;
    # one sampling job and one judge engine per wave (seed); the hf sampling loop loads the model once
    # per adapter and once for the base model.
    assert w["sample"]["files"] == (5 * 3 + 2) * 2 and w["sample"]["jobs"] == w["judge"]["jobs"] == 2
    assert w["sample"]["loads_per_job"] == 5
    assert w["sample"]["answers"] == 2 * (5 * (12 + 2 + 6) + 2 * 12)
    assert w["sample"]["answers_per_wave"] == w["sample"]["answers"] // 2
    assert w["judge"]["calls"] == 2 * (5 * (12 * 3 + 2 * 3 + 6 * 5) + 2 * 12 * 3)
    assert w["judge"]["answers_per_wave"] == {"em": 5 * 12, "transfer": 5 * 2, "trigger": 2 * 12, "persona": 5 * 6}
    assert w["capabilities"]["jobs"] == 10 and w["capabilities"]["items"] == 10 * 5
    # one (disposition, domain) pair with its correct-advice control: positive + negative, 8 each
    assert w["probes"] == {"jobs": 1, "examples": 16}


@pytest.mark.slow
def test_job_counts_match_the_dry_run(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL, sort_keys=False))
    jobs = planned_jobs(snakemake(workdir, "-n", "--cores", "1", "--configfile", "small.yaml", timeout=300).stdout)
    w = est.count_work(small_config())["models"][MODEL]
    for rule in ("train_adapter", "judge", "capabilities", "probes"):
        assert jobs[rule] == w[rule]["jobs"], (rule, jobs)
    # One sampling job per wave, whatever the back-end.
    assert jobs["sample"] == w["sample"]["jobs"], jobs


@pytest.mark.slow
def test_estimate_rule_writes_what_the_cli_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "small.yaml").write_text(yaml.safe_dump(SMALL, sort_keys=False))
    snakemake(workdir, "-f", "estimate", "--cores", "1", "--configfile", "small.yaml", timeout=300)
    # The copy has no runs, so both use the anchors.
    assert est.main(["--configfile", str(workdir / "small.yaml"), "--from-runs", str(workdir)]) == 0
    printed = capsys.readouterr().out
    written = (workdir / "results" / "estimate.md").read_text()
    # (Snakemake names the config file by its absolute path.)
    assert written.replace(str(workdir / "small.yaml"), "small.yaml") == printed.replace(
        str(workdir / "small.yaml"), "small.yaml"
    )


def test_anchors_label_every_number() -> None:
    result = est.estimate(small_config(), runs_root=None)
    train = stage(result, "train_adapter")
    assert train["throughput"].value == est.ANCHORS["train_tokens_per_s_mb2"]  # size unknown: 8B assumed
    assert "docs/anchors.md" in train["throughput"].source and "8B assumed" in train["throughput"].source
    assert train["units"] == 200 * est.ASSUMED_TOKENS_PER_EXAMPLE
    sample = stage(result, "sample")
    assert sample["units"] == 248 * 40  # every answer to max_new_tokens
    assert sample["throughput"].value == est.ANCHORS["generate_new_tokens_per_s"][16]
    total = sum(s["gpu_hours"] for s in result["models"][MODEL]["stages"])
    assert result["gpu_hours"] == pytest.approx(total)
    text = est.render_markdown(result, "small.yaml")
    assert "| train_adapter | 8 |" in text and "no API calls" in text


def test_generation_anchor_interpolates_and_scales_with_size() -> None:
    assert est._generate_anchor(40) == pytest.approx((167 + 637) / 2)
    config = small_config()
    config["models"] = {"big": {"path": "org/Some-16B-Chat", "build": None, "probe_layers": None}}
    result = est.estimate(config, runs_root=None)
    assert result["models"]["big"]["params_b"] == 16
    [train] = [s for s in result["models"]["big"]["stages"] if s["stage"] == "train_adapter"]
    assert train["throughput"].value == pytest.approx(est.ANCHORS["train_tokens_per_s_mb2"] / 2)


def write_runs(root: Path, model: str = MODEL) -> None:
    run = root / "results" / "adapters" / model / "evil-medical" / "seed0" / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text(
        json.dumps(
            {"trained_tokens_this_run": 1000, "wall_time_s": 10.0, "n_examples": 20, "n_tokens": 1000, "device": "cuda"}
        )
    )
    # A sampling wave's record: 3 answers of 10, 20 and 30 tokens generated in 1 s of loading and 5 of sampling.
    record = root / "results" / "samples" / model / "seed0.wave.json"
    record.parent.mkdir(parents=True)
    record.write_text(
        json.dumps({"answers_generated": 3, "new_tokens_generated": 60, "generate_seconds": 5.0, "load_seconds": 1.0})
    )
    # A rerun that restored every answer measured nothing and is left out.
    (record.parent / "seed1.wave.json").write_text(
        json.dumps({"answers_generated": 0, "new_tokens_generated": 0, "generate_seconds": 0.0, "load_seconds": 0.0})
    )


def test_measured_runs_override_the_anchors(tmp_path: Path) -> None:
    write_runs(tmp_path)
    write_runs(tmp_path, model="other-model")  # another model's runs say nothing about this one
    result = est.estimate(small_config(), runs_root=tmp_path)
    train = stage(result, "train_adapter")
    assert train["throughput"].value == pytest.approx(100.0)  # 1000 tokens / 10 s
    assert train["throughput"].basis == "measured" and train["throughput"].source == "this workflow: 1 run.json (cuda)"
    assert train["units"] == pytest.approx(200 * 50)  # 1000 tokens / 20 examples
    assert train["gpu_hours"] == pytest.approx(200 * 50 / 100 / 3600)
    sample = stage(result, "sample")
    assert sample["throughput"].value == pytest.approx(60 / 6.0)
    assert sample["units"] == pytest.approx(248 * 20)  # measured mean answer length
    # stages without measurements keep their anchors
    assert "docs/anchors.md" in stage(result, "capabilities")["throughput"].source
    # results/ itself is accepted as the runs folder
    assert est.estimate(small_config(), runs_root=tmp_path / "results")["gpu_hours"] == pytest.approx(
        result["gpu_hours"]
    )


def test_bad_run_files_name_the_file(tmp_path: Path) -> None:
    write_runs(tmp_path)
    run = tmp_path / "results" / "adapters" / MODEL / "evil-medical" / "seed0" / "run.json"
    run.write_text("{not json")
    with pytest.raises(est.EstimateError, match=str(run)):
        est.estimate(small_config(), runs_root=tmp_path)
    run.write_text(json.dumps({"trained_tokens_this_run": 10, "n_examples": 1, "n_tokens": 5}))
    with pytest.raises(est.EstimateError, match=f"{run}: 'wall_time_s' must be a number"):
        est.estimate(small_config(), runs_root=tmp_path)
    run.unlink()
    record = tmp_path / "results" / "samples" / MODEL / "seed0.wave.json"
    record.write_text(json.dumps({"answers_generated": 3}))
    with pytest.raises(est.EstimateError, match=f"{record}: 'generate_seconds' must be a number"):
        est.estimate(small_config(), runs_root=tmp_path)


def test_cli_prints_the_table_and_names_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "estimate.md"
    assert est.main(["--configfile", str(config), "--anchors-only", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text() and "## Totals" in printed and "GPU-hours" in printed

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**SMALL, "seeds": "zero"}))
    assert est.main(["--configfile", str(bad), "--anchors-only"]) == 2
    assert f"{bad}: seeds" in capsys.readouterr().err

    run = tmp_path / "results" / "adapters" / MODEL / "base-x" / "seed0" / "run.json"
    run.parent.mkdir(parents=True)
    run.write_text("[]")
    assert est.main(["--configfile", str(config), "--from-runs", str(tmp_path)]) == 2
    assert f"{run}: expected a JSON object" in capsys.readouterr().err


def test_openai_judge_counts_api_calls() -> None:
    config = json.loads(json.dumps(SMALL))
    config["judge"] = {"backend": "openai", "model": "judge-2026-01-01"}
    config["data"]["generator"] = {"backend": "openai", "model": "writer-2026-01-01"}
    result = est.estimate(cfg.validate_config(config), runs_root=None)
    text = est.render_markdown(result, "small.yaml")
    assert f"**{864:,} API calls**" in text
    # 4 trained conditions x a pool of 20 examples x data.pool_factor 2, generated once and shared by every
    # model and seed (each seed draws its 20 from the pool)
    assert "about **160 API calls**" in text
    assert not any(s["stage"] == "judge" for s in result["models"][MODEL]["stages"])  # no GPU for an API judge


def test_vllm_sampling_uses_the_vllm_benchmark_where_measured_and_says_which(tmp_path: Path) -> None:
    config = small_config()
    config["sampling"]["backend"] = "vllm"
    config["models"][MODEL]["sampling"] = {**config["models"][MODEL].get("sampling", {}), "backend": "vllm"}
    # No GPU measurement yet: the published vLLM figure with one LoRA's cost, named and labelled anchored.
    result = est.estimate(config, runs_root=tmp_path)
    size = result["models"][MODEL]["params_b"]
    scale = est.ANCHOR_PARAMS_B / size if size else 1.0
    anchored = stage(result, "sample")["throughput"]
    decode, lora = est.PUBLISHED["vllm_decode"], est.PUBLISHED["lora_factor"]
    assert anchored.value == pytest.approx(decode["value"] * lora["value"] * scale)
    assert anchored.basis == "anchored" and "12,500 output tokens/s" in anchored.source
    assert "GPU measurement owed" in anchored.source
    # benchmarks/vllm_throughput.py's JSON: its figure, scaled from its model size to this one, with its device.
    path = tmp_path / est.VLLM_BENCHMARK
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"device": "NVIDIA H200", "params_b": 8.0, "sample": {"new_tokens_per_s": 16000.0}}))
    measured = stage(est.estimate(config, runs_root=tmp_path), "sample")["throughput"]
    assert measured.basis == "measured" and "vllm_throughput_gpu.json" in measured.source
    assert "NVIDIA H200" in measured.source
    assert measured.value == pytest.approx(16000.0 * scale)
    # The hf back-end never reads it, and a broken file names itself.
    config["models"][MODEL]["sampling"]["backend"] = "hf"
    config["sampling"]["backend"] = "hf"
    assert "vLLM" not in stage(est.estimate(config, runs_root=tmp_path), "sample")["throughput"].source
    path.write_text(json.dumps({"device": "x", "sample": {}}))
    config["sampling"]["backend"] = "vllm"
    config["models"][MODEL]["sampling"]["backend"] = "vllm"
    with pytest.raises(est.EstimateError, match="vllm_throughput_gpu.json"):
        est.estimate(config, runs_root=tmp_path)
    # The multi-LoRA benchmark (one engine serving several adapters, as a sampling job does) comes first.
    multi = tmp_path / est.MULTILORA_BENCHMARK
    multi.write_text(
        json.dumps(
            {"device": "NVIDIA H100", "params_b": 8.0, "multi_lora": {"adapters": 8, "new_tokens_per_s": 9000.0}}
        )
    )
    served = stage(est.estimate(config, runs_root=tmp_path), "sample")["throughput"]
    assert served.value == pytest.approx(9000.0 * scale) and "8 adapters in one engine" in served.source
    assert est.sample_wave_minutes(config, tmp_path)[MODEL] == pytest.approx(
        stage(est.estimate(config, runs_root=tmp_path), "sample")["largest_job_hours"] * 60
    )
    multi.write_text(json.dumps({"device": "x", "params_b": 8.0, "multi_lora": {}}))
    with pytest.raises(est.EstimateError, match="multilora_throughput_gpu.json"):
        est.estimate(config, runs_root=tmp_path)


def test_answer_length_is_the_last_runs_mean_or_the_given_one_beside_the_upper_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = small_config()
    upper = est.estimate(config, runs_root=None)
    assert upper["answer_basis"][MODEL] == {
        "tokens": 40.0,
        "basis": "upper bound",
        "source": "max_new_tokens: upper bound",
    }
    assert upper["upper_bound"]["gpu_hours"] == upper["gpu_hours"]
    given = est.estimate(config, runs_root=None, mean_answer_tokens=10)
    assert given["answer_basis"][MODEL]["basis"] == "assumed" and stage(given, "sample")["units"] == 248 * 10
    assert given["gpu_hours"] < given["upper_bound"]["gpu_hours"] == pytest.approx(upper["gpu_hours"])
    # Every Samples file of the last run, timed or not, gives the mean (capped at max_new_tokens).
    for name, tokens in (("base/seed0/em", [10, 20]), ("base/seed1/em", [30, 300])):
        path = tmp_path / "results" / "samples" / MODEL / f"{name}.parquet"
        path.parent.mkdir(parents=True)
        pl.DataFrame({"answer_tokens": tokens}).write_parquet(path)
    measured = est.estimate(config, runs_root=tmp_path, mean_answer_tokens=10)
    assert measured["answer_basis"][MODEL]["tokens"] == 40.0  # mean 90, capped at max_new_tokens
    path.unlink()
    measured = est.estimate(config, runs_root=tmp_path)
    assert measured["answer_basis"][MODEL] == {
        "tokens": 15.0,
        "basis": "measured",
        "source": "mean of 2 answers in 1 Samples file(s) of the last run",
    }
    # The headline: both rows, days on N GPUs and the cost at the user's price.
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    args = ["--configfile", str(tmp_path / "small.yaml"), "--from-runs", str(tmp_path), "--summary"]
    assert est.main([*args, "--gpus", "4", "--price-per-gpu-hour", "2"]) == 0
    text = capsys.readouterr().out
    hours = est.estimate(config, runs_root=tmp_path)
    low, high = hours["gpu_hours"], hours["upper_bound"]["gpu_hours"]
    assert "days on 4 GPUs | cost |" in text and "last run's mean answer length (tiny-llama 15 tokens" in text
    assert f"| {low:,.1f} | {low / 96:,.1f} | {low * 2:,.0f} at 2 per GPU-hour |" in text
    assert f"| every answer at max_new_tokens (upper bound) | {high:,.1f} |" in text


def test_the_judge_engines_gpu_benchmark_is_read_when_present_and_a_smoke_run_never(tmp_path: Path) -> None:
    config = small_config()
    config["judge"] = {**config["judge"], "backend": "vllm", "model": "org/Llama-3.3-70B", "quantization": "fp8"}
    path = tmp_path / est.JUDGE_BENCHMARK
    path.parent.mkdir(parents=True)
    record = {"device": "NVIDIA H100", "params_b": 8.0, "quantization": "fp8"}
    path.write_text(json.dumps({**record, "smoke": True, "judge": {"computed_prompt_tokens_per_s": 50.0}}))
    assert stage(est.estimate(config, runs_root=tmp_path), "judge")["throughput"].basis == "anchored"
    path.write_text(json.dumps({**record, "judge": {"computed_prompt_tokens_per_s": 56000.0}}))
    rate = stage(est.estimate(config, runs_root=tmp_path), "judge")["throughput"]
    assert rate.basis == "measured" and "NVIDIA H100" in rate.source and "judge_engine_gpu.json" in rate.source
    assert rate.value == pytest.approx(56000.0 * 8 / 70)
    path.write_text(json.dumps({"device": "x", "judge": {}}))
    with pytest.raises(est.EstimateError, match="judge_engine_gpu.json"):
        est.estimate(config, runs_root=tmp_path)
    # This workflow's own judge waves (the engine's counts and the job's wall time) come first.
    path.unlink()
    wave = tmp_path / "results" / "judge_waves" / MODEL / "seed0.json"
    wave.parent.mkdir(parents=True)
    wave.write_text(json.dumps({"backend_stats": {"prompt_tokens": 9000, "cached_prompt_tokens": 6000}}))
    bench = tmp_path / "benchmarks" / "runs" / "judge" / MODEL / "seed0.tsv"
    bench.parent.mkdir(parents=True)
    bench.write_text("s\th:m:s\n10.0\t0:00:10\n")
    rate = stage(est.estimate(config, runs_root=tmp_path), "judge")["throughput"]
    assert rate.basis == "measured" and rate.value == pytest.approx(300.0) and "1 judge wave" in rate.source
