"""Proof that a refactor changed no result: run the smoke preset and compare every table with a reference.

    python scripts/compare_smoke_tables.py --write tests/reference/smoke_tables.json   # record, once
    python scripts/compare_smoke_tables.py tests/reference/smoke_tables.json           # compare

Tables are compared by the sha256 of their bytes (results/tables/*.csv and *.md). The smoke preset fixes
every seed (training, per-sample sampling, bootstraps), so the same code gives byte-identical tables.
``--results DIR`` compares an existing run's results folder instead of running the workflow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from character_em.hashing import sha256_file

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ["Snakefile", "config.yaml", "envs", "rules", "workflow_scripts", "schemas", "presets", "profiles", "report"]


def run_smoke(workdir: Path) -> Path:
    for name in WORKFLOW:
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, workdir / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "snakemake", "--configfile", "presets/smoke.yaml", "--cores", "2"]
    subprocess.run(command, cwd=workdir, env=env, check=True)
    return workdir / "results"


def table_hashes(results: Path) -> dict[str, str]:
    tables = sorted((results / "tables").glob("*.csv")) + sorted((results / "tables").glob("*.md"))
    return {path.name: sha256_file(path) for path in sorted(tables)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("--write", action="store_true", help="record the reference instead of comparing")
    parser.add_argument("--results", type=Path, help="an existing results/ folder (skip running the workflow)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smoke-tables-") as tmp:
        results = args.results or run_smoke(Path(tmp))
        hashes = table_hashes(results)
    if not hashes:
        print(f"no tables under {results}/tables", file=sys.stderr)
        return 2
    if args.write:
        args.reference.parent.mkdir(parents=True, exist_ok=True)
        args.reference.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
        print(f"recorded {len(hashes)} tables in {args.reference}")
        return 0
    reference = json.loads(args.reference.read_text())
    changed = sorted(name for name in reference.keys() & hashes.keys() if reference[name] != hashes[name])
    missing = sorted(reference.keys() - hashes.keys())
    added = sorted(hashes.keys() - reference.keys())
    same = len(reference.keys() & hashes.keys()) - len(changed)
    print(f"{same} identical, {len(changed)} changed, {len(missing)} missing, {len(added)} new")
    for label, names in (("changed", changed), ("missing", missing), ("new", added)):
        for name in names:
            print(f"  {label}: {name}")
    return 0 if not (changed or missing) else 1


if __name__ == "__main__":
    raise SystemExit(main())
