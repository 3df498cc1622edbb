"""The documentation: every generated block is what its command prints, whatever a user's own runs left in the
working directory; every config key is described; the README stays short and indexes docs/."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


def test_generated_docs_are_current_whatever_a_users_runs_left_behind(tmp_path: Path) -> None:
    """Every generated block is what its command prints for the committed files. The Quickstart runs the
    demo, then the tests, in one clone, so this is checked in a copy of the project holding a demo run's
    outputs (and a runtime cap in the environment): they must not make a block stale."""
    render_docs = _render_docs()
    copy = tmp_path / "project"
    for name in render_docs.repository_files(ROOT):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    # The planted files and the variable change what the estimate prints when it runs in the working
    # directory; without that the test would prove nothing.
    estimate = [sys.executable, "-m", "character_em.report.estimate", "--configfile", "config.yaml", "--anchors-only"]
    env = render_docs.clean_environment(copy)
    before = subprocess.run(estimate, cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    planted = plant_demo_run(copy)
    env["CHARACTER_EM_MAX_RUNTIME"] = "60"
    after = subprocess.run(estimate, cwd=copy, env=env, capture_output=True, text=True, check=True).stdout
    assert after != before, "the planted run no longer changes the estimate: the test is void"

    result = subprocess.run(
        [sys.executable, "scripts/render_docs.py", "--check"], cwd=copy, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(path.exists() for path in planted)


def test_every_config_key_has_a_description() -> None:
    render_docs = _render_docs()
    keys = render_docs.schema_properties(render_docs.load_schema())
    assert len(keys) > 150
    assert [key for key, node in keys if not str(node.get("description") or "").strip()] == []


def test_the_config_reference_lists_every_key_with_its_default() -> None:
    reference = (ROOT / "docs" / "config.md").read_text()
    assert "| `judge.min_kappa` | number or null | `0.6` |" in reference
    assert "| `select.models` | list of string or null | `null` |" in reference
    assert "| `models.<model>.path` | string | required |" in reference
    assert "| `train.lora_r` | integer | `32` | LoRA rank. |" in reference


def test_the_readme_is_short_and_indexes_every_page_of_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)", readme))
    assert {path.name for path in (ROOT / "docs").glob("*.md")} <= linked
    assert "[your cluster in six steps](docs/cluster.md#your-cluster-in-six-steps)" in readme
    # The Quickstart's test command is the one CI runs.
    assert 'pip install -e ".[test,cluster,lmeval]" && python -m pytest' in readme
    assert "\npython -m pytest\n" in (ROOT / ".ci" / "run").read_text()


def test_the_cluster_page_opens_with_its_checklist() -> None:
    page = (ROOT / "docs" / "cluster.md").read_text()
    first = page.split("\n## ", 2)[1]
    assert first.startswith("Your cluster in six steps")
    steps = re.findall(r"^\d\. \*\*(.+?)\*\*", first, re.M)
    assert steps == [
        "Environments.",
        "Models.",
        "Partition and account.",
        "GPU type and memory per rule.",
        "Time limits.",
        "Which judge runs where.",
    ]
    assert first.count("Check") >= len(steps)


def test_no_file_names_the_retired_hub_command() -> None:
    retired = "huggingface" + "-cli"
    found = subprocess.run(
        ["git", "grep", "-I", "-l", "--untracked", retired], cwd=ROOT, capture_output=True, text=True
    )
    # git grep exits 1 when nothing matches (0: found, 128: an error, which must not pass).
    assert found.returncode == 1 and not found.stdout, found.stdout


def test_the_licence_is_the_one_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert (
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    )
