"""Hugging Face models at the revisions the jobs ask for: which ones a config names, access to them,
the disk they need, and their download into the cache the jobs read (``snakemake prefetch_models``).

A job loads a hub model with ``from_pretrained(repo_id, revision=...)``: the trained models
(``models.*.revision``), the judge, the second judge, the data filter's judge and the data writer at
their pinned ``revision`` (``main`` where none is pinned). With ``HF_HUB_OFFLINE=1`` that call finds
the files only when the cache holds that very revision: a snapshot of ``main`` does not serve a job
pinned to an older commit, and a snapshot of a pinned commit does not serve a job asking for ``main``
(there is no ``refs/main``). So the download asks for exactly the revision each job asks for.

Order, before a byte is downloaded: refuse offline mode, check every model's access (token and gated
licence) and list its files at the revision, then compare the bytes still missing from the cache with
the free space of the cache's filesystem. Only the files a job loads are fetched: config, tokenizer and
``.safetensors`` weights at the repository's top level (not ``original/`` checkpoints, ``.bin``/``.pth``
copies or ``consolidated`` duplicates).

The token comes from ``HF_TOKEN`` (else the login ``hf auth login`` saved); it is never printed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "HubAccessError",
    "HubDiskError",
    "ModelPlan",
    "cache_dir",
    "check_disk",
    "describe_access_error",
    "hub_models",
    "job_files",
    "plan_model",
    "prefetch",
]

log = logging.getLogger(__name__)

# Files from_pretrained reads besides the weights: the model's and the generation config, the shard
# index, and the tokenizer in each of its formats (fast, sentencepiece, BPE vocabulary and merges).
SIDE_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
WEIGHTS_SUFFIX = ".safetensors"
# Config sections whose back-end loads a model by id on the lab's own GPUs (an `openai` judge is served
# elsewhere; a `rubric` judge or `offline` writer loads none).
MODEL_SECTIONS = ("judge", "judge.agreement_with", "data.filter.judge", "data.generator")
LOCAL_BACKENDS = ("hf", "vllm")
TOKEN_PAGE = "https://huggingface.co/settings/tokens"


class HubAccessError(RuntimeError):
    """A model cannot be downloaded as configured (access, licence, revision, network)."""


class HubDiskError(RuntimeError):
    """The missing files do not fit the free space of the cache's filesystem."""


