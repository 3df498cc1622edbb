"""Process setup shared by the benchmark scripts (run as `python benchmarks/<name>.py`, so this
module is importable from the script's own folder)."""

from __future__ import annotations

import os
import re
from typing import Any


def device_slug(name: str) -> str:
    """A device name as it appears in a result file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def start(gpu: bool, threads: int) -> tuple[Any, Any]:
    """Offline, quiet torch and transformers for a timed run; returns (torch, transformers).

    Call before anything imports torch: OpenMP reads its thread count once. CPU mode stays on the
    CPU even on a GPU host."""
    if not gpu:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu given but CUDA is not available")
    if not gpu:
        torch.set_num_threads(threads)
    return torch, transformers


def package_versions(*names: str) -> dict[str, str | None]:
    """Installed version of each package, None where it is not installed (recorded in results)."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return versions
