"""Partition and account of the SLURM profile: from profiles/slurm/config.yaml or the environment.

The profile reads CHARACTER_EM_SLURM_PARTITION / _ACCOUNT (then SBATCH_PARTITION / SBATCH_ACCOUNT,
then its own `site_partition` / `site_account`) with YTE templating, and leaves `default-resources`
out when none is set. Checked three ways: Snakemake's own profile parser, a dry run through
`--profile slurm`, and (slow, root, tests/slurm_cluster.sh installed) a real submission whose
partition slurmctld reports.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from workflow_helpers import ROOT, copy_workflow, snakemake

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
VARIABLES = (
    "CHARACTER_EM_SLURM_PARTITION",
    "SBATCH_PARTITION",
    "CHARACTER_EM_SLURM_ACCOUNT",
    "SBATCH_ACCOUNT",
    "CHARACTER_EM_SET_RESOURCES",
)
needs_plugin = pytest.mark.skipif(
    importlib.util.find_spec("snakemake_executor_plugin_slurm") is None,
    reason="snakemake-executor-plugin-slurm is not installed: pip install -e '.[cluster]'",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def parsed_profile(path: Path = PROFILE) -> dict:
    from snakemake.profiles import ProfileConfigFileParser

    with path.open() as handle:
        return dict(ProfileConfigFileParser().parse(handle))


def test_no_site_setting_leaves_default_resources_out(clean_env: pytest.MonkeyPatch) -> None:
    profile = parsed_profile()
    assert "default-resources" not in profile
    # The rest of the profile is read as before.
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    # An adapter's capability evals share a SLURM job; its training runs apart, and sampling is one job per
    # model and seed in no group (docs/cluster.md).
    assert profile["groups"] == [
        "capabilities=eval-{model}-{condition}-seed{seed}",
        "capabilities_step=eval-{model}-{condition}-seed{seed}",
    ]


def test_environment_variables_set_partition_and_account(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SBATCH_PARTITION", "all")  # SLURM's own variable, read when ours is unset
    assert parsed_profile()["default-resources"] == ["slurm_partition='all'"]
    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "gpu")
    clean_env.setenv("CHARACTER_EM_SLURM_ACCOUNT", "my-lab")
    clean_env.setenv("SBATCH_ACCOUNT", "other-lab")
    assert parsed_profile()["default-resources"] == ["slurm_partition='gpu'", "slurm_account='my-lab'"]
    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "  ")  # blank counts as unset
    assert parsed_profile()["default-resources"][0] == "slurm_partition='all'"


def test_profile_values_are_the_fallback(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    text = PROFILE.read_text()
    assert text.count('  - site_partition = ""\n') == 1 and text.count('  - site_account = ""\n') == 1
    edited = tmp_path / "config.yaml"
    edited.write_text(
        text.replace('site_partition = ""', 'site_partition = "long"').replace(
            'site_account = ""', 'site_account = "lab"'
        )
    )
    assert parsed_profile(edited)["default-resources"] == ["slurm_partition='long'", "slurm_account='lab'"]
    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "short")
    assert parsed_profile(edited)["default-resources"] == ["slurm_partition='short'", "slurm_account='lab'"]


def smoke_workdir(tmp_path: Path) -> Path:
    workdir = copy_workflow(tmp_path / "wf")
    assert (workdir / "slurm").is_symlink()
    return workdir


@needs_plugin
def test_dry_run_shows_the_resolved_partition(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    workdir = smoke_workdir(tmp_path)
    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "gpu-a")
    clean_env.setenv("CHARACTER_EM_SLURM_ACCOUNT", "lab-x")
    target = "results/data/evil-medical/pool.jsonl"
    result = snakemake(workdir, "--profile", "slurm", "--configfile", "presets/smoke.yaml", "-n", target, timeout=300)
    text = result.stdout + result.stderr
    resources = re.findall(r"resources: (.*)", text)
    assert resources, text[-3000:]
    assert all("slurm_partition=gpu-a" in line and "slurm_account=lab-x" in line for line in resources), resources
    clean_env.delenv("CHARACTER_EM_SLURM_PARTITION")
    clean_env.delenv("CHARACTER_EM_SLURM_ACCOUNT")
    result = snakemake(workdir, "--profile", "slurm", "--configfile", "presets/smoke.yaml", "-n", target, timeout=300)
    assert "slurm_partition" not in result.stdout + result.stderr


# --------------------------------------------------------------------------- a real submission

STATE = Path(tempfile.gettempdir()) / "character-em-slurm-site-pytest"
CLUSTER_ENV = {"CHARACTER_EM_SLURM_DIR": str(STATE), "CHARACTER_EM_SLURM_PORT": "16837"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    from test_slurm import missing_prerequisite

    reason = missing_prerequisite()
    if reason:
        pytest.skip(reason)
    script = ["bash", str(ROOT / "tests" / "slurm_cluster.sh")]
    env = {**os.environ, **CLUSTER_ENV}
    up = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"SLURM_CONF": str(STATE / "slurm.conf")}
    finally:
        down = subprocess.run([*script, "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr


@pytest.mark.slow
def test_sbatch_gets_the_partition_from_the_environment(
    cluster: dict[str, str], tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    workdir = smoke_workdir(tmp_path)
    args = [
        "--profile", "slurm", "--configfile", "presets/smoke.yaml", "--cores", "1",
        "--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
        "--latency-wait", "5", "--retries", "0",
    ]  # fmt: skip
    for name, value in cluster.items():
        clean_env.setenv(name, value)
    # The test node's size, as a site sets single values (docs/cluster.md): merged into the workflow
    # profile's table, so the data job keeps its runtime and reaches sbatch with the memory given here.
    clean_env.setenv("CHARACTER_EM_SET_RESOURCES", "*:gpu=0 *:mem_mb=500")
    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "no_such_partition")
    # One job: a condition's pool (its train.jsonl would wait for its whole domain's pools).
    refused = snakemake(workdir, *args, "results/data/evil-medical/pool.jsonl", check=False, timeout=300)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "no_such_partition" in text and "nvalid partition" in text, text[-3000:]

    clean_env.setenv("CHARACTER_EM_SLURM_PARTITION", "debug")  # the test cluster's only partition
    done = snakemake(workdir, *args, "results/data/evil-medical/pool.jsonl", timeout=600)
    text = done.stdout + done.stderr
    [job] = re.findall(r"has been submitted with SLURM jobid (\d+)", text)
    info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    assert "Partition=debug " in info and "JobState=COMPLETED" in info, info
    profile = yaml.safe_load((workdir / "profiles" / "default" / "config.yaml").read_text())["set-resources"]
    assert "MinMemoryNode=500M" in info, info
    assert (
        f"TimeLimit={profile['generate_data']['runtime'] // 60:02d}:{profile['generate_data']['runtime'] % 60:02d}:00"
        in info
    ), info
    assert (workdir / "results/data/evil-medical/pool.jsonl").stat().st_size > 0
