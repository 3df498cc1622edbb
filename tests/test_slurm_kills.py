"""Kill drills for sampling on the real single-node SLURM of tests/slurm_cluster.sh: the time limit and
preemption (``scontrol requeue``). tests/test_slurm_faults.py has the ``scancel`` drill.

One workflow directory with the base model only (no training), whose sampling job (one per model and
seed, here a single Samples file: the base model's em answers) has far more answers than the drill lets
it finish:

1. The job is submitted with ``--set-resources sample:runtime=1``, a one-minute SLURM time limit, and
   SLURM ends it as TIMEOUT part-way through.
2. The same target with the normal runtime: the new job restores the saved batches. When it has saved a
   few more, ``scontrol requeue`` preempts it; SLURM puts the same job id back in the queue (held for two
   minutes by SLURM's own rule; the drill releases it at once with ``scontrol update StartTime=now``),
   and the job's second start restores again. The drill stops once that start has saved a new batch.

The evidence: the SLURM job states, each start's own log (answers restored, batches started and saved)
and the partial-answers file. Finishing the sampling proves nothing more and is left out on purpose: the
answers a kill costs are the ones started and not saved, at most one batch.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from test_slurm import (  # noqa: F401  (slurm_cluster is a fixture)
    SUBMITTED,
    cluster_args,
    job_processes,
    slurm,
    slurm_cluster,
)
from workflow_helpers import ROOT, SNAKEMAKE, copy_workflow

pytestmark = pytest.mark.slow

CONFIG = "kill_drill.yaml"
MODEL, SEED = "tiny-llama", 0
BATCH = 8
N_ANSWERS = 8 * 5000
TARGET = f"results/samples/{MODEL}/base/seed{SEED}/em.parquet"
PARTIAL = Path(f"results/.partial/samples/{MODEL}/base/seed{SEED}/em.jsonl")
SAMPLE_LOG = Path(f"logs/sample/{MODEL}/seed{SEED}.log")
RESTORED = r"answers restored from \S+: (\d+) of (\d+)"


def prepare(workdir: Path) -> Path:
    copy_workflow(workdir)
    preset = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    preset["conditions"] = ["base"]
    # 8 questions x 5,000 answers of 64 tokens: an idle 2-core machine draws the tiny model's answers at about
    # 200 a second at 16 tokens (8,000 were done in 40 s, before a one-minute limit could strike), so this is
    # well over ten minutes of work there, and every kill lands mid-way. The drill never waits for the end.
    preset["sampling"] = {**preset.get("sampling", {}), "batch_size": BATCH, "max_new_tokens": 64}
    preset["suites"] = {"em": {"n_samples": N_ANSWERS // 8, "max_questions": 8, "formats": ["plain"]}}
    preset["train"] = {**preset.get("train", {}), "eval_steps": []}
    preset["eval"] = {**preset.get("eval", {}), "suites": ["em"]}
    (workdir / CONFIG).write_text(yaml.safe_dump(preset, sort_keys=False))
    return workdir


def args_for(workdir: Path, runtime: int | None = None) -> list[str]:
    # cluster_args starts with test_slurm's own --configfile; this drill has its config.
    args = ["--configfile", CONFIG, *cluster_args(workdir)[2:], "--retries", "0"]
    if runtime is not None:
        args = [f"sample:runtime={runtime}" if arg.startswith("sample:runtime=") else arg for arg in args]
    return args


def saved_rows(workdir: Path) -> int:
    path = workdir / PARTIAL
    if not path.exists():
        return 0
    return max(0, len([line for line in path.read_text().splitlines() if line.strip()]) - 1)


def numbers(text: str, pattern: str) -> list[int]:
    return [int(value) for value in re.findall(pattern, text)]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 600) -> None:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def job_state(job: str) -> dict[str, str]:
    fields = slurm("scontrol", "show", "job", "-o", job).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def kill_leftovers(job: str) -> None:
    """The test cluster tracks processes by parentage (proctrack/linuxproc) and loses those whose parent
    exited first; a real cluster's cgroups kill the whole job. Do what they would."""
    for _ in range(100):
        if not job_processes(job, ".sample.py"):
            return
        time.sleep(0.2)
    for pid in job_processes(job, ".sample.py"):
        os.kill(pid, signal.SIGKILL)
    time.sleep(1)
    assert not job_processes(job, ".sample.py"), f"SLURM job {job}'s sampling is still running"


