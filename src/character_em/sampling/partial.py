"""Finished sampling batches kept outside the declared outputs, so a killed job resumes.

Snakemake deletes a job's outputs before it runs it again, and SLURM kills a job at its time limit,
on ``scancel`` or on preemption (``scontrol requeue``). The sampling loop therefore appends every
finished batch to a JSONL file under ``results/.partial/`` (one line per answer, flushed and synced
per batch), and the rerun answers only the rows that file does not hold. Every row has its own
random stream (``sampling.hf``), so an answer restored from the file is the answer the rerun would
have drawn: the result does not depend on where the job was killed.

The first line is a fingerprint of everything the answers depend on (settings, prompts, identity,
base model, adapter bytes). A file whose fingerprint differs is stale and is started afresh; a last
line cut off by a kill mid-write is dropped. The file is kept after the job finishes: it is the
sampling wave's cache (``sampling.wave``). Snakemake reruns a wave, and deletes all of its outputs,
when any one of its files must change (an adapter retrained, a suite edited); every other file is then
rewritten from its partial file without generating anything, and no engine starts if nothing is left.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULT_KEYS = ("answer", "prompt_tokens", "answer_tokens", "finish_reason")


def answers_fingerprint(
    settings: Mapping[str, Any],
    prompts: Any,
    identity: Mapping[str, Any],
    base_model: str,
    adapter_sha256: str | None,
    **extra: Any,
) -> str:
    """The fingerprint of a job's answers: everything they depend on (``extra``: what else the job's
    answers depend on, such as a steering arm and its directions file)."""
    from character_em.hashing import sha256_json

    return sha256_json(
        {
            "settings": settings,
            "prompts": prompts,
            "identity": identity,
            "base_model": base_model,
            "adapter": adapter_sha256,
            **extra,
        }
    )


def partial_path(output: str | os.PathLike[str], results_dir: str = "results") -> Path:
    """``results/samples/m/c/seed0/em.parquet`` -> ``results/.partial/samples/m/c/seed0/em.jsonl``."""
    out = Path(output)
    try:
        relative = out.relative_to(results_dir)
    except ValueError:
        relative = out
    return Path(results_dir) / ".partial" / relative.with_suffix(".jsonl")


class PartialAnswers:
    """Answers of finished batches for one sampling job, keyed by row index."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: str) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.done: dict[int, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            self._start()
            return
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            log.info("%s: settings, prompts or adapter changed since it was written; starting afresh", self.path)
            self._start()
            return
        valid = 1
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.done[int(record["row"])] = {key: record[key] for key in RESULT_KEYS}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                # Only the last line can be cut off by a kill; anything after it is not trusted.
                log.warning("%s:%d: incomplete line dropped (the job was killed while writing it)", self.path, number)
                break
            valid = number
        if valid < len([line for line in lines if line.strip()]):
            self._rewrite()

    def _start(self) -> None:
        self.done = {}
        self._rewrite()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            for row, result in sorted(self.done.items()):
                handle.write(json.dumps({"row": row, **result}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def add(self, batch: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """Append one finished batch; it is on disk when this returns."""
        records = [(int(row), {key: result[key] for key in RESULT_KEYS}) for row, result in batch]
        with self.path.open("a", encoding="utf-8") as handle:
            for row, result in records:
                handle.write(json.dumps({"row": row, **result}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done.update(records)
