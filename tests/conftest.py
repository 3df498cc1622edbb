"""Shared pytest fixtures: tiny locally built chat models (no downloads, ever)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Set before any test imports transformers/tokenizers: tests must never touch a hub, and tokenizer
# thread pools forked into subprocesses print warnings and can deadlock.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama model with a Llama-3-style chat template (eos = <|eot_id|>)."""
    from character_em.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), style="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama model with a ChatML (Qwen2-style) template (eos = <|im_end|>)."""
    from character_em.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen"), style="qwen2", seed=0)


# --------------------------------------------------------------------------- parallel runs (pytest-xdist)
# `python -m pytest` runs on two workers (pyproject's addopts: `-n auto`). Most of the suite's wall time is
# Snakemake driving small jobs and SLURM scheduling them, often one at a time, which leaves a core idle;
# a second worker fills it. A test module is the unit handed to a worker, so a module's expensive fixture
# (a smoke run, a SLURM drill) is built once; the SLURM modules form one unit, because each brings the
# same single-node test cluster up and down.
SLURM_MODULES = ("test_slurm", "test_slurm_faults", "test_slurm_kills", "test_slurm_site")
# Handed out first, so that the longest units never run alone at the end.
LONGEST_FIRST = ("test_workflow", "slurm", "test_planted_effect", "test_demo", "test_directions", "test_trajectory")


def _unit(module_path: str) -> str:
    stem = Path(module_path).stem
    return "slurm" if stem in SLURM_MODULES else stem


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for ``-n auto``: two (the suite is sized for a 2-core machine; each smoke run uses two
    cores itself), or CHARACTER_EM_TEST_WORKERS."""
    return int(os.environ.get("CHARACTER_EM_TEST_WORKERS", "2"))


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler with our units as scopes, handed out in collection order. (Its own
    ``--dist loadgroup`` marks do not group with pytest 9.2, which ignores the node-id suffix they rely
    on, and ``--dist loadfile`` cannot keep the SLURM modules together.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    config.option.loadscopereorder = False  # keep LONGEST_FIRST, not the largest test count first
    return ModuleUnits(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    # A stable sort keeps each module's own order (its fixtures and tests rely on it).
    items.sort(key=lambda item: rank.get(_unit(str(item.path)), len(rank)))
