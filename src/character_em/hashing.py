"""Canonical JSON and sha256: the one way this project turns values and files into stable identities.

Every hash that names something (a judge, a cache entry, a sampling seed, a data file, a model folder)
is computed here, so that two stages never disagree about how a value is serialized.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["canonical_json", "sha256_text", "sha256_json", "sha256_bytes", "sha256_file", "stable_int"]

_BLOCK = 1 << 20


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys and unescaped Unicode: equal values give equal text."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(value: Any) -> str:
    return sha256_text(canonical_json(value))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Streamed, so a multi-GB weight shard never has to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_int(*parts: object) -> int:
    """A process-independent 64-bit integer from ``parts`` (sha256), for seeding."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")