def _section(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def hub_models(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every hub model the jobs of a validated config load: ``{"repo_id", "revision", "keys"}``, one
    entry per (repo, revision), ``keys`` naming the config keys that ask for it. ``revision`` None
    means ``main`` (what a job without a pinned revision loads). Local folders, and models this
    workflow builds (``build:``), are not hub models."""
    from character_em import config as cfg

    built = {spec["path"] for spec in config["models"].values() if spec.get("build")}
    named: list[tuple[str, str, str | None]] = [
        (f"models.{name}", spec["path"], spec.get("revision")) for name, spec in config["models"].items()
    ]
    for key in MODEL_SECTIONS:
        section = _section(config, key)
        if key == "data.filter.judge" and not _section(config, "data.filter.enabled"):
            continue
        if isinstance(section, Mapping) and section.get("backend") in LOCAL_BACKENDS and section.get("model"):
            named.append((key, str(section["model"]), section.get("revision")))
    models: dict[tuple[str, str | None], dict[str, Any]] = {}
    for key, repo_id, revision in named:
        if repo_id in built or Path(repo_id).exists() or not cfg.is_hub_id(repo_id):
            continue
        entry = models.setdefault((repo_id, revision), {"repo_id": repo_id, "revision": revision, "keys": []})
        entry["keys"].append(key)
    return list(models.values())


def job_files(siblings: Iterable[Any]) -> list[tuple[str, int]]:
    """(file name, bytes) of the files a job loads, from a ``model_info(files_metadata=True)``
    listing: top-level config and tokenizer files and ``.safetensors`` weights. A ``consolidated``
    single-file copy is left out when sharded weights exist (Mistral's repositories carry both)."""
    top = [(s.rfilename, int(s.size or 0)) for s in siblings if "/" not in s.rfilename]
    weights = [(name, size) for name, size in top if name.endswith(WEIGHTS_SUFFIX)]
    if any(not name.startswith("consolidated") for name, _ in weights):
        weights = [(name, size) for name, size in weights if not name.startswith("consolidated")]
    return sorted([(name, size) for name, size in top if name in SIDE_FILES] + weights)


@dataclass
class ModelPlan:
    """One model's download: the revision asked for, the commit it names, and its files."""

    repo_id: str
    revision: str | None
    keys: list[str]
    commit: str
    files: list[tuple[str, int]]
    missing: list[tuple[str, int]] = field(default_factory=list)

    @property
    def requested(self) -> str:
        return self.revision or "main"

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    @property
    def missing_bytes(self) -> int:
        return sum(size for _, size in self.missing)


def cache_dir() -> Path:
    """The hub cache the jobs read: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _cached(repo_id: str, filename: str, revision: str, cache: Path | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache, revision=revision)
    return isinstance(found, str) and Path(found).is_file()


def plan_model(model: Mapping[str, Any], info: Any, *, cache: Path | None = None) -> ModelPlan:
    """A model's plan from its ``model_info(repo_id, revision=..., files_metadata=True)`` answer: the
    files a job loads, and those the cache does not hold at that revision yet."""
    files = job_files(info.siblings or [])
    if not any(name.endswith(WEIGHTS_SUFFIX) for name, _ in files):
        raise HubAccessError(
            f"{', '.join(model['keys'])}: {model['repo_id']} has no .safetensors weights at the top of revision "
            f"{model.get('revision') or 'main'}; the jobs load safetensors only. Name a revision (or a converted "
            "copy of the model) that has them."
        )
    # The commit the revision names now: a branch (main) may have moved past what the cache holds.
    commit = str(info.sha or model.get("revision") or "main")
    return ModelPlan(
        repo_id=model["repo_id"],
        revision=model.get("revision"),
        keys=list(model["keys"]),
        commit=commit,
        files=files,
        missing=[(name, size) for name, size in files if not _cached(model["repo_id"], name, commit, cache)],
    )


def _token_state() -> str:
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN is set, so its account lacks access"
    if get_token():
        return "HF_TOKEN is not set; the token saved by `hf auth login` was used, so its account lacks access"
    return (
        f"no token is set: create a read token at {TOKEN_PAGE} and `export HF_TOKEN=...` in the shell that runs "
        "snakemake (or run `hf auth login`)"
    )


def describe_access_error(model: Mapping[str, Any], err: BaseException) -> str:
    """What a lab must do about an access error, naming the config keys; never the token."""
    from huggingface_hub import errors

    repo_id, revision = model["repo_id"], model.get("revision")
    keys = ", ".join(model["keys"])
    page = f"https://huggingface.co/{repo_id}"
    if isinstance(err, errors.GatedRepoError):
        return (
            f"{keys}: {repo_id} is gated. Accept its licence at {page} (logged in to the account whose token "
            f"the jobs use), wait for the grant, then run this again. {_token_state()}."
        )
    if isinstance(err, errors.RepositoryNotFoundError):
        return (
            f"{keys}: {repo_id} was not found on the hub, or it is private to an account this token cannot "
            f"read. Check the id at {page}; {_token_state()}."
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return (
            f"{keys}: revision {revision} is not a commit, branch or tag of {repo_id}. Pin a commit sha from "
            f"{page}/commits/main."
        )
    if isinstance(err, errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            return f"{keys}: the hub refused the token (401 Unauthorized) for {repo_id}: {_token_state()}."
        return f"{keys}: the hub answered {status} for {repo_id}; try again later."
    return (
        f"{keys}: cannot reach the hub for {repo_id} ({type(err).__name__}). prefetch_models needs the network: "
        "run it on a login node that has it."
    )


def _free_bytes(path: Path) -> tuple[Path, int]:
    """Free bytes of the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_disk(plans: Sequence[ModelPlan], cache: Path, free: int | None = None) -> str:
    """A line saying what the download needs against the cache filesystem's free space; raises
    HubDiskError when it does not fit. ``free``: the free bytes (default: measured)."""
    where, measured = _free_bytes(cache)
    free = measured if free is None else free
    needed = sum(plan.missing_bytes for plan in plans)
    total = sum(plan.total_bytes for plan in plans)
    line = (
        f"{len(plans)} model(s), {_gb(total)} in all; {_gb(total - needed)} already in {cache}; to download: "
        f"{_gb(needed)}; free on the filesystem of {where}: {_gb(free)}"
    )
    if needed > free:
        raise HubDiskError(
            f"not enough disk for the models: {line}. Free {_gb(needed - free)} or more, or point HF_HOME (or "
            "HF_HUB_CACHE) at a larger filesystem that the compute nodes also see, and run this again."
        )
    return line


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true")


def _plan_all(models: Sequence[Mapping[str, Any]], cache: Path) -> list[ModelPlan]:
    """Access check and file listing of every model, all errors at once."""
    from huggingface_hub import auth_check, model_info

    plans, problems = [], []
    for model in models:
        try:
            auth_check(model["repo_id"])
            info = model_info(model["repo_id"], revision=model.get("revision"), files_metadata=True)
        except (ImportError, NameError, AttributeError, TypeError):
            raise  # a programming error, not an answer of the hub
        except Exception as err:  # the hub's errors, and the network's (types of the HTTP library in use)
            problems.append(describe_access_error(model, err))
            continue
        try:
            plans.append(plan_model(model, info, cache=cache))
        except HubAccessError as err:
            problems.append(str(err))
    if problems:
        raise HubAccessError("cannot download the configured models:\n  - " + "\n  - ".join(problems))
    return plans


def prefetch(models: Sequence[Mapping[str, Any]], *, free: int | None = None) -> list[dict[str, Any]]:
    """Download every model of ``hub_models(config)`` at the revision its jobs ask for into the cache the
    jobs read, after checking access and disk. Returns one record per model (what it fetched)."""
    if _offline():
        raise HubAccessError(
            "HF_HUB_OFFLINE is set: prefetch_models downloads. Unset it for this command (the jobs may keep it, "
            "and then read only what this put in the cache)."
        )
    if not models:
        log.info("the config names no hub model (local folders and built models only): nothing to download")
        return []
    cache = cache_dir()
    try:
        plans = _plan_all(models, cache)
    except HubAccessError as err:
        log.error("%s", err)
        raise
    for plan in plans:
        log.info(
            "%s at %s (commit %s; %s): %d files, %s, %s missing",
            plan.repo_id,
            plan.requested,
            plan.commit,
            ", ".join(plan.keys),
            len(plan.files),
            _gb(plan.total_bytes),
            _gb(plan.missing_bytes),
        )
    try:
        log.info("disk: %s", check_disk(plans, cache, free))
    except HubDiskError as err:
        log.error("%s", err)
        raise
    from huggingface_hub import snapshot_download

    records = []
    for plan in plans:
        folder = snapshot_download(
            plan.repo_id, revision=plan.requested, allow_patterns=[name for name, _ in plan.files]
        )
        absent = [name for name, _ in plan.files if not _cached(plan.repo_id, name, plan.requested, None)]
        if absent:
            raise HubAccessError(
                f"{plan.repo_id} at {plan.requested}: {absent} are not in the cache after the download ({folder})"
            )
        log.info("%s at %s: in %s", plan.repo_id, plan.requested, folder)
        records.append(
            {
                "repo_id": plan.repo_id,
                "revision": plan.requested,
                "commit": plan.commit,
                "keys": plan.keys,
                "files": len(plan.files),
                "bytes": plan.total_bytes,
                "snapshot": folder,
            }
        )
    return records