def start(workdir: Path, args: list[str], output: Path) -> subprocess.Popen[bytes]:
    """Snakemake in the background, its output to a file (a full pipe would block it while the drill waits)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with output.open("wb") as handle:
        return subprocess.Popen(
            [*SNAKEMAKE, *args, TARGET], cwd=workdir, env=env, stdout=handle, stderr=subprocess.STDOUT
        )


def finish(run: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        run.wait()


def running_job(workdir: Path) -> str:
    running = slurm("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k")
    jobs = [line.split("|")[0] for line in running.splitlines() if "rule_sample_" in line]
    assert len(jobs) == 1, f"expected one running SLURM job sampling the seed:\n{running}"
    return jobs[0]


def sampling_jobs(output: str) -> list[str]:
    """SLURM ids of the sampling jobs that one Snakemake run submitted (each is printed twice)."""
    lines = [line for line in output.splitlines() if "rule_sample" in line]
    return sorted({job for line in lines for job in SUBMITTED.findall(line)})


def restored_from_file(workdir: Path, count: int) -> bool:
    """A start of the job has logged that it restored ``count`` answers (the rule's log is appended to)."""
    return any(int(restored) == count for restored, _ in re.findall(RESTORED, log_text(workdir)))


def log_text(workdir: Path) -> str:
    path = workdir / SAMPLE_LOG
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def drill(slurm_cluster: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    workdir = prepare(tmp_path_factory.mktemp("kills"))
    evidence: dict = {"workdir": workdir}

    # 1. A one-minute time limit: SLURM ends the job part-way through.
    first = start(workdir, args_for(workdir, runtime=1), workdir / "run_timeout.out")
    finish(first, timeout=900)
    output = (workdir / "run_timeout.out").read_text()
    [timed_out] = sampling_jobs(output)
    kill_leftovers(timed_out)
    assert saved_rows(workdir) < N_ANSWERS, "the sampling finished before its time limit: raise the drill's workload"
    evidence.update(
        timeout_output=output,
        timeout_rc=first.returncode,
        timeout_job=job_state(timed_out),
        timeout_log=log_text(workdir),
        saved_at_timeout=saved_rows(workdir),
    )

    # 2. The normal runtime: the job resumes, and is preempted with scontrol requeue after a few batches.
    second = start(workdir, args_for(workdir), workdir / "run_requeue.out")
    try:
        wait_for(lambda: restored_from_file(workdir, evidence["saved_at_timeout"]), "the rerun to restore its batches")
        wait_for(lambda: saved_rows(workdir) >= evidence["saved_at_timeout"] + 2 * BATCH, "two batches after resuming")
        job = running_job(workdir)
        slurm("scontrol", "requeue", job)
        kill_leftovers(job)
        evidence.update(requeued_job=job, saved_at_requeue=saved_rows(workdir), before_requeue_log=log_text(workdir))
        wait_for(lambda: job_state(job).get("JobState") == "PENDING", "the requeued job to be pending", timeout=120)
        evidence["held_reason"] = job_state(job).get("Reason")
        slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
        wait_for(
            lambda: (
                restored_from_file(workdir, evidence["saved_at_requeue"])
                and saved_rows(workdir) >= evidence["saved_at_requeue"] + BATCH
            ),
            "a batch saved by the requeued job's second start",
        )
        evidence.update(after_requeue_log=log_text(workdir), after_requeue_job=job_state(job))
    finally:
        # Snakemake cancels its SLURM jobs when interrupted.
        second.send_signal(signal.SIGINT)
        finish(second, timeout=120)
        output = (workdir / "run_requeue.out").read_text()
        for job_id in set(SUBMITTED.findall(output)):
            subprocess.run(["scancel", job_id], check=False, capture_output=True)
            kill_leftovers(job_id)
    evidence["requeue_output"] = output
    evidence["partial_rows"] = [
        json.loads(line)["row"] for line in (workdir / PARTIAL).read_text().splitlines()[1:] if line.strip()
    ]
    return evidence


def last_start(log: str) -> str:
    """The lines of the last start of the job in its log (from its "answers restored" line on)."""
    begins = [match.start() for match in re.finditer(RESTORED, log)]
    assert begins, log[:2000]
    return log[begins[-1] :]


def regenerated(killed_log: str, saved_at_kill: int, next_log: str) -> int:
    """Answers a kill cost: started by the killed start and not saved, so generated again by the next one."""
    killed = last_start(killed_log)
    [(restored_before, _)] = re.findall(RESTORED, killed)
    started = sum(numbers(killed, r"batch started: (\d+) answers"))
    saved = sum(numbers(killed, r"batch saved: (\d+) answers"))
    assert int(restored_before) + saved == saved_at_kill, (restored_before, saved, saved_at_kill)
    [(restored, _)] = re.findall(RESTORED, last_start(next_log))
    assert int(restored) == saved_at_kill, next_log[-2000:]
    return started - saved


def test_a_job_killed_by_its_time_limit_resumes_from_its_last_saved_batch(drill: dict) -> None:
    state = drill["timeout_job"]
    assert state["JobState"] == "TIMEOUT" and state["TimeLimit"] == "00:01:00", state
    assert drill["timeout_rc"] != 0, drill["timeout_output"][-3000:]
    assert drill["saved_at_timeout"] >= BATCH, "the time limit came before the first batch was saved"
    # The rerun restored every saved answer; only the batch in flight at the kill was drawn again.
    restored_from = drill["before_requeue_log"]
    lost = regenerated(drill["timeout_log"], drill["saved_at_timeout"], restored_from)
    assert 0 <= lost <= BATCH, lost
    assert "loaded " in last_start(restored_from)  # the unanswered rows were then sampled


def test_a_preempted_job_is_requeued_by_slurm_and_resumes_in_place(drill: dict) -> None:
    job = drill["requeued_job"]
    # SLURM itself started the same job again (Snakemake submitted it once); it was held, as SLURM holds
    # every requeued job, until the drill released it.
    assert drill["held_reason"] == "BeginTime", drill["held_reason"]
    assert drill["after_requeue_job"]["Restarts"] == "1", drill["after_requeue_job"]
    assert sampling_jobs(drill["requeue_output"]) == [job], drill["requeue_output"][-3000:]
    lost = regenerated(drill["before_requeue_log"], drill["saved_at_requeue"], drill["after_requeue_log"])
    assert 0 <= lost <= BATCH, lost
    # Across both kills, no answer was saved twice.
    rows = drill["partial_rows"]
    assert len(rows) == len(set(rows)) and len(rows) >= drill["saved_at_requeue"] + BATCH
