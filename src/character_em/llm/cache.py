"""A content-addressed store of finished model calls: one JSON file per key, written with an atomic
rename. Safe with several processes and on network file systems (where sqlite's WAL locking is not),
and a killed job leaves no partial entry. Judging and data generation both keep their calls here, so a
rerun or a killed job never pays twice for one request."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from character_em.files import write_text_atomic
from character_em.hashing import canonical_json, sha256_json

__all__ = ["ContentCache", "content_key"]


def content_key(*parts: Any) -> str:
    """The key of one call: sha256 over the canonical JSON of everything that decides its result."""
    return sha256_json(list(parts))


class ContentCache:
    """``get``/``put`` of JSON records by key, counting hits, misses and writes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self.writes = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The record, or None when it is missing or unreadable (then it is simply asked for again)."""
        try:
            record = json.loads(self.path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            record = None
        if not isinstance(record, dict):
            self.misses += 1
            return None
        self.hits += 1
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        # Last writer wins; every writer writes the same record for the same key.
        write_text_atomic(self.path(key), canonical_json(record))
        self.writes += 1
