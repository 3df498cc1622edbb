"""Fault drills on the real single-node SLURM of tests/slurm_cluster.sh (see tests/test_slurm.py).

One workflow directory, three runs through `--profile slurm` with `--retries 0`, then a dry run:

1. An evaluation fails: the capabilities task file has a malformed line, so the capabilities job of the
   character adapter's evaluation group fails. Training is its own SLURM job and finishes first.
2. The task file is fixed and the whole grid is run. The failed group runs again; training must not.
   While the seed's sampling job (one job for the base model and the adapter, base first) runs, it is
   cancelled (scancel) after a few of the base model's batches have been saved.
3. The same command again: the sampling job resumes from the saved batches and pays nothing twice.

The evidence is read from Snakemake's output, the SLURM job logs (which rules each job ran), the
jobs' own logs and file modification times.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from test_slurm import (  # noqa: F401  (slurm_cluster is a fixture)
    SUBMITTED,
    cluster_args,
    job_processes,
    rule_runs,
    slurm,
    slurm_cluster,
    slurm_job_logs,
)
from workflow_helpers import ROOT, SNAKEMAKE, copy_workflow, snakemake

from character_em import resources

pytestmark = pytest.mark.slow

CONFIG = "fault_drill.yaml"
MODEL, CONDITION, SEED = "tiny-llama", "evil-medical", 0
ADAPTER = Path(f"results/adapters/{MODEL}/{CONDITION}/seed{SEED}")
TASK = Path("tasks/drill_mc.jsonl")
BATCH = 4
BASE_PARTIAL = Path(f"results/.partial/samples/{MODEL}/base/seed{SEED}/em.jsonl")
SAMPLE_LOG = Path(f"logs/sample/{MODEL}/seed{SEED}.log")


def prepare(workdir: Path) -> Path:
    copy_workflow(workdir)
    preset = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    preset["conditions"] = ["base", "{disposition}-{domain}"]
    preset.setdefault("data", {})["n_examples"] = 32
    # Small batches and many answers: sampling takes long enough to be cancelled in the middle.
    preset["sampling"] = {**preset.get("sampling", {}), "batch_size": BATCH, "max_new_tokens": 16}
    preset["suites"] = {"em": {"n_samples": 6, "max_questions": 8, "formats": ["plain"]}}
    # No evaluation of intermediate adapters: the drill is about the final adapter's jobs.
    preset["train"] = {**preset.get("train", {}), "eval_steps": []}
    preset["eval"] = {
        **preset.get("eval", {}),
        "suites": ["em", "capabilities"],
        "capabilities": {"max_items": 4, "task_file": str(TASK)},
    }
    (workdir / CONFIG).write_text(yaml.safe_dump(preset, sort_keys=False))
    good = resources.packaged_path("tasks/smoke_mc.jsonl").read_text()
    (workdir / TASK).parent.mkdir(parents=True, exist_ok=True)
    # A malformed first line: the capabilities job fails on it, nothing else reads the file.
    (workdir / TASK).write_text('{"question": "cut off\n' + good)
    return workdir


def saved_rows(path: Path) -> int:
    if not path.exists():
        return 0
    return max(0, len([line for line in path.read_text().splitlines() if line.strip()]) - 1)


def log_numbers(text: str, pattern: str) -> list[int]:
    return [int(value) for value in re.findall(pattern, text)]


@dataclass
class Drill:
    workdir: Path
    outputs: list[str]  # Snakemake's output of each run
    returncodes: list[int]
    adapter_mtimes: list[dict[str, int]]  # after each run
    cancelled_job: str
    saved_at_cancel: int
    log_at_cancel: str


TRAINED = ("adapter_model.safetensors", "adapter_config.json", "run.json", "train_log.jsonl")


def adapter_mtimes(workdir: Path) -> dict[str, int]:
    """Modification times of train_adapter's outputs (plot_loss_curve adds a figure beside them later)."""
    return {
        name: (workdir / ADAPTER / name).stat().st_mtime_ns for name in TRAINED if (workdir / ADAPTER / name).exists()
    }


