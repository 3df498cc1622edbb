"""`python -m character_em.report.progress`: where a grid in flight stands.

Read from what a run leaves: a failed job's log as Snakemake itself writes it (a small real workflow),
and a half-finished smoke-preset run directory, planted file by file as a run lays it out (finished
data and one finished adapter with its benchmark file, a failed job with its rule log and SLURM log, a
job started and not finished, an output Snakemake marks incomplete), planned by the real workflow's
dry runs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, snakemake

from character_em.llm import tiny
from character_em.report import progress

MODEL = "tiny-llama"
TRAINED = ["evil-medical", "incorrect-medical", "correct-medical", "evil-medical-trig"]


def test_a_failed_job_is_read_from_the_log_snakemake_writes(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(
        textwrap.dedent(
            """
            rule all:
                input: expand("out/{x}.txt", x=["a", "b"])

            rule make:
                output: "out/{x}.txt"
                log: "logs/make/{x}.log"
                shell: "echo working on {wildcards.x} > {log}; if [ {wildcards.x} = b ]; then echo broke >> {log}; exit 3; fi; touch {output}"
            """
        )
    )
    result = snakemake(tmp_path, "--cores", "1", "--keep-going", check=False, timeout=120)
    assert result.returncode != 0  # job b failed, job a finished
    last = progress.failures(tmp_path)
    assert frozenset({"out/a.txt"}) not in last  # finished
    failure = last[frozenset({"out/b.txt"})]
    assert failure is not None and failure.rule == "make" and failure.logs == ["logs/make/b.log"]
    dry = snakemake(tmp_path, "-n", "--forceall", "--cores", "1")
    jobs = sorted(progress.parse_dry_run(dry.stdout), key=lambda job: job.outputs)
    assert [(job.rule, job.outputs, job.logs, job.wildcards) for job in jobs] == [
        ("make", ["out/a.txt"], ["logs/make/a.log"], {"x": "a"}),
        ("make", ["out/b.txt"], ["logs/make/b.log"], {"x": "b"}),
    ]


def write(path: Path, text: str, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def benchmark(seconds: float) -> str:
    """A Snakemake benchmark file (the columns Snakemake writes)."""
    return (
        "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        f"{seconds}\t1:30:00\t2048.1\t4096.2\t1900.3\t1950.4\t10.0\t20.0\t95.0\t{seconds * 0.9}\n"
    )


def adapter(workdir: Path, condition: str, mtime: float) -> list[str]:
    folder = f"results/adapters/{MODEL}/{condition}/seed0"
    run = {"trained_tokens_this_run": 20000, "wall_time_s": 5000.0, "n_examples": 48, "n_tokens": 10000}
    files = {
        f"{folder}/adapter_model.safetensors": "weights",
        f"{folder}/adapter_config.json": json.dumps({"r": 32}),
        f"{folder}/run.json": json.dumps({**run, "device": "cuda"}),
        f"{folder}/train_log.jsonl": json.dumps({"step": 1, "loss": 2.0}) + "\n",
    }
    for path, text in files.items():
        write(workdir / path, text, mtime)
    return list(files)


def job_block(rule: str, jobid: int, outputs: list[str], log: str, wildcards: str) -> str:
    return (
        f"[Mon Dec  7 21:0{jobid}:00 2026]\nrule {rule}:\n    output: {', '.join(outputs)}\n    log: {log}\n"
        f"    jobid: {jobid}\n    reason: Missing output files: {outputs[0]}\n    wildcards: {wildcards}\n"
        "    resources: tmpdir=/tmp, gpu=1, runtime=240, mem_mb=64000\n"
    )


@pytest.fixture
def half_finished(tmp_path: Path) -> Path:
    """A smoke-preset run stopped half-way, as its files lie on disk."""
    workdir = copy_workflow(tmp_path / "run")
    # Newer than the workflow's scripts, as a run's outputs are (Snakemake reruns a job older than its script).
    t0 = time.time()
    model = workdir / "resources/models" / MODEL
    write(model / "config.json", json.dumps(tiny.planned_config()), t0)
    write(model / "tokenizer.json", "{}", t0)
    for condition in TRAINED:  # every pool and training set written (CPU jobs: no GPU-hours)
        write(workdir / f"results/data/{condition}/pool.jsonl", '{"messages": []}\n', t0 + 5)
        write(workdir / f"results/data/{condition}/pool.json", "{}", t0 + 5)
        write(workdir / f"results/data/{condition}/train.jsonl", '{"messages": []}\n', t0 + 10)
        write(workdir / f"results/data/{condition}/manifest.json", "{}", t0 + 10)
        write(workdir / f"benchmarks/runs/generate_data/{condition}.tsv", benchmark(100.0), t0 + 10)
    # One adapter trained (1.5 GPU-hours), one failed on SLURM, one running.
    done = adapter(workdir, "incorrect-medical", t0 + 20)
    write(workdir / f"benchmarks/runs/train_adapter/{MODEL}/incorrect-medical/seed0.tsv", benchmark(5400.0), t0 + 20)
    failed_outputs = [p.replace("incorrect-medical", "evil-medical") for p in done]
    running_outputs = [p.replace("incorrect-medical", "correct-medical") for p in done]
    failed_log = f"logs/train_adapter/{MODEL}/evil-medical/seed0.log"
    write(workdir / failed_log, "loading model\ntorch.OutOfMemoryError: CUDA out of memory.\n", t0 + 30)
    slurm_log = workdir / f".snakemake/slurm_logs/rule_train_adapter/{MODEL}_evil-medical_0/4242.log"
    write(slurm_log, "srun: error: node7: task 0: Exited with exit code 1\n", t0 + 30)
    main_log = (
        "Building DAG of jobs...\n"
        + job_block(
            "train_adapter",
            6,
            done,
            f"logs/train_adapter/{MODEL}/incorrect-medical/seed0.log",
            f"model={MODEL}, trained=incorrect-medical, seed=0",
        )
        + job_block("train_adapter", 7, failed_outputs, failed_log, f"model={MODEL}, trained=evil-medical, seed=0")
        + job_block(
            "train_adapter",
            8,
            running_outputs,
            f"logs/train_adapter/{MODEL}/correct-medical/seed0.log",
            f"model={MODEL}, trained=correct-medical, seed=0",
        )
        + "Job 7 has been submitted with SLURM jobid 4242 (log: "
        + str(slurm_log)
        + ").\n"
        + "[Mon Dec  7 22:30:00 2026]\nFinished jobid: 6 (Rule: train_adapter)\n1 of 106 steps (1%) done\n"
        + "[Mon Dec  7 22:31:00 2026]\nError in rule train_adapter:\n"
        + "    message: SLURM-job '4242' failed, SLURM status is: 'FAILED'. For further error details see the cluster/cloud log and the log files of the involved rule(s).\n"
        + "    jobid: 7\n"
        + f"    input: results/data/evil-medical/train.jsonl, resources/models/{MODEL}\n"
        + f"    output: {', '.join(failed_outputs)}\n"
        + f"    log: {failed_log}, {slurm_log} (check log file(s) for error details)\n"
    )
    write(workdir / ".snakemake/log/2026-12-07T210000.000000.snakemake.log", main_log, t0 + 40)
    # A sampling job whose output Snakemake marks incomplete (started, then killed with the scheduler).
    sample = f"results/samples/{MODEL}/base/seed0/em.parquet"
    marker = workdir / ".snakemake/incomplete" / base64.urlsafe_b64encode(sample.encode()).decode()
    write(marker, "", t0 + 40)
    return workdir


def run_progress(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # In a process of its own, which must not import torch: it runs on a login node while the grid runs.
    code = (
        "import sys\nfrom character_em.report import progress\ncode = progress.main(sys.argv[1:])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules)\n"
        "print('heavy imports:', heavy)\nsys.exit(code)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True, env=env, timeout=300
    )


def stage_line(text: str, stage: str) -> list[int]:
    [line] = [line for line in text.splitlines() if line.split()[:1] == [stage] and line.split()[1].isdigit()]
    return [int(value) for value in line.split()[1:]]


def test_progress_of_a_half_finished_run(half_finished: Path) -> None:
    result = run_progress(half_finished, "--configfile", "presets/smoke.yaml", "--lines", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert "heavy imports: []" in text
    # jobs, done, failed, started, waiting. Training: 4 adapters (1 done, 1 failed, 1 running, 1 waiting)
    # and 8 intermediate adapters to publish (2 saved steps each), none done.
    assert stage_line(text, "train") == [12, 1, 1, 1, 9]
    assert stage_line(text, "resources") == [1, 1, 0, 0, 0]
    # Data: the 4 pools and the 4 training sets drawn from them are done; the overlap check and the 4 judged
    # training sets are not.
    assert stage_line(text, "data") == [13, 8, 0, 0, 5]
    sample = stage_line(text, "sample")
    assert sample[2:4] == [0, 1] and sample[1] == 0  # the one with an incomplete output started
    # Only the finished GPU job counts: 5400 s on one GPU; the data jobs ask for none.
    [train_hours] = [line for line in text.splitlines() if line.startswith("train ") and "." in line]
    assert train_hours.split()[1] == "1.50", train_hours
    assert "Failed jobs: 1" in text
    failure = text[text.index("Failed jobs: 1") :]
    assert f"train_adapter (model={MODEL}, trained=evil-medical, seed=0): failed" in failure
    assert "message: SLURM-job '4242' failed" in failure
    assert f"logs/train_adapter/{MODEL}/evil-medical/seed0.log (last 2 lines):" in failure
    assert "| torch.OutOfMemoryError: CUDA out of memory." in failure
    assert f".snakemake/slurm_logs/rule_train_adapter/{MODEL}_evil-medical_0/4242.log (last 1 lines):" in failure
    assert "| srun: error: node7: task 0: Exited with exit code 1" in failure
    # A later run in which the job starts again and finishes clears the failure.
    failed = [p.replace("incorrect-medical", "evil-medical") for p in adapter(half_finished, "incorrect-medical", 0)]
    retry = job_block("train_adapter", 3, failed, "logs/x.log", "model=m") + "Finished jobid: 3 (Rule: train_adapter)\n"
    (half_finished / ".snakemake/log/2026-12-07T230000.000000.snakemake.log").write_text(retry)
    assert frozenset(failed) not in progress.failures(half_finished)


def test_a_workflow_that_cannot_be_planned_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text('rule all:\n    input: "x"\n')  # nothing makes x
    result = run_progress(tmp_path)
    assert result.returncode == 2, result.stdout
    assert f"error: snakemake -n failed in {tmp_path}" in result.stderr and "MissingInputException" in result.stderr
