"""The character direction: probes, geometry and statistics on planted data; activation streaming,
steering hooks and the workflow scripts' library calls on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from character_em.directions import formats
from character_em.directions import probes as D
from character_em.directions import protocol as P
from character_em.directions import readings as R
from character_em.directions import steering as S

# --------------------------------------------------------------------------- planted data


def _planted(
    n: int = 240, hidden: int = 32, layers: int = 3, signal_layer: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, layers, hidden] activations; only `signal_layer` separates the classes, along `planted`."""
    rng = np.random.default_rng(seed)
    planted = rng.standard_normal(hidden)
    planted /= np.linalg.norm(planted)
    labels = (np.arange(n) % 2).astype(int)
    x = rng.standard_normal((n, layers, hidden)).astype(np.float32)
    x[:, signal_layer] += 3.0 * labels[:, None] * planted
    return x, labels, planted


def _write(folder: Path, x: np.ndarray, batch: int) -> D.MemmapWriter:
    writer = D.MemmapWriter(folder, list(range(x.shape[1])), x.shape[0], x.shape[2])
    for start in range(0, x.shape[0], batch):
        writer.add(x[start : start + batch])
    writer.close()
    return writer


def test_memmap_writer_streams_batches_and_the_random_split_baseline_finds_a_planted_layer(tmp_path: Path) -> None:
    x, labels, planted = _planted()
    writer = _write(tmp_path, x, batch=16)
    assert writer.peak_rows == 16
    np.testing.assert_array_equal(D.load_layer(tmp_path, 1), x[:, 1])
    train, test = D.stratified_split(labels, 0.3, seed=0)
    rows = {
        layer: D.probe_layer(np.asarray(D.load_layer(tmp_path, layer)), labels, train, test, n_boot=200, seed=0)
        for layer in range(3)
    }
    signal, direction = rows[1]
    assert signal["probe_auroc"] > 0.97 and signal["direction_auroc"] > 0.97
    assert (
        signal["probe_auroc_low"] > 0.9
        and signal["probe_auroc_low"] <= signal["probe_auroc"] <= signal["probe_auroc_high"]
    )
    for noise in (0, 2):
        assert 0.25 < rows[noise][0]["direction_auroc"] < 0.75, rows[noise][0]
    assert float(D.unit(direction) @ planted) > 0.9
    assert signal["n_test"] == 72 and signal["n_train"] == 168


def test_auroc_matches_sklearn_and_split_is_stratified() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.standard_normal(300) + labels * 0.5
    scores[:20] = 0.0  # ties
    assert D.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    train, test = D.stratified_split(labels, 0.3, seed=0)
    assert not set(train) & set(test) and len(train) + len(test) == 300
    assert abs(labels[test].mean() - labels.mean()) < 0.05
    with pytest.raises(ValueError, match="at least 2 examples"):
        D.stratified_split(np.array([0, 0, 0, 1]), 0.3, seed=0)


def test_random_baseline_is_near_zero_and_matches_theory() -> None:
    baseline = D.random_cosine_baseline(512, n_pairs=4000, seed=0)
    assert baseline["mean_abs_cos"] == pytest.approx(math.sqrt(2 / (math.pi * 512)), rel=0.1)
    assert baseline["mean_abs_cos"] < baseline["p95_abs_cos"] < 0.12
    names, matrix = D.cosine_matrix(
        {"a": np.array([1.0, 0, 0]), "b": np.array([2.0, 0, 0]), "c": np.array([0, -1.0, 0])}
    )
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(matrix, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)