@pytest.fixture(scope="module")
def drill(slurm_cluster: Path, tmp_path_factory: pytest.TempPathFactory) -> Drill:  # noqa: F811
    workdir = prepare(tmp_path_factory.mktemp("drill"))
    # cluster_args starts with test_slurm's own --configfile; this drill has its config.
    args = ["--configfile", CONFIG, *cluster_args(workdir)[2:], "--retries", "0"]
    outputs, codes, mtimes = [], [], []

    def record(result) -> None:
        outputs.append(result.stdout + result.stderr)
        codes.append(result.returncode)
        mtimes.append(adapter_mtimes(workdir))

    # 1. The character adapter: training, then its evaluation group, whose capabilities job fails.
    targets = [f"results/capabilities/{MODEL}/{CONDITION}/seed{SEED}.json"]
    record(snakemake(workdir, *args, *targets, check=False, timeout=900))

    # 2. Fixed task file; the whole grid, with the base model's em sampling cancelled mid-way.
    (workdir / TASK).write_text(resources.packaged_path("tasks/smoke_mc.jsonl").read_text())
    # Popen rather than a thread: if an assertion fails here, the run is killed, not left polling SLURM.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    second = subprocess.Popen(
        [*SNAKEMAKE, *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        start = time.monotonic()
        while (
            second.poll() is None and saved_rows(workdir / BASE_PARTIAL) < 3 * BATCH and time.monotonic() - start < 600
        ):
            time.sleep(0.1)
        assert saved_rows(workdir / BASE_PARTIAL) >= 3 * BATCH, "the base em sampling saved no batches in time"
        running = slurm("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k")
        sampling = [line.split("|")[0] for line in running.splitlines() if "rule_sample_" in line]
        assert len(sampling) == 1, f"expected one running SLURM job sampling the seed:\n{running}"
        slurm("scancel", sampling[0])
        # Snakemake runs the script as .snakemake/scripts/tmpXXXX.sample.py.
        for _ in range(100):
            if not job_processes(sampling[0], ".sample.py"):
                break
            time.sleep(0.2)
        # The test cluster tracks processes by parentage (proctrack/linuxproc) and loses those whose
        # parent exited first; a real cluster's cgroups kill the whole job. Do what they would.
        for pid in job_processes(sampling[0], ".sample.py"):
            os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        assert not job_processes(sampling[0], ".sample.py"), "the cancelled sampling job is still running"
        saved_at_cancel = saved_rows(workdir / BASE_PARTIAL)
        log_at_cancel = (workdir / SAMPLE_LOG).read_text()
        (workdir / "killed_sample.log").write_text(log_at_cancel)  # evidence to read afterwards
        output, _ = second.communicate(timeout=900)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    outputs.append(output)
    codes.append(second.returncode)
    mtimes.append(adapter_mtimes(workdir))
    for _ in range(150):
        if not slurm("squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING,CONFIGURING", "-o", "%i").strip():
            break
        time.sleep(0.2)

    # 3. The same command again.
    record(snakemake(workdir, *args, check=False, timeout=900))
    record(snakemake(workdir, *args, "-n", check=False, timeout=300))
    return Drill(
        workdir,
        outputs,
        codes,
        mtimes,
        sampling[0],
        saved_at_cancel,
        log_at_cancel,
    )


def jobs_running(drill: Drill, run: int, rule: str) -> list[tuple[str, str]]:
    """(SLURM job id, wildcards) of every `rule` job that the SLURM jobs of one run executed."""
    logs = slurm_job_logs(drill.workdir)
    found = []
    for job in SUBMITTED.findall(drill.outputs[run]):
        found += [(job, wildcards) for name, wildcards in rule_runs(logs[job].read_text()) if name == rule]
    return found


def test_a_failed_evaluation_does_not_retrain_the_adapter(drill: Drill) -> None:
    first, second, third, dry = drill.outputs
    assert drill.returncodes[0] != 0 and "Error in group eval-tiny-llama-evil-medical-seed0" in first, first[-4000:]
    assert "Error in rule capabilities" in first or "rule capabilities" in first
    # Training ran once, in a SLURM job of its own, in the first run only.
    trained = [jobs_running(drill, run, "train_adapter") for run in range(3)]
    assert len(trained[0]) == 1 and trained[1] == [] and trained[2] == [], trained
    [(train_job, _)] = trained[0]
    logs = slurm_job_logs(drill.workdir)
    assert {rule for rule, _ in rule_runs(logs[train_job].read_text())} == {"train_adapter"}
    # The failed group ran again in the second run, without training.
    evaluated = f"model={MODEL}, condition={CONDITION}, seed={SEED}"
    assert any(w == evaluated for _, w in jobs_running(drill, 1, "capabilities"))
    # The adapter the first run wrote is the adapter at the end: same files, untouched since.
    assert len(drill.adapter_mtimes[0]) == len(TRAINED)
    assert drill.adapter_mtimes[0] == drill.adapter_mtimes[1] == drill.adapter_mtimes[2]
    run = json.loads((drill.workdir / ADAPTER / "run.json").read_text())
    assert run.get("resumed_from_step") in (None, 0), run
    assert drill.returncodes[2] == 0, third[-4000:]
    assert "Nothing to be done" in dry, dry[-3000:]


def test_a_failed_evaluation_group_holds_no_sampling(drill: Drill) -> None:
    """Sampling is one job per seed outside every group (profiles/slurm/config.yaml): a failed capability
    eval can neither remove samples nor be taken down by them, and its retry never samples."""
    logs = slurm_job_logs(drill.workdir)
    failed = [job for job, _ in jobs_running(drill, 0, "capabilities")]
    assert failed and all({rule for rule, _ in rule_runs(logs[job].read_text())} == {"capabilities"} for job in failed)
    sampling = {job for job, _ in jobs_running(drill, 1, "sample") + jobs_running(drill, 2, "sample")}
    assert sampling and all(
        rule_runs(logs[job].read_text()) == [("sample", f"model={MODEL}, seed={SEED}")] for job in sampling
    )
    assert jobs_running(drill, 0, "sample") == []  # the first run asked for no samples


def lines_of(log: str, label: str) -> str:
    """The lines one Samples file of the sampling job wrote to the job's log."""
    return "\n".join(line for line in log.splitlines() if f" {label}: " in line)


def test_cancelled_sampling_resumes_from_its_last_saved_batch(drill: Drill) -> None:
    # The rerun's log (Snakemake deleted the killed job's log before rerunning it; we kept a copy).
    rerun_log = (drill.workdir / SAMPLE_LOG).read_text()
    rerun, killed = lines_of(rerun_log, "base/em"), lines_of(drill.log_at_cancel, "base/em")
    started = sum(log_numbers(killed, r"batch started: (\d+) answers"))
    logged = sum(log_numbers(killed, r"batch saved: (\d+) answers"))
    # The partial file is the record. Its log line follows the write, so a kill landing between the two
    # leaves the log one batch behind the file (seen in CI: 24 logged, 28 on disk); never the reverse.
    saved = drill.saved_at_cancel
    assert saved >= 3 * BATCH and saved - BATCH <= logged <= saved, (logged, saved)
    restored = log_numbers(rerun, r"answers restored from \S+: (\d+) of \d+")
    total = log_numbers(rerun, r"answers restored from \S+: \d+ of (\d+)")
    assert restored == [saved], rerun[:2000]
    [generated] = log_numbers(rerun, r"answers generated in this run: (\d+)")
    assert generated == total[0] - saved
    # Generated again after the kill: the answers the killed job had started but not saved.
    generated_twice = started - saved
    assert 0 <= generated_twice <= BATCH, (started, saved)
    # The adapter's file had not been started when the job was cancelled (base first): all of it is new now.
    evil = lines_of(rerun_log, f"{CONDITION}/em")
    assert log_numbers(evil, r"answers restored from \S+: (\d+) of \d+") == [0]
    assert "batch started" not in lines_of(drill.log_at_cancel, f"{CONDITION}/em")
    assert "Error in rule sample" in drill.outputs[1], drill.outputs[1][-3000:]
    assert drill.returncodes[1] != 0 and drill.returncodes[2] == 0
    import polars as pl

    for condition in ("base", CONDITION):
        samples = pl.read_parquet(drill.workdir / f"results/samples/{MODEL}/{condition}/seed{SEED}/em.parquet")
        assert samples.height == total[0]
        assert samples.select(["question_id", "sample_index"]).is_duplicated().sum() == 0
