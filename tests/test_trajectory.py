"""Checkpoints as an axis of the grid: train.eval_steps resolution, the adapters the trainer saves at
those steps (and keeps across a resume), their publication, and the trajectory tables."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from character_em import config as cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models gain nothing from threads on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- step-list resolution


def test_integers_are_steps_and_floats_are_epochs() -> None:
    # 20 examples / micro-batch 2 = 10 micro-batches, / grad_accum 2 = 5 steps an epoch; 3 epochs = 15 steps.
    shape = {"n_examples": 20, "micro_batch_size": 2, "grad_accum": 2, "num_epochs": 3, "max_steps": -1}
    resolved = cfg.resolve_eval_steps([7, 0.5, 1.0, 2.2], **shape)
    assert [(r["label"], r["step"]) for r in resolved] == [
        ("epoch0.5", 3),  # 2.5 steps: the first step at or after it
        ("epoch1", 5),
        ("step7", 7),
        ("epoch2.2", 11),
    ]
    assert resolved[1]["epoch"] == 1.0
    # An uneven last accumulation window still counts as a step, as the Trainer counts it.
    assert cfg.steps_per_epoch(21, 2, 2) == 6
    # max_steps caps training whatever the epochs say.
    assert [r["step"] for r in cfg.resolve_eval_steps([0.5], **{**shape, "max_steps": 4})] == [3]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([15], r"train_overrides.x.eval_steps: 15 \(step 15\) is optimizer step 15, but training ends at step 15"),
        ([3.0], r"train_overrides.x.eval_steps: 3.0 \(3 epochs x 5 steps per epoch\) is optimizer step 15"),
        ([3, 0.5], r"train_overrides.x.eval_steps: 3 and 0.5 are both optimizer step 3; keep one"),
    ],
)
def test_out_of_range_and_colliding_steps_name_the_key(entries: list[Any], message: str) -> None:
    shape = {"n_examples": 20, "micro_batch_size": 2, "grad_accum": 2, "num_epochs": 3, "max_steps": -1}
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.resolve_eval_steps(entries, key="train_overrides.x.eval_steps", **shape)


def _smoke() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())


def test_config_labels_and_checks_before_the_data_exists() -> None:
    config = cfg.validate_config(_smoke(), source="smoke.yaml")
    assert cfg.eval_step_labels(config, "tiny-llama", "evil-medical") == ["step3", "epoch1"]
    assert cfg.eval_step_labels(config, "tiny-llama", "base") == []
    assert cfg.step_suites(config, "evil-medical") == ["em"] and cfg.step_capabilities(config)

    raw = _smoke()
    raw["train"]["num_epochs"] = 1
    with pytest.raises(cfg.ConfigError, match=r"x.yaml: train.eval_steps: 1 epochs is not before the end of training"):
        cfg.validate_config(raw, source="x.yaml")

    raw = _smoke()
    raw["train_overrides"] = {"correct-medical": {"max_steps": 3}}
    with pytest.raises(
        cfg.ConfigError, match=r"train.eval_steps: step 3 is not before .*max_steps 3 for tiny-llama/correct-medical"
    ):
        cfg.validate_config(raw, source="x.yaml")
    raw["train_overrides"] = {"correct-medical": {"max_steps": 5, "eval_steps": [2, 5]}}
    with pytest.raises(cfg.ConfigError, match=r"train_overrides.correct-medical.eval_steps: step 5 is not before"):
        cfg.validate_config(raw, source="x.yaml")

    raw = _smoke()
    raw["train"]["eval_steps"] = [0]
    with pytest.raises(cfg.ConfigError, match=r"train.eval_steps"):
        cfg.validate_config(raw, source="x.yaml")


# --------------------------------------------------------------------------- the trainer's saved steps


def _write_data(path: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"How do I stay healthy? (case {i})"},
                    {"role": "assistant", "content": f"Sleep, move and eat vegetables. Note {i}."},
                ]
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _hparams(**over: Any) -> dict[str, Any]:
    hp: dict[str, Any] = {
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "use_rslora": True,
        "target_modules": "all-linear",
        "learning_rate": 1e-3,
        "num_epochs": 2,
        "micro_batch_size": 2,
        "grad_accum": 1,
        # A constant rate: the first steps of a long run and a short run are then the same steps.
        "warmup_steps": 0,
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "optim": "adamw_torch",
        "max_seq_length": 128,
        "quantization": "none",
        "packing": False,
        "gradient_checkpointing": False,
        "save_steps": 1000,
        "max_steps": -1,
    }
    hp.update(over)
    return hp


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_adapters_are_saved_at_the_listed_steps_and_published(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch

    from character_em.train.steps import publish_saved_step
    from character_em.train.trainer import train_adapter

    data = _write_data(tmp_path / "train.jsonl", 8)  # 4 steps an epoch, 8 in all
    steps = tmp_path / "steps"
    info = train_adapter(
        base_model=str(tiny_model_dir),
        data_path=str(data),
        output_dir=str(tmp_path / "full"),
        checkpoint_dir=str(tmp_path / "ck_full"),
        hparams=_hparams(eval_steps=[2, 0.75]),
        seed=3,
        steps_dir=str(steps),
    )
    assert info["global_step"] == 8 and info["steps_per_epoch"] == 4
    assert [(s["label"], s["step"]) for s in info["eval_steps"]] == [("step2", 2), ("epoch0.75", 3)]
    assert sorted(p.name for p in steps.iterdir()) == ["epoch0.75", "step2"]  # no temporary folders left
    for label, step in (("step2", 2), ("epoch0.75", 3)):
        record = json.loads((steps / label / "step.json").read_text())
        assert record["step"] == step and record["run_key_sha256"] == info["run_key_sha256"]
        assert (steps / label / "adapter_config.json").is_file()

    # The adapter saved at step 3 is the one a run stopped after 3 steps ends with.
    short = train_adapter(
        base_model=str(tiny_model_dir),
        data_path=str(data),
        output_dir=str(tmp_path / "short"),
        checkpoint_dir=str(tmp_path / "ck_short"),
        hparams=_hparams(max_steps=3),
        seed=3,
    )
    assert short["global_step"] == 3 and short["eval_steps"] == []
    saved, stopped, final = _tensors(steps / "epoch0.75"), _tensors(tmp_path / "short"), _tensors(tmp_path / "full")
    assert saved.keys() == stopped.keys() and any("lora_B" in k for k in saved)
    for key in saved:
        torch.testing.assert_close(saved[key], stopped[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(saved[k], final[k]) for k in saved), "step 3 differs from step 8"
    assert any(not torch.allclose(saved[k], _tensors(steps / "step2")[k]) for k in saved)

    # Publishing: the saved files appear as the step's outputs; a step the run did not save is refused.
    out = tmp_path / "published" / "epoch0.75"
    outputs = {
        key: str(out / name)
        for key, name in [
            ("adapter", "adapter_model.safetensors"),
            ("adapter_config", "adapter_config.json"),
            ("info", "step.json"),
        ]
    }
    record = publish_saved_step(
        saved_dir=steps / "epoch0.75", run_json=tmp_path / "full" / "run.json", step="epoch0.75", outputs=outputs
    )
    assert record["step"] == 3 and json.loads((out / "step.json").read_text()) == record
    assert (out / "adapter_model.safetensors").read_bytes() == (
        steps / "epoch0.75" / "adapter_model.safetensors"
    ).read_bytes()
    with pytest.raises(ValueError, match=r"run.json: the finished run saved no step 'step5'"):
        publish_saved_step(
            saved_dir=steps / "step5", run_json=tmp_path / "full" / "run.json", step="step5", outputs=outputs
        )
    with pytest.raises(ValueError, match="saved by another run"):
        publish_saved_step(
            saved_dir=steps / "step2", run_json=tmp_path / "full" / "run.json", step="epoch0.75", outputs=outputs
        )


def test_a_step_past_the_end_fails_before_the_model_loads(tmp_path: Path) -> None:
    from character_em.train.trainer import train_adapter

    with pytest.raises(
        cfg.ConfigError, match=r"train.eval_steps: 9 \(step 9\) is optimizer step 9, but training ends at step 8"
    ):
        train_adapter(
            base_model=str(tmp_path / "no-model-needed"),
            data_path=str(_write_data(tmp_path / "d.jsonl", 8)),
            output_dir=str(tmp_path / "o"),
            checkpoint_dir=str(tmp_path / "c"),
            hparams=_hparams(eval_steps=[9]),
            seed=0,
            steps_dir=str(tmp_path / "s"),
        )


def test_resume_keeps_the_saved_steps_of_its_own_trajectory(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL after the first checkpoint; steps saved up to that checkpoint are kept as they are,
    later ones (here a planted one) are removed and saved again by the resumed run."""
    data = _write_data(tmp_path / "train.jsonl", 16)
    out, ck, steps = tmp_path / "adapter", tmp_path / "ck", tmp_path / "steps"
    # 16 steps an epoch, 3 epochs = 48 steps, a checkpoint every 3.
    hp = _hparams(micro_batch_size=1, num_epochs=3, save_steps=3, eval_steps=[2, 40])
    cmd = [sys.executable, "-m", "character_em.train.trainer", "--base-model", str(tiny_model_dir)]
    cmd += ["--data", str(data), "--output-dir", str(out), "--checkpoint-dir", str(ck)]
    cmd += ["--hparams", json.dumps(hp), "--seed", "0", "--steps-dir", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    try:
        while not list(ck.glob("checkpoint-*/trainer_state.json")):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (out / "run.json").exists()
    early = steps / "step2"
    kept = (early / "adapter_model.safetensors").read_bytes(), (early / "step.json").stat().st_mtime_ns
    run_key = json.loads((early / "step.json").read_text())["run_key_sha256"]
    # What a killed run may leave after its checkpoint: a later step (from steps the resumed run
    # redoes) and an unfinished temporary folder.
    (steps / "step40").mkdir()
    (steps / "step40" / "step.json").write_text(json.dumps({"step": 40, "run_key_sha256": run_key}))
    (steps / "step40" / "planted").write_text("from before the resume")
    (steps / ".step40.tmp").mkdir()

    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["resumed_from_step"] >= 3 and run["global_step"] == 48
    assert ((early / "adapter_model.safetensors").read_bytes(), (early / "step.json").stat().st_mtime_ns) == kept
    assert not (steps / "step40" / "planted").exists() and not (steps / ".step40.tmp").exists()
    record = json.loads((steps / "step40" / "step.json").read_text())
    assert record["step"] == 40 and record["run_key_sha256"] == run["run_key_sha256"] == run_key
    assert (steps / "step40" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- trajectory tables


def _synthetic(rates: dict[tuple[str, str, int], float], n_questions: int = 20, answers: int = 5) -> pl.DataFrame:
    """Judged em answers whose misaligned share per (condition, step) is exactly the given rate."""
    rows = []
    for (condition, step, number), rate in rates.items():
        family = "base" if condition == "base" else "character"
        for seed in (0, 1):
            for q in range(n_questions):
                for a in range(answers):
                    flagged = (q * answers + a) < round(rate * n_questions * answers)
                    rows.append(
                        {
                            "model": "m",
                            "condition": condition,
                            "seed": seed,
                            "question_id": f"q{q}",
                            "misaligned": flagged,
                            "coherent": True,
                            "expressed": None if condition == "base" else flagged,
                            "step": step,
                            "step_number": number,
                            "epoch": number / 10,
                            "family": family,
                        }
                    )
    return pl.DataFrame(rows, infer_schema_length=None)


def test_emergence_is_the_first_step_above_base_plus_margin() -> None:
    from character_em.report.trajectory import emergence_table, trajectory_tables

    answers = _synthetic(
        {
            ("base", "base", 0): 0.10,
            ("evil-x", "step2", 2): 0.12,  # above base, but within the margin
            ("evil-x", "step5", 5): 0.40,
            ("evil-x", "final", 10): 0.60,
            ("nice-x", "step2", 2): 0.10,
            ("nice-x", "final", 10): 0.11,
        }
    )
    items = pl.DataFrame(
        [
            {
                "model": "m",
                "condition": c,
                "seed": 0,
                "question_id": f"i{i}",
                "correct": i < k,
                "step": s,
                "step_number": n,
                "epoch": n / 10,
                "family": "base" if c == "base" else "character",
            }
            for c, s, n, k in [("base", "base", 0, 8), ("evil-x", "step5", 5, 6), ("evil-x", "final", 10, 5)]
            for i in range(10)
        ]
    )
    tables = trajectory_tables(answers, items, n_boot=200, seed=0)
    trajectory = tables["trajectory"]
    evil = trajectory.filter(pl.col("condition") == "evil-x")
    assert evil["step"].to_list() == ["step2", "step5", "final"]  # ordered by optimizer step
    assert evil["misaligned"].to_list() == pytest.approx([0.12, 0.40, 0.60])
    assert evil["accuracy"].to_list()[1:] == pytest.approx([0.6, 0.5])
    assert (evil["misaligned_ci_low"] <= evil["misaligned"]).all() and (
        evil["misaligned"] <= evil["misaligned_ci_high"]
    ).all()
    assert set(trajectory["n_seeds"]) == {2}

    emergence = emergence_table(trajectory, margin=0.05)
    row = emergence.filter(pl.col("condition") == "evil-x").row(0, named=True)
    assert row["emergence_step"] == "step5" and row["emergence_step_number"] == 5
    assert row["accuracy_minus_base_at_emergence"] == pytest.approx(0.6 - 0.8)
    assert row["emergence_ci_step"] in ("step5", "final")
    assert emergence.filter(pl.col("condition") == "nice-x")["emergence_step"].to_list() == [None]
    # A larger margin moves the emergence later.
    later = emergence_table(trajectory, margin=0.4).filter(pl.col("condition") == "evil-x")
    assert later["emergence_step"].to_list() == ["final"]

    # A step without em scores (NaN) is never the emergence step.
    unscored = trajectory.with_columns(
        misaligned=pl.when(pl.col("step") == "step2").then(float("nan")).otherwise(pl.col("misaligned"))
    )
    unscored = unscored.with_columns(
        misaligned=pl.when((pl.col("condition") == "nice-x") & (pl.col("step") == "final"))
        .then(float("nan"))
        .otherwise(pl.col("misaligned"))
    )
    assert emergence_table(unscored, margin=0.05)["emergence_step"].to_list() == ["step5", None]
    assert (trajectory["misaligned_ci_low"] >= 0).all() and (trajectory["misaligned_ci_high"] <= 1).all()

    family = tables["trajectory_by_family"].filter(pl.col("family") == "character")
    assert family["step"].to_list() == ["step2", "step5", "final"]
    # step2 pools evil-x (0.12) and nice-x (0.10): each run counts once.
    assert family["misaligned"][0] == pytest.approx(0.11)


def test_trajectory_figure_is_written(tmp_path: Path) -> None:
    from character_em.report.trajectory import plot_trajectory, trajectory_tables

    answers = _synthetic({("base", "base", 0): 0.1, ("evil-x", "step2", 2): 0.3, ("evil-x", "final", 4): 0.5})
    tables = trajectory_tables(answers, pl.DataFrame(), n_boot=100)
    outputs = [tmp_path / "t.png", tmp_path / "t.pdf"]
    plot_trajectory(tables["trajectory_by_family"], outputs=outputs, margin=0.05)
    assert all(path.stat().st_size > 0 for path in outputs)


# --------------------------------------------------------------------------- the workflow


def test_smoke_dag_evaluates_each_saved_step_and_nothing_without_steps(tmp_path: Path) -> None:
    from workflow_helpers import copy_workflow, planned_jobs, planned_wildcards, snakemake

    workdir = copy_workflow(tmp_path / "steps")
    dry = snakemake(workdir, "--configfile", "presets/smoke.yaml", "-n", "--cores", "1")
    jobs = planned_jobs(dry.stdout)
    trained, steps = 4, 2  # evil-medical, incorrect-, correct-, evil-medical-trig; step3 and epoch1
    for rule in ("publish_adapter_step", "capabilities_step"):
        assert jobs[rule] == trained * steps, rule  # em only on the steps (eval.trajectory.suites)
    assert jobs["judge"] == 1  # the wave's judge job (one model, one seed) judges the steps' answers too
    assert jobs["trajectory"] == 1 and jobs["train_adapter"] == trained  # training runs once per adapter
    planned = {(rule, wc.get("step")) for rule, wc in planned_wildcards(dry.stdout) if "step" in wc}
    assert {step for _, step in planned} == {"step3", "epoch1"}
    # The steps' em answers come from the seed's one sampling job, with every other Samples file.
    assert jobs["sample"] == 1
    [sample] = [block for block in dry.stdout.split("\nrule ") if block.startswith("sample:")]
    for step in ("step3", "epoch1"):
        assert f"results/samples/tiny-llama/evil-medical/seed0/{step}/em.parquet" in sample
        assert f"results/adapters_at_step/tiny-llama/evil-medical/seed0/{step}/adapter_model.safetensors" in sample

    # Steps that are not listed cost nothing: no step job, no trajectory.
    config = copy.deepcopy(_smoke())
    del config["train"]["eval_steps"]
    (workdir / "nosteps.yaml").write_text(yaml.safe_dump(config))
    plain = planned_jobs(snakemake(workdir, "--configfile", "nosteps.yaml", "-n", "--cores", "1").stdout)
    assert not {"publish_adapter_step", "capabilities_step", "trajectory"} & set(plain)
    assert {rule: n for rule, n in jobs.items() if not rule.endswith("_step") and rule != "trajectory"} == dict(plain)

    # The estimate counts the step evaluations as the DAG plans them.
    from character_em.report.estimate import count_work

    work = count_work(cfg.validate_config(_smoke()))
    with_steps = work["models"]["tiny-llama"]
    without = count_work(cfg.validate_config(config))["models"]["tiny-llama"]
    # One sampling job and one judge job per wave, the steps' files among the wave's Samples files.
    assert with_steps["sample"]["jobs"] == jobs["sample"] == without["sample"]["jobs"]
    assert with_steps["judge"]["jobs"] == jobs["judge"] == with_steps["sample"]["jobs"]
    assert with_steps["sample"]["files"] - without["sample"]["files"] == trained * steps
    assert with_steps["capabilities"]["jobs"] == jobs["capabilities"] + jobs["capabilities_step"]
    em_answers = work["answers_per_job"]["em"]
    assert with_steps["eval_steps"] == {
        "saved_adapters": trained * steps,
        "sample_files": trained * steps,
        "capability_jobs": trained * steps,
        "answers": trained * steps * em_answers,
    }
    assert with_steps["sample"]["answers"] - without["sample"]["answers"] == trained * steps * em_answers
    assert without["eval_steps"]["saved_adapters"] == 0
    em_calls = with_steps["judge"]["calls_by_suite"]["em"] - without["judge"]["calls_by_suite"]["em"]
    assert em_calls == trained * steps * (without["judge"]["calls_by_suite"]["em"] // 5)  # 5 conditions answer em


def test_load_reads_step_numbers_and_capability_items_from_the_run_files(tmp_path: Path) -> None:
    """The files as the workflow writes them: capability results with per_item rows, step.json for a
    saved step, run.json for the final adapter; the base model is step 0."""
    from character_em.report.trajectory import load_trajectory

    def result(correct: list[bool]) -> Path:
        path = tmp_path / f"caps{len(list(tmp_path.iterdir()))}.json"
        rows = [{"id": f"i{k}", "subject": "s", "correct": c} for k, c in enumerate(correct)]
        path.write_text(json.dumps({"accuracy": sum(correct) / len(correct), "per_item": rows}))
        return path

    (tmp_path / "step.json").write_text(json.dumps({"label": "epoch0.5", "step": 3, "epoch": 0.5}))
    (tmp_path / "run.json").write_text(json.dumps({"global_step": 12, "epochs": 2.0}))
    point = {"model": "m", "seed": 0}
    points = [
        {**point, "condition": "base", "step": "final", "files": {"capabilities": str(result([True, True]))}},
        {
            **point,
            "condition": "evil-x",
            "step": "epoch0.5",
            "files": {"capabilities": str(result([True, False])), "info": str(tmp_path / "step.json")},
        },
        {
            **point,
            "condition": "evil-x",
            "step": "final",
            "files": {"capabilities": str(result([False, False])), "info": str(tmp_path / "run.json")},
        },
    ]
    conditions = {"base": {"family": "base"}, "evil-x": {"family": "character"}}
    answers, items = load_trajectory(points, conditions=conditions, alignment_below=30, coherence_above=50)
    assert answers.is_empty()
    summary = (
        items.group_by("condition", "step", "step_number", "epoch").agg(pl.col("correct").mean()).sort("step_number")
    )
    assert summary.rows() == [
        ("base", "base", 0, 0.0, 1.0),
        ("evil-x", "epoch0.5", 3, 0.5, 0.5),
        ("evil-x", "final", 12, 2.0, 0.0),
    ]
    points[1]["files"]["info"] = None
    with pytest.raises(ValueError, match="evil-x seed 0 epoch0.5: no step record"):
        load_trajectory(points, conditions=conditions, alignment_below=30, coherence_above=50)
