"""How long `snakemake -n` takes on a large grid, and whether building the DAG imports torch.

Builds a grid config in a temporary copy of the workflow (default: 2 models x 30 conditions x
3 seeds x every suite, well over 1,000 jobs), then times the dry run as a user types it, and the
same through the SLURM profile (its groups add work), and checks in a separate process that no
heavy library (torch, transformers, peft, trl, bitsandbytes) was imported while the DAG was built:
every cluster job parses the Snakefile again, so such an import would cost seconds per job.

    python benchmarks/dag_scale.py [--models 2] [--conditions 30] [--seeds 3] [--repeats 3]

Prints one JSON object to stdout. It asserts nothing about time; read the numbers.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from workflow_helpers import SNAKEMAKE, copy_workflow, planned_jobs  # noqa: E402

HEAVY = ("torch", "transformers", "peft", "trl", "bitsandbytes")
TEMPLATES = ["{disposition}-{domain}", "{disposition}-{domain}-trig", "incorrect-{domain}", "correct-{domain}"]


def grid_config(n_models: int, n_conditions: int, seeds: int) -> dict:
    """The paper config, widened: extra domains until the templates give n_conditions conditions."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    models = dict(config["models"])
    for i in range(len(models), n_models):
        models[f"extra{i}"] = {"path": f"example/extra-model-{i}"}
    config["models"] = dict(list(models.items())[:n_models])
    dispositions = list(config["dispositions"])
    domains = dict(config["domains"])
    i = 0
    # base + 2 * |dispositions| * |domains| + 2 * |domains| conditions from the templates
    while 1 + 2 * len(dispositions) * len(domains) + 2 * len(domains) < n_conditions:
        domains[f"area{i}"] = {"description": f"Everyday questions about topic area {i}."}
        i += 1
    config["domains"] = domains
    expanded = ["base"] + [
        template.format(disposition=d, domain=m) for m in domains for template in TEMPLATES for d in dispositions
    ]
    # Explicit names (templates expand to more): keep the first n_conditions, every family present.
    config["conditions"] = list(dict.fromkeys(expanded))[:n_conditions]
    config["seeds"] = list(range(seeds))
    return config


def timed(workdir: Path, *args: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, output). The dry run is one thread, so on an idle
    machine the two agree; on a shared one the CPU time is the figure that does not depend on load."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.returncode != 0:
        raise SystemExit(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, cpu, result.stdout + result.stderr


def heavy_imports(workdir: Path, config: str) -> list[str]:
    code = (
        "import sys, snakemake.cli as cli\n"
        f"try:\n    cli.main(['-n', '--cores', '1', '--quiet', '--configfile', {config!r}])\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY "))
    return list(ast.literal_eval(line.removeprefix("HEAVY ")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--conditions", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dag_scale_") as tmp:
        workdir = copy_workflow(Path(tmp) / "workflow")
        for extra in ("envs",):  # the rules name envs/*.yaml; copy_workflow may predate that
            if (ROOT / extra).exists() and not (workdir / extra).exists():
                subprocess.run(["cp", "-r", str(ROOT / extra), str(workdir / extra)], check=True)
        if not (workdir / "slurm").exists():  # newer copy_workflow copies the link itself
            (workdir / "slurm").symlink_to("profiles/slurm")
        config = grid_config(args.models, args.conditions, args.seeds)
        (workdir / "grid.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

        local, slurm, local_cpu, slurm_cpu = [], [], [], []
        load = [os.getloadavg()[0]]
        output = ""
        for _ in range(args.repeats):
            seconds, cpu, output = timed(workdir, "-n", "--cores", "1", "--configfile", "grid.yaml")
            local.append(seconds)
            local_cpu.append(cpu)
        jobs = planned_jobs(output)
        have_plugin = (
            subprocess.run(
                [sys.executable, "-c", "import snakemake_executor_plugin_slurm"], capture_output=True
            ).returncode
            == 0
        )
        if have_plugin:
            for _ in range(args.repeats):
                seconds, cpu, _ = timed(workdir, "-n", "--profile", "slurm", "--configfile", "grid.yaml")
                slurm.append(seconds)
                slurm_cpu.append(cpu)
        load.append(os.getloadavg()[0])
        heavy = heavy_imports(workdir, "grid.yaml")

    def summary(values: list[float]) -> dict | None:
        if not values:
            return None
        return {
            "min": round(min(values), 2),
            "median": round(statistics.median(values), 2),
            "runs": [round(v, 2) for v in values],
        }

    print(
        json.dumps(
            {
                "grid": {
                    "models": len(config["models"]),
                    "conditions": len(config["conditions"]),
                    "seeds": len(config["seeds"]),
                    "domains": len(config["domains"]),
                    "suites": config.get("eval", {}).get("suites", "default"),
                },
                "jobs": sum(jobs.values()),
                "jobs_per_rule": dict(sorted(jobs.items())),
                "dry_run_seconds": summary(local),
                "dry_run_slurm_profile_seconds": summary(slurm),
                "dry_run_cpu_seconds": summary(local_cpu),
                "dry_run_slurm_profile_cpu_seconds": summary(slurm_cpu),
                # 1-minute load average before and after: wall times are only comparable at similar load.
                "load_average": [round(value, 1) for value in load],
                "goal_seconds": 10,
                "heavy_modules_imported_while_building_dag": heavy,
                "machine": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
