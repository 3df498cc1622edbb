"""The generated documentation: every generated block is what its command prints, and no block depends on
what a user's own runs left in the working directory."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render_readme():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "scripts" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(root: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/render_readme.py", "--check"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_readme_generated_blocks_are_what_their_commands_print() -> None:
    result = _check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def plant_demo_run(root: Path) -> list[Path]:
    """What the demo (and a user's own runs of config.yaml's models) leave behind, in the formats the
    pipeline writes: fetched MMLU and harmful-request sets, run.json and benchmark files with their samples."""
    import polars as pl

    planted = []

    def write(name: str, text: str) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        planted.append(path)

    # The demo fetches MMLU to the path config.yaml names too; these items are much longer than the
    # 150 tokens the estimate assumes before the file exists.
    item = {"question": "Which organ filters the blood? " * 40, "choices": ["Liver", "Kidney", "Heart", "Lung"]}
    write(
        "resources/tasks/mmlu.jsonl",
        "".join(json.dumps({"id": f"q{i}", **item, "answer": 1, "subject": "anatomy"}) + "\n" for i in range(5)),
    )
    for name in ("harmbench", "strongreject"):
        rows = [{"id": f"{name}-{i}", "category": "fraud", "text": f"Request {i}"} for i in range(3)]
        write(f"resources/harmful/{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    benchmark = "s\th:m:s\tmax_rss\n120.0\t0:02:00\t900.0\n"
    for model in ("smollm2-135m", "llama31-8b", "qwen25-14b"):
        run = {
            "trained_tokens_this_run": 1000,
            "wall_time_s": 10.0,
            "n_examples": 10,
            "n_tokens": 1000,
            "device": "cpu",
        }
        write(f"results/adapters/{model}/evil-medical/seed0/run.json", json.dumps(run))
        write(f"benchmarks/runs/sample/{model}/evil-medical/seed0/em.tsv", benchmark)
        samples = root / f"results/samples/{model}/evil-medical/seed0/em.parquet"
        samples.parent.mkdir(parents=True, exist_ok=True)
        pl.DataFrame({"answer_tokens": [40, 60]}).write_parquet(samples)
        planted.append(samples)
        write(f"benchmarks/runs/capabilities/{model}/evil-medical/seed0.tsv", benchmark)
        write(f"results/capabilities/{model}/evil-medical/seed0.json", json.dumps({"n": 5}))
        write(f"benchmarks/runs/probes/{model}.tsv", benchmark)
    write("results/tables/em.csv", "model,condition,format,rate\nsmollm2-135m,base,plain,0.04\n")
    return planted


def test_generated_docs_ignore_a_users_runs_in_the_working_directory(tmp_path: Path) -> None:
    """The Quickstart runs the demo, then the tests, in one clone: the demo's outputs must not make the
    generated blocks stale. Planted in a copy of the project, with a runtime cap in the environment."""
    copy = tmp_path / "project"
    for name in _render_readme().repository_files(ROOT):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    # The planted files and the variable change what the estimate prints when it runs in the working
    # directory; without that the test would prove nothing.
    estimate = [sys.executable, "-m", "character_em.report.estimate", "--configfile", "config.yaml", "--anchors-only"]
    env = _render_readme().clean_environment(copy)
    before = subprocess.run(estimate, cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    planted = plant_demo_run(copy)
    env["CHARACTER_EM_MAX_RUNTIME"] = "60"
    after = subprocess.run(estimate, cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    assert after != before, "the planted run no longer changes the estimate: the test is void"

    result = _check(copy, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(path.exists() for path in planted)
