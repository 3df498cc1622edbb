"""The cluster path against a real SLURM: `snakemake --profile slurm` on a single-node cluster.

tests/slurm_cluster.sh starts slurmctld, slurmd and munged on localhost (Debian's slurm-wlm 22.05).
The node declares two stand-in GPUs (Gres backed by /dev/null), so the workflow profile's `gpu`
requests go to SLURM as real `--gpus` requests while torch stays on the CPU. Memory and runtime are
shrunk to fit the test node; nothing else about the profiles is changed.

One module fixture runs, on a reduced smoke grid (base + one character condition, suites em,
transfer and capabilities):

1. the workflow locally (two cores, one thread per job), as the reference;
2. the same workflow through `--profile slurm`, cancelling the adapter's SLURM job with scancel
   once training has written a checkpoint (`--retries 0`, so the run fails);
3. the same command again, which must resume training from the checkpoint and finish;
4. a dry run, which must have nothing to do.

The tests then read the evidence: job ids in Snakemake's output, in slurmctld's log and in
.snakemake/slurm_logs; outputs against the local run; the resume in run.json and train_log.jsonl;
the job shapes (training alone, one sampling job per seed, an adapter's evaluations grouped) in the
SLURM job logs and in `scontrol show job`.

Install the cluster once with `bash tests/slurm_cluster.sh install` (root, apt). Without it, or
without root, or without snakemake-executor-plugin-slurm, the tests skip and say why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from workflow_helpers import PLAN_ONLY, ROOT, TWO_JOBS_AT_ONCE, copy_workflow, snakemake

pytestmark = pytest.mark.slow

FIXTURE = ROOT / "tests" / "slurm_cluster.sh"
# Its own state folder and ports, so a cluster started by hand with the fixture's defaults is
# not the one these tests stop.
STATE = Path(os.environ.get("CHARACTER_EM_SLURM_TEST_DIR", Path(tempfile.gettempdir()) / "character-em-slurm-pytest"))
CLUSTER_ENV = {"CHARACTER_EM_SLURM_DIR": str(STATE), "CHARACTER_EM_SLURM_PORT": "16827", "CHARACTER_EM_SLURM_GPUS": "2"}
CONFIG = "cluster_test.yaml"
MODEL, CONDITION, SEED = "tiny-llama", "evil-medical", 0
CHECKPOINTS = f"results/checkpoints/{MODEL}/{CONDITION}/seed{SEED}"
ADAPTER = f"results/adapters/{MODEL}/{CONDITION}/seed{SEED}"
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+)")
SLURM_BINARIES = ["sbatch", "squeue", "scancel", "scontrol", "sinfo", "srun", "slurmctld", "slurmd", "munged"]


def missing_prerequisite() -> str | None:
    """Why the cluster tests cannot run here, or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [name for name in SLURM_BINARIES if shutil.which(name, path=path) is None]
    if missing:
        return (
            f"SLURM is not installed (missing {', '.join(missing)}): run `bash tests/slurm_cluster.sh install` as root"
        )
    if os.geteuid() != 0:
        return "the single-node test cluster runs its daemons as root; run the tests as root"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed: pip install -e '.[cluster]'"
    return None


def cluster_script(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(FIXTURE), command], env={**os.environ, **CLUSTER_ENV}, capture_output=True, text=True, timeout=300
    )


def slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def slurm_cluster() -> Path:
    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    up = cluster_script("up")
    if up.returncode != 0:
        cluster_script("down")  # `up` stops what it started on failure; this is belt and braces
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((STATE / "log").glob("*.log")))
        raise AssertionError(f"slurm_cluster.sh up failed:\n{up.stdout}\n{up.stderr}\n{logs}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(STATE / "slurm.conf")
    try:
        yield STATE
    finally:
        down = cluster_script("down")
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        assert down.returncode == 0, down.stderr


# --------------------------------------------------------------------------- the runs


def prepare(workdir: Path) -> Path:
    copy_workflow(workdir)
    # Users type `--profile slurm` from the project root, where `slurm` links to profiles/slurm.
    assert (workdir / "slurm").is_symlink()
    preset = yaml.safe_load((workdir / "presets" / "smoke.yaml").read_text())
    preset["conditions"] = ["base", "{disposition}-{domain}"]
    preset.setdefault("data", {})["n_examples"] = 32
    # 8 optimizer steps with a checkpoint every 2: time to cancel while training runs.
    preset.setdefault("train", {})["save_steps"] = 2
    preset["suites"] = {
        "em": {"n_samples": 2, "max_questions": 4, "formats": ["plain"]},
        "transfer": {"n_samples": 2, "max_questions": 3},
    }
    preset["eval"] = {
        **preset.get("eval", {}),
        "suites": ["em", "transfer", "capabilities"],
        "capabilities": {"max_items": 8},
    }
    (workdir / CONFIG).write_text(yaml.safe_dump(preset, sort_keys=False))
    return workdir


def cluster_args(workdir: Path) -> list[str]:
    """`--profile slurm` as users type it, with memory and runtime shrunk to fit the test node."""
    profile = yaml.safe_load((workdir / "profiles" / "default" / "config.yaml").read_text())
    resources = [
        f"{rule}:{name}={value}"
        for rule, declared in sorted(profile["set-resources"].items())
        # The GPU request stays what the workflow profile says (stand-in GPUs on the node).
        for name, value in (("gpu", declared.get("gpu", 0)), ("mem_mb", 1000), ("runtime", 30))
    ]
    return [
        "--configfile", CONFIG,
        "--profile", "slurm",
        # One thread per job, as in the local run: two jobs at once on the two-CPU node.
        *TWO_JOBS_AT_ONCE,
        "--set-resources", *resources,
        # Poll SLURM every few seconds instead of the plugin's 40 s (MinJobAge on the node is 600 s).
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        "--slurm-keep-successful-logs",
        "--latency-wait", "5",
    ]  # fmt: skip


def complete_checkpoints(workdir: Path) -> list[int]:
    return sorted(
        int(path.parent.name.removeprefix("checkpoint-"))
        for path in (workdir / CHECKPOINTS).glob("checkpoint-*/trainer_state.json")
    )


def job_processes(job_id: str, marker: str) -> list[int]:
    """Live processes of a SLURM job (by the SLURM_JOB_ID slurmstepd gave them) whose command line has marker."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
            command = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in variables and marker.encode() in command:
            found.append(int(environ.parent.name))
    return found


def scontrol_jobs(output: str) -> dict[str, str]:
    """`scontrol show job -o` for every job id a run submitted (kept by slurmctld for MinJobAge)."""
    return {job: slurm("scontrol", "show", "job", "-o", job).strip() for job in SUBMITTED.findall(output)}


@dataclass
class Runs:
    local: Path
    cluster: Path
    local_run: subprocess.CompletedProcess[str]
    first: subprocess.CompletedProcess[str]
    rerun: subprocess.CompletedProcess[str]
    dry: subprocess.CompletedProcess[str]
    cancelled_job: str
    checkpoints_after_cancel: list[int]
    jobs: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def text(result: subprocess.CompletedProcess[str]) -> str:
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(slurm_cluster: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    seconds: dict[str, float] = {}
    start = time.monotonic()
    local = prepare(tmp_path_factory.mktemp("local"))
    local_run = snakemake(local, "--configfile", CONFIG, *TWO_JOBS_AT_ONCE, timeout=900)
    seconds["local run"] = time.monotonic() - start

    cluster = prepare(tmp_path_factory.mktemp("cluster"))
    args = cluster_args(cluster)
    first: list[subprocess.CompletedProcess[str]] = []
    start = time.monotonic()
    thread = threading.Thread(
        target=lambda: first.append(snakemake(cluster, *args, "--retries", "0", check=False, timeout=900))
    )
    thread.start()
    while thread.is_alive() and not complete_checkpoints(cluster) and time.monotonic() - start < 600:
        time.sleep(0.2)
    assert complete_checkpoints(cluster), (
        f"training wrote no checkpoint under {CHECKPOINTS} before the run ended:\n"
        + (Runs.text(first[0])[-6000:] if first else "(still running after 600 s)")
    )
    running = slurm("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k")
    training = [line.split("|")[0] for line in running.splitlines() if "train_adapter" in line]
    assert len(training) == 1, f"expected one running SLURM job with train_adapter in its comment:\n{running}"
    slurm("scancel", training[0])
    thread.join(timeout=900)
    assert first and not thread.is_alive(), "the cancelled run did not finish"
    # The first run exits once its other jobs are done; let SLURM finish tearing the job down.
    for _ in range(150):
        if not slurm("squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING,CONFIGURING", "-o", "%i").strip():
            break
        time.sleep(0.2)
    # The trainer saves a checkpoint on SIGTERM; it must be gone before the rerun resumes from it.
    # (proctrack/linuxproc loses processes whose parent exited first; the fixture's `down` stops them.)
    for _ in range(300):
        if not job_processes(training[0], "train_adapter"):
            break
        time.sleep(0.2)
    assert not job_processes(training[0], "train_adapter"), "the cancelled trainer is still running"
    checkpoints = complete_checkpoints(cluster)
    jobs = scontrol_jobs(Runs.text(first[0]))
    seconds["cluster run, cancelled"] = time.monotonic() - start

    start = time.monotonic()
    rerun = snakemake(cluster, *args, timeout=900)
    jobs |= scontrol_jobs(Runs.text(rerun))
    seconds["cluster rerun"] = time.monotonic() - start
    dry = snakemake(cluster, *args, "-n", timeout=300)
    print("\ncluster test timings (s):", json.dumps({k: round(v, 1) for k, v in seconds.items()}))
    return Runs(local, cluster, local_run, first[0], rerun, dry, training[0], checkpoints, jobs, seconds)


# --------------------------------------------------------------------------- helpers


def slurm_job_logs(workdir: Path) -> dict[str, Path]:
    """SLURM job id -> the job's log under .snakemake/slurm_logs (kept with --slurm-keep-successful-logs)."""
    return {path.stem: path for path in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}


def rule_runs(log: str) -> list[tuple[str, str]]:
    """(rule, wildcards) of every job the inner Snakemake of one SLURM job ran."""
    runs = []
    for block in re.split(r"\n(?=[ \t]*\[[^\]\n]+\]\n)", log):
        rule = re.search(r"^\s*rule (\w+):", block, re.MULTILINE)
        if rule:
            wildcards = re.search(r"wildcards: (.*)", block)
            runs.append((rule.group(1), wildcards.group(1).strip() if wildcards else ""))
    return runs


def dry_run_groups(output: str) -> list[list[tuple[str, str]]]:
    """The member jobs of every group job a dry run lists (indented under "Group job ...")."""
    groups = []
    for piece in output.split("Group job eval-")[1:]:
        end = re.search(r"^(?:\[|Job stats|Reasons)", piece, re.MULTILINE)
        groups.append(rule_runs(piece[: end.start()] if end else piece))
    return groups


def output_files(workdir: Path) -> set[str]:
    return {
        str(path.relative_to(workdir))
        for top in ("results", "figures", "resources")
        for path in (workdir / top).rglob("*")
        if path.is_file() and ".cache" not in path.parts
    }


# --------------------------------------------------------------------------- tests


def test_every_job_went_through_sbatch(runs: Runs, slurm_cluster: Path) -> None:
    output = Runs.text(runs.first) + Runs.text(runs.rerun)
    job_ids = SUBMITTED.findall(output)
    assert job_ids, output[-4000:]
    accepted = set(
        re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", (slurm_cluster / "log" / "slurmctld.log").read_text())
    )
    assert set(job_ids) <= accepted, (
        f"job ids Snakemake reported but slurmctld never accepted: {set(job_ids) - accepted}"
    )
    logs = slurm_job_logs(runs.cluster)
    assert set(job_ids) <= set(logs), f"no SLURM log for {set(job_ids) - set(logs)}"
    # Every rule but the target `all` ran inside a SLURM job.
    ran = {rule for job in job_ids for rule, _ in rule_runs(logs[job].read_text())}
    # (A local run prints each job as "localrule NAME:".)
    local_rules = set(re.findall(r"^\s*(?:local)?rule (\w+):", Runs.text(runs.local_run), re.MULTILINE))
    # Rules declared local (publishing a saved adapter step is a link, not a job) run on the head node.
    on_head = set(re.findall(r"^\s*localrule (\w+):", output, re.MULTILINE))
    assert on_head <= {"all", "publish_adapter_step"}, on_head
    assert ran == local_rules - on_head - {"all"}, (ran, local_rules, on_head)
    # Status came from squeue: the plugin says so when it falls back to sacct.
    assert "Falling back to 'sacct'" not in output
    assert "Nothing to be done" in Runs.text(runs.dry), Runs.text(runs.dry)[-3000:]


def test_cluster_outputs_match_the_local_run(runs: Runs) -> None:
    local, cluster = output_files(runs.local), output_files(runs.cluster)
    assert local == cluster, {"only local": sorted(local - cluster), "only cluster": sorted(cluster - local)}
    different = []
    for name in sorted(local):
        a, b = runs.local / name, runs.cluster / name
        if name.endswith(".pdf"):
            continue  # matplotlib stamps the creation date into PDFs
        if name.endswith("run.json"):
            # Timings and the resume record differ by design; what was trained must not.
            keys = (
                "base_model",
                "data_sha256",
                "seed",
                "hparams",
                "global_step",
                "quantization",
                "trained_tokens_total",
            )
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            if {k: ja.get(k) for k in keys} != {k: jb.get(k) for k in keys}:
                different.append(name)
        elif name.endswith(".wave.json"):
            # A sampling job's record: its seconds differ by design; what it sampled and loaded must not.
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for record in (ja, jb):
                record.pop("load_seconds"), record.pop("generate_seconds")
            if ja != jb:
                different.append(name)
        elif name.endswith("adapter_config.json"):
            # peft writes target_modules from a set: same modules, any order.
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            for config in (ja, jb):
                if isinstance(config.get("target_modules"), list):
                    config["target_modules"] = sorted(config["target_modules"])
            if ja != jb:
                different.append(name)
        elif a.read_bytes() != b.read_bytes():
            different.append(name)
    assert not different, f"cluster outputs differ from the local run: {different}"


def test_cancelled_training_resumes_from_its_checkpoint_on_rerun(runs: Runs) -> None:
    first = Runs.text(runs.first)
    assert runs.first.returncode != 0, "the run whose training job was cancelled should have failed"
    assert "Error in rule train_adapter" in first, first[-4000:]
    assert "JobState=CANCELLED" in runs.jobs[runs.cancelled_job], runs.jobs[runs.cancelled_job]
    job_log = slurm_job_logs(runs.cluster)[runs.cancelled_job].read_text()
    assert re.search(rf"\*\*\* JOB {runs.cancelled_job} ON \S+ CANCELLED AT", job_log), job_log[-3000:]
    assert runs.checkpoints_after_cancel, "no complete checkpoint survived the cancellation"
    run = json.loads((runs.cluster / ADAPTER / "run.json").read_text())
    assert run["resumed_from_step"] == max(runs.checkpoints_after_cancel), run
    steps = [json.loads(line)["step"] for line in (runs.cluster / ADAPTER / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, run["global_step"] + 1)), steps
    train_log = (runs.cluster / f"logs/train_adapter/{MODEL}/{CONDITION}/seed{SEED}.log").read_text()
    assert "resuming from" in train_log
    # Finished training removes its checkpoints; the resumed adapter is the uninterrupted one.
    assert not complete_checkpoints(runs.cluster)
    assert (runs.cluster / ADAPTER / "adapter_model.safetensors").read_bytes() == (
        runs.local / ADAPTER / "adapter_model.safetensors"
    ).read_bytes(), "resuming changed the trained weights"


def test_training_sampling_and_an_adapters_evaluations_are_separate_jobs_on_one_gpu(runs: Runs) -> None:
    """Training is its own job; one job samples every condition of the seed with one engine (rules/sample.smk);
    profiles/slurm groups an adapter's capability evals (final and at its saved steps) into one job. No group
    holds training, so a failed evaluation cannot remove the adapter."""
    logs = slurm_job_logs(runs.cluster)
    job_ids = SUBMITTED.findall(Runs.text(runs.first) + Runs.text(runs.rerun))
    adapter = f"model={MODEL}, trained={CONDITION}, seed={SEED}"
    evaluated = f"model={MODEL}, condition={CONDITION}, seed={SEED}"
    [train_job] = [
        job
        for job in SUBMITTED.findall(Runs.text(runs.rerun))
        if ("train_adapter", adapter) in rule_runs(logs[job].read_text())
    ]
    assert set(rule_runs(logs[train_job].read_text())) == {("train_adapter", adapter)}
    # The seed's sampling: one SLURM job, the rule alone, every condition and suite inside it (the wave's log).
    [sample_job] = [job for job in job_ids if any(rule == "sample" for rule, _ in rule_runs(logs[job].read_text()))]
    assert rule_runs(logs[sample_job].read_text()) == [("sample", f"model={MODEL}, seed={SEED}")]
    wave_log = (runs.cluster / f"logs/sample/{MODEL}/seed{SEED}.log").read_text()
    for label in ("base/em", "base/transfer", f"{CONDITION}/em", f"{CONDITION}/transfer", f"{CONDITION}/step3/em"):
        assert f"{label}: answers generated in this run:" in wave_log, label
    assert re.search(r"TresPerJob=gres:gpu:1\b", runs.jobs[sample_job]), runs.jobs[sample_job]
    # The adapter's capability evals share one job and take turns on its one GPU (the profile's local limit).
    [group_job] = [job for job in job_ids if ("capabilities", evaluated) in rule_runs(logs[job].read_text())]
    ran = set(rule_runs(logs[group_job].read_text()))
    assert ran == {
        ("capabilities", evaluated),
        ("capabilities_step", f"{evaluated}, step=step3"),
        ("capabilities_step", f"{evaluated}, step=epoch1"),
    }, ran
    info = runs.jobs[group_job]
    assert re.search(r"TresPerJob=gres:gpu:1\b", info), info
    assert "NumCPUs=1 " in info, info
    # The base model has no saved steps: its capability eval is a group of one.
    base = f"model={MODEL}, condition=base, seed={SEED}"
    base_jobs = [set(rule_runs(logs[job].read_text())) for job in job_ids]
    assert {("capabilities", base)} in base_jobs, base_jobs


def test_paper_grid_samples_once_per_model_and_seed_and_groups_each_adapters_evaluations(tmp_path: Path) -> None:
    """The dry run of the paper grid through the SLURM profile: one sampling job per model and seed, in no
    group; one evaluation group job per adapter (and per base model and seed); training never in a group."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed: pip install -e '.[cluster]'")
    workdir = prepare(tmp_path / "paper")
    # Only listing the jobs: vLLM, which the paper grid samples with, need not be importable here.
    result = snakemake(workdir, "--profile", "slurm", "-n", timeout=600, env=PLAN_ONLY)
    output = Runs.text(result)
    groups = dry_run_groups(output)
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    models, seeds = len(config["models"]), len(config["seeds"])
    dispositions, domains = len(config["dispositions"]), len(config["domains"])
    # Character, triggered, incorrect, correct, and the severity-matched arm of each character condition.
    matched = dispositions * domains if config["data"].get("severity_matched", {}).get("enabled") else 0
    trained = 2 * dispositions * domains + 2 * domains + matched
    assert len(groups) == models * (trained + 1) * seeds
    # The paper grid saves no intermediate steps: each group is its adapter's capability eval.
    assert all([rule for rule, _ in group] == ["capabilities"] for group in groups), groups[:3]
    samples = [wc for rule, wc in rule_runs(output) if rule == "sample"]
    assert sorted(samples) == sorted(f"model={m}, seed={s}" for m in config["models"] for s in config["seeds"])
