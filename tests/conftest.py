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
