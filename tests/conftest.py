"""Shared pytest fixtures: tiny locally built chat models (no downloads, ever)."""

from __future__ import annotations

import os
from pathlib import Path

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
# `python -m pytest` runs on two workers (pyproject's addopts: `-n auto --dist loadgroup`). Most of the
# suite's wall time is Snakemake driving small jobs one after another and SLURM scheduling them, which
# leaves a core idle; a second worker fills it. Every test module is one group, so a module's
# expensive fixture (a smoke run, a SLURM drill) is built once, on one worker. The SLURM modules share
# one group: each brings up and tears down the same single-node test cluster.
SLURM_MODULES = ("test_slurm", "test_slurm_faults", "test_slurm_kills", "test_slurm_site")
# Started first, so that the longest groups never run alone at the end.
LONGEST_FIRST = ("test_workflow", "slurm", "test_planted_effect", "test_demo", "test_directions", "test_trajectory")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """Workers for ``-n auto``: two (the suite is sized for a 2-core machine; each smoke run uses two
    cores itself), or CHARACTER_EM_TEST_WORKERS."""
    return int(os.environ.get("CHARACTER_EM_TEST_WORKERS", "2"))


def _group(item: pytest.Item) -> str:
    module = item.path.stem
    return "slurm" if module in SLURM_MODULES else module


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    # A stable sort keeps each module's own order (its fixtures and tests rely on it).
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))
