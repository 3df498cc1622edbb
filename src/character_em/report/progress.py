"""Where a grid in flight stands: jobs done out of total per stage, GPU-hours spent against the
estimate, and the jobs that failed, with the tail of their logs.

CLI, in the workflow directory (the one ``snakemake`` runs in)::

    python -m character_em.report.progress [--configfile presets/smoke.yaml] [--lines 8] [-- SNAKEMAKE ARGS]

Everything comes from what Snakemake itself knows and what a run leaves on disk, never from a list of
rule names kept here, so it follows the workflow as its rules change:

- **Jobs.** Two dry runs of the same workflow: ``snakemake -n --forceall`` lists every job the target
  needs, ``snakemake -n`` the ones still to run; a job is done when the second does not list it. A job
  belongs to a stage by the files it writes (``results/samples/`` is sampling, ``results/scores/``
  judging, ...: ``STAGES``).
- **Failed and started jobs.** Snakemake's logs (``.snakemake/log/*.snakemake.log``): a job still to
  run whose last event there is an error failed; one whose last event is its start, or whose output
  Snakemake marks incomplete (``.snakemake/incomplete/``), started and has not finished (running, or
  killed). Each failure is shown with the tail of its logs: the rule's log under ``logs/`` and, on
  SLURM, the executor's log under ``.snakemake/slurm_logs/``.
- **GPU-hours.** The benchmark file (``benchmarks/runs/``) of every job that asks for a GPU, wall time
  x GPUs, against ``report.estimate`` for the same config (measured throughput where earlier jobs
  give it, anchors elsewhere). Benchmark files are written by finished jobs only: hours of failed or
  killed attempts are not in the sum.

The dry runs parse the Snakefile as any cluster job does (no torch). ``CHARACTER_EM_PLAN_ONLY=1`` is set
for them, so a login node without vLLM can still plan a grid that samples with it.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "STAGES",
    "Failure",
    "Job",
    "ProgressError",
    "failures",
    "gpu_hours",
    "incomplete_outputs",
    "main",
    "parse_dry_run",
    "progress",
    "render",
    "stage_of",
]

# A job's stage is the first whose path prefixes one of its outputs; a figure is the report's.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("resources", ("resources/",)),
    ("data", ("results/data/",)),
    ("train", ("results/adapters/", "results/adapter_steps/", "results/adapters_at_step/")),
    ("sample", ("results/samples/",)),
    ("judge", ("results/scores/", "results/scores_second/", "results/tables/judge_")),
    ("capabilities", ("results/capabilities/",)),
    ("directions", ("results/probes/", "results/directions/")),
    ("report", ("results/tables/", "results/report/", "figures/", "results/estimate.md")),
)
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")
# report.estimate's stages, by the stage of this module whose jobs do that work.
ESTIMATE_STAGES = {
    "generate_data_gpu": "data",
    "train_adapter": "train",
    "sample": "sample",
    "judge": "judge",
    "judge_second": "judge",
    "capabilities": "capabilities",
    "probes": "directions",
    "steer": "directions",
    "judge_steering": "directions",
}
PLAN_ONLY_ENV = "CHARACTER_EM_PLAN_ONLY"


class ProgressError(RuntimeError):
    """The workflow could not be planned (its dry run failed)."""


@dataclass
class Job:
    """One job of a dry run."""

    rule: str
    outputs: list[str]
    logs: list[str] = field(default_factory=list)
    benchmark: str | None = None
    wildcards: dict[str, str] = field(default_factory=dict)
    gpus: float = 0.0

    @property
    def key(self) -> frozenset[str]:
        return frozenset(self.outputs)

    def describe(self) -> str:
        wildcards = ", ".join(f"{k}={v}" for k, v in self.wildcards.items())
        return f"{self.rule}" + (f" ({wildcards})" if wildcards else "")


@dataclass
class Failure:
    """A job's last error in Snakemake's logs."""

    rule: str
    outputs: list[str]
    logs: list[str]
    message: str
    snakemake_log: str


_HEADER = re.compile(r"^\s*(?:local)?(?:rule|checkpoint) (\S+):\s*$")
_ERROR = re.compile(r"^\s*Error in rule (\S+):\s*$")
_FIELD = re.compile(r"^\s+(\w[\w -]*): (.*)$")
_FINISHED = re.compile(r"^\s*Finished jobid: (\d+)")
_LOG_SUFFIX = " (check log file(s) for error details)"


def _fields(lines: Sequence[str], start: int) -> tuple[dict[str, str], int]:
    """The indented ``key: value`` lines after a header, and the index after them."""
    values: dict[str, str] = {}
    index = start
    while index < len(lines):
        match = _FIELD.match(lines[index])
        if not match:
            break
        values.setdefault(match.group(1).strip(), match.group(2).strip())
        index += 1
    return values, index


def _files(value: str | None) -> list[str]:
    if not value:
        return []
    return [item.strip() for item in value.removesuffix(_LOG_SUFFIX).split(", ") if item.strip()]


def _wildcards(value: str | None) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in (value or "").split(", ") if "=" in item]
    return {key.strip(): val.strip() for key, val in pairs}


def _gpus(resources: str | None) -> float:
    match = re.search(r"(?:^|, )gpu=([\d.]+)", resources or "")
    return float(match.group(1)) if match else 0.0


def parse_dry_run(text: str) -> list[Job]:
    """Every job a ``snakemake -n`` printout lists (jobs without outputs, such as ``all``, left out)."""
    lines = text.splitlines()
    jobs: list[Job] = []
    index = 0
    while index < len(lines):
        header = _HEADER.match(lines[index])
        if not header:
            index += 1
            continue
        values, index = _fields(lines, index + 1)
        outputs = _files(values.get("output"))
        if outputs:
            jobs.append(
                Job(
                    rule=header.group(1),
                    outputs=outputs,
                    logs=_files(values.get("log")),
                    benchmark=values.get("benchmark"),
                    wildcards=_wildcards(values.get("wildcards")),
                    gpus=_gpus(values.get("resources")),
                )
            )
    return jobs


def stage_of(outputs: Sequence[str]) -> str:
    if any(path.endswith(FIGURE_SUFFIXES) for path in outputs):
        return "report"
    for stage, prefixes in STAGES:
        if any(path.startswith(prefixes) for path in outputs):
            return stage
    return "other"


def _log_files(workdir: Path) -> list[Path]:
    # Snakemake names them by start time (2026-12-07T221544.623718.snakemake.log): sorting is chronological.
    return sorted((workdir / ".snakemake" / "log").glob("*.snakemake.log"))


def _events(workdir: Path) -> list[tuple[str, str, list[str], dict[str, str], str]]:
    """(kind, rule, outputs, fields, log file) of every job start, finish and error, oldest first."""
    events = []
    for path in _log_files(workdir):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        started: dict[str, tuple[str, list[str]]] = {}  # jobid -> (rule, outputs), within one run
        index = 0
        while index < len(lines):
            header, error = _HEADER.match(lines[index]), _ERROR.match(lines[index])
            finished = _FINISHED.match(lines[index])
            if finished and finished.group(1) in started:
                rule, outputs = started[finished.group(1)]
                events.append(("finish", rule, outputs, {}, str(path)))
            if not header and not error:
                index += 1
                continue
            values, index = _fields(lines, index + 1)
            rule = (error or header).group(1)  # type: ignore[union-attr]
            outputs = _files(values.get("output"))
            if header and "jobid" in values:
                started[values["jobid"]] = (rule, outputs)
            events.append(("error" if error else "start", rule, outputs, values, str(path)))
    return events


def failures(workdir: str | Path) -> dict[frozenset[str], Failure | None]:
    """By a job's outputs, its last event in Snakemake's logs: the error where it failed, None where it
    started and did not finish (no entry where it finished)."""
    latest: dict[frozenset[str], Failure | None] = {}
    for kind, rule, outputs, values, log in _events(Path(workdir)):
        key = frozenset(outputs)
        if not outputs:
            continue
        if kind == "finish":
            latest.pop(key, None)
            continue
        message = values.get("message", "")
        latest[key] = (
            Failure(rule, outputs, _files(values.get("log")), "" if message == "None" else message, log)
            if kind == "error"
            else None
        )
    return latest


def incomplete_outputs(workdir: str | Path) -> set[str]:
    """Outputs Snakemake marks incomplete: their job started and has not finished (running, or killed)."""
    folder = Path(workdir) / ".snakemake" / "incomplete"
    paths = set()
    for marker in folder.rglob("*") if folder.is_dir() else ():
        if marker.is_file():
            try:
                paths.add(base64.urlsafe_b64decode(marker.name.encode()).decode())
            except ValueError:
                continue
    return paths


def _dry_run(workdir: Path, args: Sequence[str], *, forceall: bool) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "snakemake", "-n", "--nolock", "--rerun-incomplete", *args]
    if forceall:
        command.append("--forceall")
    env = {**os.environ, PLAN_ONLY_ENV: "1"}
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _planned(workdir: Path, args: Sequence[str]) -> tuple[list[Job], list[Job]]:
    """(every job of the target, the jobs still to run), from two dry runs run side by side."""
    runs = {forceall: _dry_run(workdir, args, forceall=forceall) for forceall in (True, False)}
    jobs = {}
    for forceall, run in runs.items():
        stdout, stderr = run.communicate()
        if run.returncode != 0:
            shown = " ".join(["snakemake -n", *args])
            raise ProgressError(f"{shown} failed in {workdir} (exit {run.returncode}):\n{(stdout + stderr)[-3000:]}")
        jobs[forceall] = parse_dry_run(stdout)
    return jobs[True], jobs[False]


def gpu_hours(workdir: str | Path, jobs: Sequence[Job]) -> dict[str, float]:
    """Stage -> GPU-hours spent: the benchmark wall time of every job that asks for a GPU, x its GPUs."""
    from character_em.report.estimate import EstimateError, benchmark_seconds

    spent: dict[str, float] = {}
    for job in jobs:
        path = Path(workdir) / job.benchmark if job.benchmark else None
        if job.gpus <= 0 or path is None or not path.is_file():
            continue
        try:
            seconds = benchmark_seconds(path)
        except EstimateError:
            continue  # a file being written, or left empty by a killed job
        stage = stage_of(job.outputs)
        spent[stage] = spent.get(stage, 0.0) + seconds * job.gpus / 3600
    return spent


def _estimated(config: Mapping[str, Any], workdir: Path) -> tuple[dict[str, float], str]:
    """Stage -> estimated GPU-hours of the whole grid, and where the estimate's throughputs come from."""
    from character_em.report.estimate import EstimateError, estimate

    try:
        result, source = (
            estimate(config, workdir),
            "throughput measured by this run where it has any, anchors elsewhere",
        )
    except EstimateError as err:
        result, source = estimate(config, None), f"anchors only ({err})"
    hours: dict[str, float] = {}
    stages = [stage for model in result["models"].values() for stage in model["stages"]]
    if result.get("data_generation"):
        stages.append(result["data_generation"])
    for stage in stages:
        name = ESTIMATE_STAGES.get(stage["stage"], stage["stage"])
        hours[name] = hours.get(name, 0.0) + float(stage["gpu_hours"])
    return hours, source


