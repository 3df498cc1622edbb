"""Running the real Snakemake CLI on a copy of the workflow, as users do."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = [
    "Snakefile",
    "config.yaml",
    "envs",
    "rules",
    "workflow_scripts",
    "schemas",
    "presets",
    "profiles",
    "report",
    "slurm",
]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
# The tiny model's jobs are mostly single-threaded imports and model loads. The profile's thread counts, scaled
# down to two cores, run them one at a time; at one thread each, two run at once (smoke run: 820 s -> 469 s,
# measured 2026-12-02 on two cores).
TWO_JOBS_AT_ONCE = ("--cores", "2", "--max-threads", "1")


def copy_workflow(destination: Path) -> Path:
    """A project checkout in a temporary folder, so runs never touch the repository's results/."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        target = destination / name
        if source.is_symlink():
            if not target.is_symlink():
                target.symlink_to(os.readlink(source))
        elif source.is_dir():
            shutil.copytree(source, destination / name, dirs_exist_ok=True)
        else:
            shutil.copy2(source, destination / name)
    return destination


# A dry run that only lists or prices the paper grid, whose GPU rules run vLLM, on this machine without vLLM
# (character_em.preflight skips its import check then, and only then).
PLAN_ONLY = {"CHARACTER_EM_PLAN_ONLY": "1"}


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 1800, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    result = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


def planned_jobs(output: str) -> Counter[str]:
    """Rule -> job count from the 'Job stats' table that a dry run prints."""
    counts: Counter[str] = Counter()
    table = output.split("Job stats:", 1)
    if len(table) < 2:
        return counts
    for line in table[1].splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match:
            break
        if match.group(1) != "total":
            counts[match.group(1)] += int(match.group(2))
    return counts


def planned_wildcards(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) for every job a dry run lists."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for block in re.split(r"\n(?=(?:local)?rule \S+:)", output):
        header = re.match(r"(?:local)?rule (\S+):", block.strip())
        if not header:
            continue
        wildcards = re.search(r"wildcards: (.*)", block)
        values = dict(pair.split("=", 1) for pair in wildcards.group(1).split(", ")) if wildcards else {}
        jobs.append((header.group(1), values))
    return jobs
