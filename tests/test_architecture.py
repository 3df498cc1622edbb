"""The architecture, checked: import contracts, lint and format, public names only, no dangling citations."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_DIRS = ("src", "tests", "workflow_scripts", "benchmarks", "scripts")


def _python_files() -> list[Path]:
    return sorted(p for d in PY_DIRS for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed in this environment; pip install -e '.[test]'")
    return found


def test_import_contracts_hold() -> None:
    result = subprocess.run([_tool("lint-imports")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


def test_ruff_lint_and_format_are_clean() -> None:
    files = [str(p) for p in _python_files()]
    lint = subprocess.run([_tool("ruff"), "check", *files], cwd=ROOT, capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = subprocess.run(
        [_tool("ruff"), "format", "--check", *files], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert fmt.returncode == 0, fmt.stdout[-4000:]


def private_uses(source: str) -> list[str]:
    """``from character_em... import _name`` and ``module._name`` where ``module`` came from character_em."""
    tree = ast.parse(source)
    problems: list[str] = []
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("character_em"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    problems.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("character_em") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            problems.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return problems


def test_the_private_name_check_catches_both_forms() -> None:
    bad = "from character_em.judge.core import _summary\nfrom character_em import files as F\nF._replacing\n"
    assert len(private_uses(bad)) == 2
    assert private_uses("from character_em.files import write_text_atomic\n") == []


def test_no_module_uses_another_modules_private_names() -> None:
    found = {str(p.relative_to(ROOT)): private_uses(p.read_text()) for p in _python_files() if "tests" not in p.parts}
    found |= {str(p.relative_to(ROOT)): private_uses(p.read_text()) for p in (ROOT / "rules").glob("*.smk") if False}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_file_cites_a_document_outside_the_repository() -> None:
    cited = re.compile(r"DESIGN\.md|DESIGN [0-9]|contracts\.md|\.\./shared|shared/(?:reference|bench)")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".smk", ".yaml", ".toml", ".sh", ".rst", ""} or not path.is_file():
            continue
        if name == "tests/test_architecture.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if cited.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:100]}")
    assert hits == []


def test_every_markdown_link_to_a_repository_file_resolves() -> None:
    link = re.compile(r"\]\((?!https?://|#|mailto:)([^)#\s]+)")
    broken = []
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")]:
        for target in link.findall(doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


# Schema keys that reach no job's params on purpose, and why. Any other schema key of these sections
# must be in its stage's key list, so a key added to the schema but never passed to its job fails here.
NOT_JOB_SETTINGS = {
    "judge": {
        "agreement_with": "names the second judge of the calibration job (job_settings.calibration_judges)",
        "calibration_file": "an input file of the calibration job, tracked as a file",
        "cache_dir": "where finished verdicts are kept; moving it changes no verdict",
        "min_kappa": "a floor of the judge gate (rule judge_gate, judge.calibration.judge_gate), not a verdict setting",
        "min_subset_accuracy": "the judge gate's other floor; changes no verdict",
        "allow_uncalibrated": "overrides the judge gate; changes no verdict",
        "labels": "draws the sheet of answers for human labels (rule label_sheet); changes no verdict",
        "agreement_answers_per_cell": "how many answers of each cell the judge_second jobs draw; changes no verdict",
        "audit_fraction": "the grid judge job's exact audit (rules/judge.smk passes it apart); changes no verdict",
    },
}


def _schema() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())["properties"]


def test_every_judge_and_generator_key_of_the_schema_reaches_its_jobs() -> None:
    from character_em import job_settings

    schema = _schema()
    judge_keys = set(schema["judge"]["properties"])
    reached = set().union(*job_settings.JOB_PARAM_KEYS.values()) | set(NOT_JOB_SETTINGS["judge"])
    assert judge_keys - reached == set(), "judge keys in the schema that no judge job receives"
    assert reached - judge_keys == set(), "judge job keys that the schema does not define"
    generator_keys = set(schema["data"]["properties"]["generator"]["properties"])
    sent = set().union(*job_settings.GENERATOR_PARAM_KEYS.values())
    assert generator_keys == sent, f"schema only: {generator_keys - sent}; code only: {sent - generator_keys}"


def test_every_train_key_of_the_schema_reaches_the_trainer() -> None:
    from character_em.train import trainer

    train_keys = set(_schema()["train"]["properties"])
    known = set(trainer.HPARAM_KEYS) | set(trainer.OPTIONAL_HPARAMS)
    assert train_keys == known, f"schema only: {train_keys - known}; trainer only: {known - train_keys}"


@pytest.mark.parametrize("package", ["llm", "data", "train", "sampling", "judge", "evals", "directions", "report"])
def test_every_public_name_of_a_subpackage_resolves(package: str) -> None:
    import importlib

    module = importlib.import_module(f"character_em.{package}")
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_no_import_cycles_between_modules() -> None:
    import grimp

    graph = grimp.build_graph("character_em")
    cycles = sorted(
        f"{importer} <-> {imported}"
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if importer < imported and graph.chain_exists(importer=imported, imported=importer)
    )
    assert cycles == []