def progress(workdir: str | Path = ".", configfile: str | None = None, args: Sequence[str] = ()) -> dict[str, Any]:
    """Where the grid of ``configfile`` (default: the workflow's config.yaml) stands in ``workdir``."""
    from character_em import config as cfg

    workdir = Path(workdir).resolve()
    snakemake_args = [*(["--configfile", configfile] if configfile else []), *args]
    every, pending = _planned(workdir, snakemake_args)
    to_run = {job.key for job in pending}
    last = failures(workdir)
    incomplete = incomplete_outputs(workdir)
    stages: dict[str, dict[str, int]] = {}
    failed: list[tuple[Job, Failure]] = []
    for job in every:
        counts = stages.setdefault(stage_of(job.outputs), {"jobs": 0, "done": 0, "failed": 0, "started": 0})
        counts["jobs"] += 1
        if job.key not in to_run:
            counts["done"] += 1
        elif last.get(job.key) is not None:
            counts["failed"] += 1
            failed.append((job, last[job.key]))  # type: ignore[arg-type]
        elif job.key in last or incomplete & job.key:
            counts["started"] += 1
    order = [name for name, _ in STAGES]
    stages = dict(sorted(stages.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    config = cfg.load_config(workdir / (configfile or "config.yaml"))
    estimated, source = _estimated(config, workdir)
    return {
        "workdir": str(workdir),
        "config": configfile or "config.yaml",
        "stages": stages,
        "gpu_hours": gpu_hours(workdir, every),
        "estimate": estimated,
        "estimate_source": source,
        "failed": failed,
    }


def _slurm_logs(workdir: Path, job: Job) -> list[str]:
    """The SLURM executor's logs of a job (.snakemake/slurm_logs/rule_{rule}/{wildcard values}/{jobid}.log)."""
    folder = (
        workdir / ".snakemake" / "slurm_logs" / f"rule_{job.rule}" / "_".join(job.wildcards.values()).replace("/", "_")
    )
    return [str(path) for path in sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)[-1:]]


def _tail(workdir: Path, path: str, lines: int) -> list[str]:
    full = Path(path) if Path(path).is_absolute() else workdir / path
    shown = os.path.relpath(full, workdir) if full.is_relative_to(workdir) else str(full)
    if not full.is_file():
        return [f"    {shown}: (not written)"]
    text = full.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return [f"    {shown} (last {len(text)} lines):", *(f"      | {line}" for line in text)]


def render(state: Mapping[str, Any], lines: int = 8) -> str:
    workdir = Path(state["workdir"])
    out = [f"Progress of {state['config']} in {workdir}", ""]
    header = f"{'stage':<14}{'jobs':>7}{'done':>7}{'failed':>8}{'started':>9}{'waiting':>9}"
    out += [
        "Jobs. done: nothing left to run; failed: its last attempt failed; started: running, or killed before",
        "it finished; waiting: not started, or to be redone (an input, parameter or the code changed).",
        header,
    ]
    total = {"jobs": 0, "done": 0, "failed": 0, "started": 0}
    for stage, counts in state["stages"].items():
        waiting = counts["jobs"] - counts["done"] - counts["failed"] - counts["started"]
        out.append(
            f"{stage:<14}{counts['jobs']:>7}{counts['done']:>7}{counts['failed']:>8}{counts['started']:>9}{waiting:>9}"
        )
        total = {key: total[key] + counts[key] for key in total}
    waiting = total["jobs"] - total["done"] - total["failed"] - total["started"]
    out.append(
        f"{'total':<14}{total['jobs']:>7}{total['done']:>7}{total['failed']:>8}{total['started']:>9}{waiting:>9}"
    )
    out += [
        "",
        "GPU-hours: spent = wall time x GPUs of the finished jobs that ask for a GPU (benchmarks/runs/);",
        "estimate = the whole grid (report.estimate), from " + state["estimate_source"] + ".",
        "Model loading is inside each stage's spent hours and its own row of the estimate.",
        f"{'stage':<16}{'spent':>10}{'estimate':>12}{'share':>8}",
    ]
    spent, estimated = state["gpu_hours"], state["estimate"]
    for stage in [*dict.fromkeys([*state["stages"], *estimated])]:
        if stage not in spent and stage not in estimated:
            continue
        in_stages = stage not in state["stages"] and stage not in spent
        share = f"{spent.get(stage, 0.0) / estimated[stage]:.0%}" if estimated.get(stage) and not in_stages else ""
        value = f"{estimated[stage]:,.1f}" if stage in estimated else "-"
        used = "-" if in_stages else f"{spent.get(stage, 0.0):,.2f}"
        out.append(f"{stage:<16}{used:>10}{value:>12}{share:>8}")
    all_spent, all_estimated = sum(spent.values()), sum(estimated.values())
    share = f"{all_spent / all_estimated:.0%}" if all_estimated else ""
    out.append(f"{'total':<16}{all_spent:>10,.2f}{all_estimated:>12,.1f}{share:>8}")
    out += ["", f"Failed jobs: {len(state['failed'])}"]
    for job, failure in state["failed"]:
        out.append(f"  {job.describe()}: failed (in {os.path.relpath(failure.snakemake_log, workdir)})")
        if failure.message:
            out.append(f"    message: {failure.message}")
        logs = list(dict.fromkeys([*job.logs, *failure.logs]))
        if not any(".snakemake/slurm_logs/" in path for path in logs):
            logs += _slurm_logs(workdir, job)
        for path in logs:
            out += _tail(workdir, path, lines)
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="python -m character_em.report.progress", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--configfile", help="the config the grid runs with (default: the workflow's config.yaml)")
    parser.add_argument("--directory", default=".", help="the workflow directory (default: .)")
    parser.add_argument("--lines", type=int, default=8, help="log lines shown per failed job (default 8)")
    args = parser.parse_args(argv)
    try:
        state = progress(args.directory, args.configfile, extra)
    except ProgressError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(render(state, args.lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
