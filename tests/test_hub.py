"""Hub models at their pinned revisions (character_em.llm.hub, `snakemake prefetch_models`).

Tests never reach a hub. What runs here: which models a config names, the files a job loads, the disk
check and the access errors (from the hub's own response objects and error types, with the network
calls replaced), and the cache lookup on a cache laid out as huggingface_hub lays it out (checked with
the library's own scan_cache_dir and try_to_load_from_cache). What only a networked run shows: that
auth_check and model_info answer as their documentation says for a real gated repository, and that
snapshot_download writes the revision the jobs then load offline.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import yaml
from huggingface_hub import errors
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import ModelInfo
from workflow_helpers import ROOT

from character_em import config as cfg
from character_em import preflight
from character_em.llm import hub, tiny

JUDGE = "meta-llama/Llama-3.3-70B-Instruct"
JUDGE_SHA = "6f6073b423013f6a7d4d9f39144961bfbfbc386b"
GB = 10**9


def paper_config() -> dict[str, Any]:
    return cfg.validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))


def test_the_paper_grid_names_each_hub_model_once_at_the_revision_its_jobs_ask_for() -> None:
    models = {(m["repo_id"], m["revision"]): m["keys"] for m in hub.hub_models(paper_config())}
    assert models == {
        # Every model pinned, the trained ones too: their jobs load exactly that commit, so it is what is fetched.
        ("meta-llama/Llama-3.1-8B-Instruct", "0e9e39f249a16976918f6564b8830bc894c89659"): ["models.llama31-8b"],
        ("Qwen/Qwen2.5-14B-Instruct", "cf98f3b3bbb457ad9e2bb7baf9a0125b6b88caa8"): ["models.qwen25-14b"],
        (JUDGE, JUDGE_SHA): ["judge"],
        ("google/gemma-2-27b-it", "aaf20e6b9f4c0fcf043f6fb2a2068419086d77b0"): [
            "judge.agreement_with",
            "data.filter.judge",
        ],
        ("Qwen/Qwen2.5-72B-Instruct", "495f39366efef23836d0cfae4fbe635880d2be31"): ["data.generator"],
    }


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_presets_name_no_hub_model(preset: str) -> None:
    """The presets build or fetch their models from PyPI, and their judges are test instruments or
    those built models: nothing to download from a hub."""
    raw = yaml.safe_load((ROOT / "presets" / f"{preset}.yaml").read_text())
    assert hub.hub_models(cfg.validate_config(raw)) == []


def test_an_openai_judge_is_served_elsewhere_and_not_fetched() -> None:
    config = paper_config()
    config["judge"] = {**config["judge"], "backend": "openai"}
    assert JUDGE not in {m["repo_id"] for m in hub.hub_models(config)}


def model_info(repo_id: str, sha: str, files: dict[str, int], gated: Any = False) -> ModelInfo:
    """model_info(files_metadata=True)'s answer, built from the API's JSON as the library builds it."""
    siblings = [{"rfilename": name, "size": size} for name, size in files.items()]
    return ModelInfo(id=repo_id, sha=sha, siblings=siblings, gated=gated, private=False)


# A Llama 3 repository as the hub lists it: the original Meta checkpoint beside the transformers one.
LLAMA_FILES = {
    ".gitattributes": 1_519,
    "LICENSE": 7_627,
    "README.md": 40_000,
    "USE_POLICY.md": 4_691,
    "config.json": 855,
    "generation_config.json": 184,
    "model-00001-of-00002.safetensors": 4_976_698_672,
    "model-00002-of-00002.safetensors": 2_669_692_552,
    "model.safetensors.index.json": 23_950,
    "original/consolidated.00.pth": 16_060_617_592,
    "original/params.json": 199,
    "original/tokenizer.model": 2_183_982,
    "special_tokens_map.json": 296,
    "tokenizer.json": 9_085_657,
    "tokenizer_config.json": 55_351,
}


def test_only_the_files_a_job_loads_are_planned() -> None:
    info = model_info(JUDGE, JUDGE_SHA, LLAMA_FILES)
    names = [name for name, _ in hub.job_files(info.siblings)]
    assert names == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    # Mistral's repositories carry a consolidated single-file copy beside the shards: not both.
    mistral = model_info(
        "m/x", "a" * 40, {"config.json": 1, "consolidated.safetensors": 9, "model-00001-of-00001.safetensors": 9}
    )
    assert [name for name, _ in hub.job_files(mistral.siblings)] == ["config.json", "model-00001-of-00001.safetensors"]


def test_a_revision_without_safetensors_is_refused_naming_the_key() -> None:
    info = model_info(JUDGE, JUDGE_SHA, {"config.json": 1, "pytorch_model.bin": 10})
    model = {"repo_id": JUDGE, "revision": JUDGE_SHA, "keys": ["judge"]}
    with pytest.raises(hub.HubAccessError, match=r"judge: .* has no .safetensors weights"):
        hub.plan_model(model, info)


def put_in_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = None) -> None:
    """Files of one revision, laid out as huggingface_hub's downloads lay them out: the content in
    blobs/ under its hash, a relative symlink to it in snapshots/{commit}/, and refs/{branch} holding
    the commit a branch resolved to (written only when a branch, not a commit, was asked for)."""
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    for name, content in files.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "hf" / "hub"
    folder.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder


def test_the_cache_lookup_finds_config_json_at_the_pinned_revision_only(cache: Path) -> None:
    """A snapshot of a pinned commit serves a job that asks for that commit, and not one that asks for
    main: downloading one and running the other offline is the trap prefetch_models avoids."""
    shape = tiny.planned_config(num_layers=2)
    put_in_cache(cache, JUDGE, JUDGE_SHA, {"config.json": json.dumps(shape).encode()})
    [repo] = huggingface_hub.scan_cache_dir(cache).repos  # the library reads the layout as its own
    assert repo.repo_id == JUDGE and {r.commit_hash for r in repo.revisions} == {JUDGE_SHA}
    assert preflight.read_model_config(JUDGE, revision=JUDGE_SHA) == shape
    assert preflight.read_model_config(JUDGE) is None  # main: no refs/main, as after a pinned download
    put_in_cache(cache, JUDGE, "b" * 40, {"config.json": b"{}"}, ref="main")
    assert preflight.read_model_config(JUDGE) == {}
    assert preflight.read_model_config(JUDGE, revision=JUDGE_SHA) == shape


def test_a_hub_model_in_the_cache_is_checked_like_a_local_one(cache: Path) -> None:
    """After prefetch_models, the dry run's model checks read the cached config.json: a probe layer of
    99 on a 2-layer model is an error before any job."""
    put_in_cache(
        cache,
        "org/two-layers",
        "c" * 40,
        {"config.json": json.dumps(tiny.planned_config(num_layers=2)).encode()},
        ref="main",
    )
    raw = yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text())
    raw["models"] = {"two": {"path": "org/two-layers", "probe_layers": [1, 99]}}
    errors_, unchecked = preflight.check_all(cfg.validate_config(raw), {})
    assert unchecked == [] and len(errors_) == 1
    assert errors_[0].startswith("models.two.probe_layers: layer(s) [99] do not exist in org/two-layers")


def test_the_plan_counts_only_what_the_cache_lacks_at_that_revision(cache: Path) -> None:
    files = {"config.json": 855, "model-00001-of-00001.safetensors": 5 * GB, "tokenizer.json": 9_000_000}
    put_in_cache(cache, JUDGE, JUDGE_SHA, {"config.json": b"{}"})
    put_in_cache(cache, JUDGE, "d" * 40, {"tokenizer.json": b"{}"}, ref="main")  # another revision's file
    model = {"repo_id": JUDGE, "revision": JUDGE_SHA, "keys": ["judge"]}
    plan = hub.plan_model(model, model_info(JUDGE, JUDGE_SHA, files), cache=cache)
    assert plan.commit == JUDGE_SHA and plan.total_bytes == sum(files.values())
    assert [name for name, _ in plan.missing] == ["model-00001-of-00001.safetensors", "tokenizer.json"]
    line = hub.check_disk([plan], cache, free=6 * GB)
    assert "to download: 5.0 GB" in line and "free on the filesystem of" in line and "6.0 GB" in line
    # main has moved past the commit the cache holds for it: that snapshot does not count.
    unpinned = {"repo_id": JUDGE, "revision": None, "keys": ["models.judge-as-trained"]}
    plan = hub.plan_model(unpinned, model_info(JUDGE, "f" * 40, files), cache=cache)
    assert plan.commit == "f" * 40 and plan.requested == "main" and len(plan.missing) == 3


@pytest.mark.usefixtures("online")
def test_a_download_that_does_not_fit_is_refused_before_it_starts(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "config.json": 855,
        "model-00001-of-00002.safetensors": 70 * GB,
        "model-00002-of-00002.safetensors": 71 * GB,
    }
    calls = []
    monkeypatch.setattr(huggingface_hub, "auth_check", lambda repo_id, **kw: calls.append(("auth", repo_id)))
    monkeypatch.setattr(
        huggingface_hub,
        "model_info",
        lambda repo_id, **kw: calls.append(("info", kw)) or model_info(repo_id, JUDGE_SHA, files),
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("downloaded"))
    models = [{"repo_id": JUDGE, "revision": JUDGE_SHA, "keys": ["judge"]}]
    with pytest.raises(hub.HubDiskError) as refused:
        hub.prefetch(models, free=100 * GB)
    message = str(refused.value)
    assert "to download: 141.0 GB" in message and "free on the filesystem of" in message and "100.0 GB" in message
    assert "Free 41.0 GB or more" in message and "HF_HOME" in message
    assert calls == [("auth", JUDGE), ("info", {"revision": JUDGE_SHA, "files_metadata": True})]
    assert not any(cache.iterdir())


def hub_error(cls: type[errors.HfHubHTTPError], status: int, url: str) -> errors.HfHubHTTPError:
    """An error as huggingface_hub raises it, with a response of the HTTP library it is built on."""
    annotation = inspect.signature(cls.__init__).parameters["response"].annotation
    module = annotation if isinstance(annotation, str) else f"{annotation.__module__}.{annotation.__name__}"
    http = importlib.import_module(module.split(".")[0])
    return cls("refused", response=http.Response(status, request=http.Request("GET", url)))


SECRET = "hf_plantedSecretValue123"


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode off (conftest sets it for every test); every hub call the test reaches is replaced."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.mark.usefixtures("online")
@pytest.mark.parametrize("token", [SECRET, None])
def test_a_gated_model_says_where_to_accept_the_licence_and_never_shows_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))  # no saved login
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "empty-home" / "token"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)

    def auth_check(repo_id: str, **kwargs: Any) -> None:
        if repo_id == JUDGE:
            raise hub_error(errors.GatedRepoError, 403, f"https://huggingface.co/api/models/{repo_id}/auth-check")

    def info(repo_id: str, **kwargs: Any) -> ModelInfo:
        if kwargs.get("revision") == "0" * 40:
            raise hub_error(errors.RevisionNotFoundError, 404, f"https://huggingface.co/api/models/{repo_id}")
        return model_info(repo_id, "e" * 40, {"config.json": 1, "model.safetensors": 1})

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    monkeypatch.setattr(huggingface_hub, "model_info", info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: pytest.fail("downloaded"))
    models = [
        {"repo_id": JUDGE, "revision": JUDGE_SHA, "keys": ["judge"]},
        {"repo_id": "Qwen/Qwen2.5-72B-Instruct", "revision": "0" * 40, "keys": ["data.generator"]},
        {"repo_id": "Qwen/Qwen2.5-14B-Instruct", "revision": None, "keys": ["models.qwen25-14b"]},
    ]
    with pytest.raises(hub.HubAccessError) as refused:
        hub.prefetch(models)
    message = str(refused.value)
    lines = message.splitlines()
    assert len(lines) == 3, message  # every problem at once, the accessible model not among them
    assert lines[1].startswith(f"  - judge: {JUDGE} is gated. Accept its licence at https://huggingface.co/{JUDGE}")
    if token:
        assert "HF_TOKEN is set, so its account lacks access" in message
    else:
        assert "no token is set: create a read token at https://huggingface.co/settings/tokens" in message
        assert "export HF_TOKEN=" in message
    assert lines[2].startswith(f"  - data.generator: revision {'0' * 40} is not a commit")
    assert SECRET not in message


def test_offline_mode_is_refused_before_any_hub_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "auth_check", lambda *a, **kw: pytest.fail("called the hub"))
    with pytest.raises(hub.HubAccessError, match="HF_HUB_OFFLINE is set: prefetch_models downloads"):
        hub.prefetch([{"repo_id": JUDGE, "revision": JUDGE_SHA, "keys": ["judge"]}])


def test_a_pinned_trained_model_loads_the_weights_of_its_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """models.*.revision reaches from_pretrained: two commits of one hub id in an offline cache, two
    different sets of weights, and each revision loads its own (the real loading path, in a process of its
    own with HF_HUB_OFFLINE=1, as a job runs after prefetch_models)."""
    import subprocess
    import sys

    first = tiny.build_tiny_model(tmp_path / "first", style="llama", seed=0)
    second = tiny.build_tiny_model(tmp_path / "second", style="llama", seed=1)
    cache = tmp_path / "hf" / "hub"
    repo, commits = "org/tiny-pinned", {"a" * 40: first, "b" * 40: second}
    for commit, folder in commits.items():
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        put_in_cache(cache, repo, commit, files, ref="main" if commit == "b" * 40 else None)
    code = (
        "import sys, json\nfrom character_em.llm.loading import load_model\n"
        "out = {}\nfor revision in sys.argv[1:]:\n"
        "    model, _, _ = load_model('org/tiny-pinned', quantization='none', revision=revision or None)\n"
        "    out[revision] = float(sum(p.detach().double().abs().sum() for p in model.parameters()))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, "a" * 40, "b" * 40, ""], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {}
    for commit, folder in commits.items():
        from character_em.llm.loading import load_model

        model, _, _ = load_model(str(folder), quantization="none")
        expected[commit] = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    assert expected["a" * 40] != expected["b" * 40]
    assert loaded["a" * 40] == pytest.approx(expected["a" * 40])
    assert loaded["b" * 40] == pytest.approx(expected["b" * 40])
    assert loaded[""] == pytest.approx(expected["b" * 40])  # no revision: what main points at
    # The dry run's model checks read config.json at the pinned revision from the same cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert preflight.read_model_config(repo, "a" * 40) == json.loads((first / "config.json").read_text())
