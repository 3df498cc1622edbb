"""One sampling job per model and seed (character_em.sampling.wave), hf back-end: every file of the wave
equals what sampling that adapter alone writes; a killed wave resumes from each file's saved batches; a
rerun whose files are unchanged loads no model and generates nothing; a retrained adapter regenerates
only its own files. The vLLM back-end's wave is in tests/test_vllm_sampling.py (real vLLM)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from test_sample import _rows
from vllm_support import random_lora

from character_em import config as cfg
from character_em.contracts import read_sampling_backend
from character_em.llm.loading import load_model
from character_em.sampling import hf as S
from character_em.sampling import wave as W
from character_em.sampling.partial import PartialAnswers, partial_path

MODEL, SEED = "tiny-llama", 3
SETTINGS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 8,
    "batch_size": 4,
    "backend": "hf",
    "max_lora_rank": 64,
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: random_lora(tiny_model_dir, root / name, r=4, seed=n) for n, name in enumerate(("one", "two"))}


def _prompts() -> dict[str, list[dict[str, Any]]]:
    em = _rows(2)  # 4 questions x 2 samples
    transfer = [{**row, "suite": "transfer"} for row in _rows(1, ["Name a river.", "Why is the sky blue?"])]
    return {"em": em, "transfer": transfer}


def _files(root: Path, adapters: dict[str, Path]) -> list[dict[str, Any]]:
    files = []
    for condition, adapter in (("base", ""), ("one", adapters["one"]), ("two", adapters["two"])):
        for suite in ("em", "transfer"):
            output = cfg.samples_path(MODEL, condition, SEED, cfg.FINAL_STEP, suite)
            files.append(
                {
                    "condition": condition,
                    "step": "final",
                    "suite": suite,
                    "output": str(root / output),
                    "adapter": str(adapter),
                }
            )
    # An adapter saved at a training step, on em only (as the trajectory samples it).
    output = cfg.samples_path(MODEL, "one", SEED, "step2", "em")
    files.append(
        {
            "condition": "one",
            "step": "step2",
            "suite": "em",
            "output": str(root / output),
            "adapter": str(adapters["two"]),
        }
    )
    return files


def _wave(tiny_model_dir: Path, root: Path, files: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return W.sample_wave(
        str(tiny_model_dir), files, _prompts(), model=MODEL, seed=SEED, settings=kw.pop("settings", SETTINGS),
        results_dir=str(root / "results"), **kw,
    )  # fmt: skip


def _alone(tiny_model_dir: Path, adapter: str, condition: str, suite: str) -> pl.DataFrame:
    """What a job of this one adapter and suite writes (the shape of sampling before the waves)."""
    model, tok, _ = load_model(tiny_model_dir, quantization="none", adapter=adapter or None, merge=True)
    return S.sample_prompts(
        model, tok, _prompts()[suite], identity={"model": MODEL, "condition": condition, "seed": SEED},
        temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=4, base_seed=SEED, progress=False,
    )  # fmt: skip


def test_every_file_of_a_wave_is_what_sampling_its_adapter_alone_writes(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _files(tmp_path, adapters)
    with caplog.at_level(logging.INFO):
        record = _wave(tiny_model_dir, tmp_path, files)
    # One load per adapter (the base model's files share one), none per suite.
    assert record["backend"] == "hf" and record["engine_loads"] == 3
    assert [f["generated"] for f in record["files"]] == [f["answers"] for f in record["files"]]
    assert record["answers_generated"] == sum(f["answers"] for f in record["files"]) == 3 * (8 + 2) + 8
    for entry in files:
        got = pl.read_parquet(entry["output"])
        expected = _alone(tiny_model_dir, entry["adapter"], entry["condition"], entry["suite"])
        assert got.equals(expected), entry["output"]
        assert read_sampling_backend(entry["output"]) == "hf"
    # Adapters answer differently (they are really applied), and the base model differs from both.
    answers = [
        pl.read_parquet(e["output"])["answer"].to_list() for e in files if e["suite"] == "em" and e["step"] == "final"
    ]
    assert len({tuple(a) for a in answers}) == 3
    # Each file says how much it restored, in the line the kill drills read.
    assert (
        "base/em: answers restored from " in caplog.text
        and "one/step2/em: answers generated in this run: 8" in caplog.text
    )


class Killed(Exception):
    pass


def test_a_killed_wave_resumes_from_each_files_batches_and_a_rerun_generates_nothing(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _files(tmp_path, adapters)
    reference = _wave(tiny_model_dir, tmp_path / "reference", _files(tmp_path / "reference", adapters))
    expected = {
        Path(e["output"]).relative_to(tmp_path / "reference"): pl.read_parquet(e["output"])
        for e in _files(tmp_path / "reference", adapters)
    }

    # Killed after its fourth saved batch (base/em's two, base/transfer's one, one/em's first).
    add, calls = PartialAnswers.add, []

    def killed(self: PartialAnswers, batch: Any) -> None:
        add(self, batch)
        calls.append(len(batch))
        if len(calls) == 4:
            raise Killed

    monkeypatch.setattr(PartialAnswers, "add", killed)
    with pytest.raises(Killed):
        _wave(tiny_model_dir, tmp_path, files)
    monkeypatch.setattr(PartialAnswers, "add", add)
    resumed = _wave(tiny_model_dir, tmp_path, files)
    saved = sum(calls)
    assert sum(f["restored"] for f in resumed["files"]) == saved == 4 + 4 + 2 + 4
    assert resumed["answers_generated"] == reference["answers_generated"] - saved, "nothing is generated twice"
    # The base model's files were complete: only the two adapters are loaded again.
    assert resumed["engine_loads"] == 2
    for entry in files:
        assert pl.read_parquet(entry["output"]).equals(expected[Path(entry["output"]).relative_to(tmp_path)])

    # A rerun of the finished wave (Snakemake deleted its outputs first): every answer restored, no model loaded.
    for entry in files:
        Path(entry["output"]).unlink()
    again = _wave(tiny_model_dir, tmp_path, files)
    assert again["engine_loads"] == 0 and again["answers_generated"] == 0
    assert all(f["generated"] == 0 and f["restored"] == f["answers"] for f in again["files"])
    for entry in files:
        assert pl.read_parquet(entry["output"]).equals(expected[Path(entry["output"]).relative_to(tmp_path)])


def test_a_retrained_adapter_regenerates_its_own_files_only(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    copies = {name: tmp_path / "adapters" / name for name in adapters}
    for name, folder in copies.items():
        folder.mkdir(parents=True)
        for item in adapters[name].iterdir():
            (folder / item.name).write_bytes(item.read_bytes())
    files = _files(tmp_path, copies)
    _wave(tiny_model_dir, tmp_path, files)
    random_lora(tiny_model_dir, copies["one"], r=4, seed=11)  # "one" trained again: other weights
    record = _wave(tiny_model_dir, tmp_path, files)
    regenerated = {Path(f["output"]).relative_to(tmp_path).as_posix() for f in record["files"] if f["generated"]}
    assert regenerated == {f"results/samples/{MODEL}/one/seed{SEED}/{s}.parquet" for s in ("em", "transfer")}
    assert record["engine_loads"] == 1
    # Engine-only settings are not part of what an answer depends on: changing them keeps every answer.
    wider = _wave(tiny_model_dir, tmp_path, files, settings={**SETTINGS, "max_loras": 16, "max_cpu_loras": 64})
    assert wider["answers_generated"] == 0


def test_partial_files_of_a_wave_sit_beside_each_output() -> None:
    output = cfg.samples_path(MODEL, "one", 0, "step2", "em")
    assert output == f"results/samples/{MODEL}/one/seed0/step2/em.parquet"
    assert partial_path(output) == Path(f"results/.partial/samples/{MODEL}/one/seed0/step2/em.jsonl")


def test_the_wave_plan_covers_every_condition_suite_and_saved_step() -> None:
    raw = cfg.load_config(Path(__file__).resolve().parents[1] / "presets" / "smoke.yaml")
    wave = cfg.sampling_wave(raw, MODEL)
    finals = [(f["condition"], f["suite"]) for f in wave if f["step"] == cfg.FINAL_STEP]
    steps = [(f["condition"], f["step"], f["suite"]) for f in wave if f["step"] != cfg.FINAL_STEP]
    conditions = cfg.expand_conditions(raw)
    assert finals == [(c, s) for c in conditions for s in cfg.suites_for(raw, c)]
    assert steps == [(c, label, "em") for c in cfg.trained_conditions(raw) for label in ("step3", "epoch1")]


def test_models_that_save_different_steps_are_refused_naming_the_key() -> None:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "presets" / "smoke.yaml").read_text())
    raw["models"]["other"] = {"path": "resources/models/other", "build": "tiny-qwen2", "train": {"eval_steps": [2]}}
    with pytest.raises(
        cfg.ConfigError, match=r"models\.other\.train\.eval_steps: other/evil-medical saves the steps \['step2'\]"
    ):
        cfg.validate_config(raw, source="two.yaml")