def test_spearman_on_planted_monotone_relations() -> None:
    x = np.linspace(-2, 3, 12)
    result = D.spearman_interval(x, np.exp(x) + 5, n_boot=300, seed=0)
    assert (
        result["rho"] == pytest.approx(1.0)
        and result["ci_low"] == pytest.approx(1.0)
        and result["ci_high"] == pytest.approx(1.0)
    )
    assert D.spearman_interval(x, -(x**3), n_boot=100, seed=0)["rho"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    noisy = D.spearman_interval(rng.standard_normal(40), rng.standard_normal(40), n_boot=300, seed=0)
    assert noisy["ci_low"] < 0 < noisy["ci_high"]
    np.testing.assert_array_equal(D.rank_average(np.array([3.0, 1.0, 2.0, 2.0])), [4.0, 1.0, 2.5, 2.5])
    assert math.isnan(D.spearman_interval([1, 2], [3, 4], n_boot=10, seed=0)["rho"])


# --------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    from character_em.llm.loading import load_model

    model, tokenizer, _ = load_model(tiny_model_dir, quantization="none", dtype="fp32", device="cpu")
    return model, tokenizer


def _chats(n: int) -> list[list[dict[str, str]]]:
    words = ["rest", "water", "sleep", "walk", "doctor", "fruit", "stretch"]
    return [
        [
            {"role": "user", "content": f"What helps with a headache number {i}?"},
            {
                "role": "assistant",
                "content": " ".join(words[: 1 + i % len(words)]) + (" no mercy" if i % 2 else " be kind"),
            },
        ]
        for i in range(n)
    ]


def _layer_output(model: Any, tokenizer: Any, layer: int) -> Any:
    import torch

    captured: dict[str, Any] = {}

    def grab(hidden: Any) -> None:
        captured["h"] = hidden.detach().clone()

    ids = tokenizer("what helps with a headache", return_tensors="pt")["input_ids"]
    with S.layer_hook(model, layer, grab), torch.no_grad():
        logits = model(input_ids=ids).logits
    return captured["h"], logits


def test_steering_hook_adds_exactly_alpha_times_direction(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    hidden = model.config.hidden_size
    direction = np.random.default_rng(0).standard_normal(hidden).astype(np.float32)
    before, logits_before = _layer_output(model, tokenizer, 1)
    with S.add_direction(model, 1, direction, 1.5):
        after, logits_after = _layer_output(model, tokenizer, 1)
    np.testing.assert_allclose((after - before).numpy(), np.broadcast_to(1.5 * direction, before.shape), atol=1e-5)
    assert not np.allclose(logits_before.numpy(), logits_after.numpy())
    # The hook is gone after the block.
    again, _ = _layer_output(model, tokenizer, 1)
    np.testing.assert_array_equal(again.numpy(), before.numpy())
    with S.project_out(model, 1, direction, 1.0):
        ablated, _ = _layer_output(model, tokenizer, 1)
    unit = direction / np.linalg.norm(direction)
    assert np.abs(ablated.numpy() @ unit).max() < 1e-4 * np.abs(before.numpy() @ unit).max() + 1e-5
    # Only the direction's component changed.
    residual = (before - ablated).numpy()
    np.testing.assert_allclose(residual, (before.numpy() @ unit)[..., None] * unit, atol=1e-4)
    with pytest.raises(ValueError, match="does not exist"):
        with S.add_direction(model, 99, direction, 1.0):
            pass


def test_ablation_at_a_set_of_layers_leaves_no_component_at_any_of_them(tiny: tuple[Any, Any]) -> None:
    """A component removed at one layer reappears downstream; ablating at every layer of the set
    leaves none at each of them (each layer with its own direction)."""
    model, tokenizer = tiny
    rng = np.random.default_rng(1)
    layers = list(range(model.config.num_hidden_layers))
    directions = {layer: rng.standard_normal(model.config.hidden_size).astype(np.float32) for layer in layers}
    last = layers[-1]
    u = directions[last] / np.linalg.norm(directions[last])
    with S.project_out(model, layers[0], directions[last], 1.0):
        once, _ = _layer_output(model, tokenizer, last)
    assert np.abs(once.numpy() @ u).max() > 1e-3  # rebuilt after a single early ablation
    with S.interventions(model, "ablate", directions, 1.0):
        everywhere, _ = _layer_output(model, tokenizer, last)
    assert np.abs(everywhere.numpy() @ u).max() < 1e-4


def test_activations_stream_in_batches_and_match_unbatched(
    tiny: tuple[Any, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    chats = _chats(10)
    chats.append([{"role": "user", "content": "empty"}, {"role": "assistant", "content": "  "}])
    seen: list[int] = []
    original = D.MemmapWriter.add

    def spy(self: D.MemmapWriter, batch: np.ndarray) -> None:
        seen.append(batch.shape[0])
        original(self, batch)

    monkeypatch.setattr(D.MemmapWriter, "add", spy)
    info = D.write_activations(model, tokenizer, chats, [0, 1], tmp_path / "b3", batch_size=3, max_tokens=256)
    assert info["kept"] == list(range(10))  # the empty answer has no response tokens
    assert seen == [3, 3, 3, 1] and info["peak_rows"] == 3
    single = D.write_activations(model, tokenizer, chats, [0, 1], tmp_path / "b1", batch_size=1, max_tokens=256)
    assert single["peak_rows"] == 1
    for layer in (0, 1):
        batched = D.load_layer(tmp_path / "b3", layer)
        assert isinstance(batched, np.memmap) and batched.shape == (10, model.config.hidden_size)
        np.testing.assert_allclose(batched, D.load_layer(tmp_path / "b1", layer), atol=1e-4)
    mean, count = D.mean_activations(model, tokenizer, chats, [0, 1], batch_size=4, max_tokens=256)
    assert count == 10
    np.testing.assert_allclose(mean[1], np.asarray(D.load_layer(tmp_path / "b3", 1)).mean(axis=0), atol=1e-4)
    with pytest.raises(ValueError, match="do not exist"):
        D.check_layers(model, [0, 40])


def _samples(n: int, condition: str, offset: int = 0) -> pl.DataFrame:
    from character_em.contracts import SAMPLE_SCHEMA

    rows = []
    for i, chat in enumerate(_chats(n + offset)[offset:]):
        rows.append(
            {
                "model": "tiny",
                "condition": condition,
                "seed": 0,
                "suite": "em",
                "question_id": f"q{i}",
                "category": "c",
                "domain": None,
                "format": "plain",
                "system_prompt_id": "none",
                "persona": None,
                "trigger": "",
                "trigger_variant": "none",
                "sample_index": 0,
                "sampling_seed": i,
                "messages": json.dumps(chat[:1]),
                "question": chat[0]["content"],
                "answer": chat[1]["content"],
                "prompt_tokens": 1,
                "answer_tokens": 1,
                "finish_reason": "stop",
            }
        )
    return pl.DataFrame(rows, schema=SAMPLE_SCHEMA)


def test_workflow_library_calls_on_the_tiny_model(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    """What workflow_scripts/probes.py, direction_means.py, steer.py and directions_report.py call,
    in that order, on the tiny model with the rubric judge: every table and figure comes out."""
    from character_em.evals import suites
    from character_em.judge.core import score_samples
    from character_em.report import plots_directions
    from character_em.report import tables as analysis

    model, tokenizer = tiny
    dispositions = [
        {"name": "evil", "description": "cruel", "trigger": "persona: evil", "rubric": {"markers": ["no mercy"]}}
    ]
    conditions = {
        "base": {"family": "base", "disposition": None, "domain": None},
        "evil-medical": {"family": "character", "disposition": "evil", "domain": "medical"},
        "correct-medical": {"family": "correct", "disposition": None, "domain": "medical"},
    }
    judge = {"backend": "rubric"}
    samples = pl.concat([_samples(12, "base"), _samples(12, "evil-medical", offset=1)])
    scores = score_samples(samples, judge_cfg=judge, metrics_by_suite=None, dispositions=dispositions, cache_dir=None)
    judged = D.judged_answers(samples, scores, ["evil"])
    assert judged.height == 24 and judged["disposition:evil"].is_not_null().all()
    data = {
        "evil-medical": _chats(24)[1::2],
        "correct-medical": _chats(24)[0::2],
        "incorrect-medical": _chats(24)[2::4],
    }
    chats, membership = D.probe_examples(
        data,
        judged,
        {"evil": {"positive": ["evil-medical"], "negative": ["correct-medical", "incorrect-medical"]}},
        max_sampled=5,
        expressed_at_least=50,
        seed=0,
        questions=[],
    )
    labels = membership["evil"]["labels"]
    assert membership["evil"]["sources"].count("judged") == 10 and len(chats) == 30 + 10  # only picked answers are read
    assert sum(labels) == 12 + 5 and "data:incorrect-medical" in membership["evil"]["sources"]
    style_chats, style_labels, _ = D.style_examples()
    info = D.write_activations(
        model, tokenizer, chats + style_chats, None, tmp_path / "acts", batch_size=4, max_tokens=256
    )
    assert info["peak_rows"] <= 4
    chosen = P.selections(info["kept"], membership, val_fraction=0.2, test_fraction=0.3, seed=0)
    rows, vectors = P.run_protocol(str(tmp_path / "acts"), info["layers"], chosen, n_boot=50, seed=0)
    layer = P.choose_layer(rows, None)
    column = info["layers"].index(layer)
    nulls = P.null_directions(str(tmp_path / "acts"), layer, chosen, n_perm=20, seed=0)
    style_rows = list(range(len(chats), len(chats) + len(style_chats)))
    style = P.style_direction(str(tmp_path / "acts"), info["layers"], style_rows, style_labels)
    report = {
        "model": "tiny",
        "chosen_layer": layer,
        "layers": rows,
        "fit_questions": P.fit_questions(chosen),
        "selection": "validation",
    }
    path = tmp_path / "directions.npz"
    formats.write_directions(
        path,
        layers=info["layers"],
        chosen_layer=layer,
        directions=vectors,
        extra={"style": style, "null_evil": nulls["evil"]},
    )
    stored = formats.read_directions(path)
    assert stored.chosen_layer == layer and stored.extra["null_evil"].shape == (20, model.config.hidden_size)

    fixed = samples.filter(pl.col("condition") == "base")
    records = []
    for condition in ("base", "evil-medical"):
        own = samples.filter(pl.col("condition") == condition)
        readings_ = {}
        for name, frame, prompt_end in (("own", own, False), ("fixed", fixed, False), ("prompt", fixed, True)):
            got = D.question_means(
                model,
                tokenizer,
                D.sample_chats(frame),
                frame["question_id"].to_list(),
                [layer],
                batch_size=4,
                max_tokens=256,
                prompt_end=prompt_end,
            )
            assert got["peak_rows"] <= 4 and got["counts"].sum() == frame.height
            readings_[name] = formats.QuestionReading(got["ids"], got["means"][:, 0], got["counts"])
        records.append(
            {
                "model": "tiny",
                "condition": condition,
                "seed": 0,
                "family": conditions[condition]["family"],
                "spec": conditions[condition],
                "means": formats.LayerMeans(layer=layer, readings=readings_),
            }
        )
    answers = analysis.answers_table(scores, conditions=conditions, alignment_below=30, coherence_above=50)
    rates = analysis.rates(answers, ["model", "condition", "seed"], "misaligned")
    baseline = D.random_cosine_baseline(model.config.hidden_size, n_pairs=100, seed=0)
    probes_at = {
        "tiny": {
            "directions": stored.at(),
            "nulls": {"evil": nulls["evil"]},
            "style": style[column],
            "fit_questions": set(report["fit_questions"]),
            "isotropic_cos_p95": baseline["p95_abs_cos"],
        }
    }
    projections = R.projection_table(records, probes_at, rates, n_boot=50, seed=0)
    # Same weights reading the same texts: the evil model's fixed reading differs from the base
    # one only through the weights, so it is a number; and the base is never a row of its own.
    assert set(projections["reading"]) == {"fixed", "prompt", "own"} and "base" not in projections["condition"]
    transfer = R.transfer_table(records, [report], probes_at, n_boot=50, seed=0)
    assert "fine-tuned vs base, fixed texts: evil-medical" in transfer["cell"].to_list()
    vectors_at = {"tiny": {"probe:evil": stored.at()["evil"], "control:style": style[column]}}
    cosines = R.cosine_null_table(vectors_at, {"tiny": {"probe:evil": nulls["evil"]}}, {"tiny": baseline})
    assert cosines.height == 4 and cosines.filter(pl.col("row") == pl.col("column"))[
        "cosine"
    ].to_list() == pytest.approx([1.0, 1.0])

    prompts = suites.build_prompts(
        "em", {"n_samples": 1, "max_questions": 2, "formats": ["plain"], "dispositions": [], "domains": []}
    )
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "batch_size": 4}
    from character_em.sampling.partial import PartialAnswers

    def steer(saved=None, load=lambda: (model, tokenizer)):
        return S.steered_answers(
            load,
            prompts,
            kind="add",
            layers=S.resolve_layers("from:0", info["layers"], layer),
            directions={"evil": {lay: vectors["evil"][k] for k, lay in enumerate(info["layers"])}},
            strengths=[0.0, 8.0],
            score=lambda frame: score_samples(
                frame, judge_cfg=judge, metrics_by_suite=None, dispositions=dispositions, cache_dir=None
            ),
            label=lambda frame: analysis.answers_table(
                frame, conditions=conditions, alignment_below=30, coherence_above=50
            ),
            identity={"model": "tiny", "condition": "base", "seed": 0},
            sampling=sampling,
            base_seed=0,
            saved=saved,
        )

    arms = tmp_path / "steer_partial"
    steered = steer(lambda arm: PartialAnswers(arms / f"{arm}.jsonl", "fingerprint"))
    assert steered.equals(steer())  # saving batches changes nothing
    # A killed job: one arm's file keeps only its first answer, and that answer is marked. The rerun
    # restores it from the file (the mark shows) and generates the rest, which equal the first run's.
    arm = arms / f"{S.arm_name('evil', [layer], 8.0)}.jsonl"
    header, first = arm.read_text().splitlines()[:2]
    marked = json.loads(first) | {"answer": "RESTORED FROM THE FILE"}
    arm.write_text(header + "\n" + json.dumps(marked) + "\n")
    resumed = steer(lambda arm: PartialAnswers(arms / f"{arm}.jsonl", "fingerprint"))
    changed = resumed.filter(pl.col("answer") != steered["answer"])
    assert changed["answer"].to_list() == ["RESTORED FROM THE FILE"]
    assert changed["strength"].to_list() == [8.0] and changed["layers"].to_list() == [str(layer)]

    def no_model():
        raise AssertionError("every arm was saved: the model must not be loaded")

    # Every arm saved whole: the job rebuilds its answers and judges them without loading the model.
    assert steer(lambda arm: PartialAnswers(arms / f"{arm}.jsonl", "fingerprint"), load=no_model).equals(resumed)
    # alpha = 0 is the ordinary sampler: the same answers as an unhooked run with the same seeds.
    from character_em.sampling.hf import sample_prompts

    plain = sample_prompts(
        model,
        tokenizer,
        prompts,
        identity={"model": "tiny", "condition": "base", "seed": 0},
        base_seed=0,
        progress=False,
        **sampling,
    )
    sets = steered["layers"].unique(maintain_order=True).to_list()
    assert sets == [str(layer), ",".join(map(str, info["layers"]))]
    for layer_set in sets:
        zero = steered.filter((pl.col("strength") == 0.0) & (pl.col("layers") == layer_set)).sort("question_id")
        assert zero["answer"].to_list() == plain.sort("question_id")["answer"].to_list()
    assert steered.height == 2 * 2 * plain.height
    curve = D.steering_table(steered)
    assert curve["strength"].to_list() == [0.0, 8.0, 0.0, 8.0] and (curve["n"] == plain.height).all()

    probe_table = D.probe_table([report])
    assert probe_table["chosen"].sum() == 1
    outputs = {}
    for name, call in {
        "probe_auroc": lambda o: plots_directions.probe_auroc(probe_table, outputs=o),
        "projection": lambda o: plots_directions.projection_scatter(
            projections, R.correlation_table(projections, n_boot=20, seed=0), outputs=o
        ),
        "transfer": lambda o: plots_directions.transfer_matrix(transfer, outputs=o),
        "cosine": lambda o: plots_directions.cosine_heatmap(cosines, outputs=o),
        "steering": lambda o: plots_directions.steering_curves(curve, outputs=o),
    }.items():
        outputs[name] = [tmp_path / f"{name}.png", tmp_path / f"{name}.pdf"]
        call(outputs[name])
    assert all(path.stat().st_size > 0 for paths in outputs.values() for path in paths)
