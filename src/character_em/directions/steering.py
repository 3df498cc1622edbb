"""Interventions on the residual stream: forward hooks on one decoder layer's output.

Layer ``i`` means the output of decoder block ``i`` (the residual stream after it), the same
convention the activation reader in ``character_em.directions.probes`` uses, so a direction read at layer
``i`` is added back at the very place it was measured.

Steering wraps ``character_em.sampling.hf.sample_prompts`` in a hook context manager instead of running
a second decode loop: the per-sample seeds, batching and stop handling stay exactly those of the
ordinary sampling jobs, so alpha = 0 reproduces the unsteered samples of the same seed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from character_em.contracts import SAMPLE_COLUMNS, SAMPLE_SCHEMA
from character_em.directions.formats import STEERING_ARM_SCHEMA, ProbeDirections, read_directions
from character_em.hashing import canonical_json, sha256_text

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from character_em.sampling.partial import PartialAnswers

log = logging.getLogger(__name__)

INTERVENTIONS = ("add", "ablate")


def decoder_layers(model: Any) -> Sequence[Any]:
    """The model's list of decoder blocks, found structurally so that Llama, Qwen2 and a peft wrapper
    around either all work: the first ``ModuleList`` whose length is ``num_hidden_layers``."""
    import torch

    n_layers = int(model.config.num_hidden_layers)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers
    ]
    # Prefer the list the model calls `layers` (Llama, Qwen2, Mistral, Gemma); else the first one.
    for name, module in candidates:
        if name.split(".")[-1] == "layers":
            return module
    if candidates:
        return candidates[0][1]
    raise ValueError(f"found no list of {n_layers} decoder layers in {type(model).__name__}")


def _hidden(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5; older ones and some models a tuple."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def layer_hook(model: Any, layer: int, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Run ``edit(hidden)`` on decoder block ``layer``'s output for every forward pass in the block.

    ``edit`` returns a replacement tensor, or None to leave the output as it is (a reader). The hook
    is removed on exit, also when the body raises.
    """
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} does not exist; the model has layers 0..{len(blocks) - 1}")

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        new = edit(_hidden(output))
        return None if new is None else _with_hidden(output, new)

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _as_tensor(direction: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(direction, dtype=np.float32)).to(device=like.device, dtype=like.dtype)


@contextlib.contextmanager
def add_direction(model: Any, layer: int, direction: np.ndarray, alpha: float) -> Iterator[None]:
    """Add ``alpha * direction`` to the residual stream after block ``layer``, at every position
    (prompt and generated tokens alike, as persona-vector steering does)."""
    vector = np.asarray(direction, dtype=np.float32) * float(alpha)

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + _as_tensor(vector, hidden)

    with layer_hook(model, layer, edit):
        yield


@contextlib.contextmanager
def project_out(model: Any, layer: int, direction: np.ndarray, fraction: float = 1.0) -> Iterator[None]:
    """Remove ``fraction`` of the residual stream's component along ``direction`` after block
    ``layer``: h - fraction * (h . u) u with u the unit direction. fraction 1 leaves no component."""
    norm = float(np.linalg.norm(direction))
    if norm == 0.0:
        raise ValueError("cannot project out a zero direction")
    unit = np.asarray(direction, dtype=np.float64) / norm

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        # The projection in float32 at least: in bf16 the leftover component would be rounding noise
        # the size of the component itself.
        work = hidden.float()
        u = _as_tensor(unit, work)
        coefficient = work @ u
        return (work - float(fraction) * coefficient.unsqueeze(-1) * u).to(hidden.dtype)

    with layer_hook(model, layer, edit):
        yield


def intervention(
    model: Any, kind: str, layer: int, direction: np.ndarray, strength: float
) -> contextlib.AbstractContextManager[None]:
    """``add``: alpha x direction; ``ablate``: project out that fraction of the direction."""
    if kind == "add":
        return add_direction(model, layer, direction, strength)
    if kind == "ablate":
        return project_out(model, layer, direction, strength)
    raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {kind!r}")


@contextlib.contextmanager
def interventions(
    model: Any, kind: str, directions_by_layer: Mapping[int, np.ndarray], strength: float
) -> Iterator[None]:
    """The same intervention at several layers at once, each with the direction read at that
    layer: ablating at one layer alone leaves later layers free to rebuild the component."""
    with contextlib.ExitStack() as stack:
        for layer, direction in sorted(directions_by_layer.items()):
            stack.enter_context(intervention(model, kind, int(layer), direction, strength))
        yield


def resolve_layers(spec: Any, probed: Sequence[int], chosen: int) -> list[list[int]]:
    """The layer sets to intervene at: always the chosen layer alone, plus the configured set
    (``eval.probes.steering.layers``: a list of probed layers, or ``"from:L"`` = every probed layer
    from L on) when it differs. Raises on a layer that was not probed (no direction there)."""
    probed = sorted(int(layer) for layer in probed)
    sets = [[int(chosen)]]
    if spec is None:
        return sets
    if isinstance(spec, str):
        if not spec.startswith("from:") or not spec[5:].isdigit():
            raise ValueError(f"eval.probes.steering.layers: expected a list or 'from:L', got {spec!r}")
        start = int(spec[5:])
        wanted = [layer for layer in probed if layer >= start]
        if not wanted:
            raise ValueError(
                f"eval.probes.steering.layers {spec!r}: no probed layer from {start} on (probed: {probed})"
            )
    else:
        wanted = sorted({int(layer) for layer in spec})
        missing = [layer for layer in wanted if layer not in probed]
        if missing:
            raise ValueError(
                f"eval.probes.steering.layers {missing} were not probed (models.<m>.probe_layers: {probed}); "
                "a direction exists only at probed layers"
            )
    if wanted != sets[0]:
        sets.append(wanted)
    return sets


# --------------------------------------------------------------------------- arms and controls

# What a steering job can steer along, besides a disposition's own direction: each control is
# scaled, layer by layer, to the norm of the disposition's direction there (matched norm), so an
# own-direction effect beyond the controls' is not a matter of how hard the stream was pushed.
CONTROLS = ("random", "style", "disposition")
OWN = "own"
UNSTEERED = "unsteered"


def control_vectors(
    stored: ProbeDirections,
    direction: str,
    control: str,
    layers: Sequence[int],
    *,
    seed: int,
    other: str | None = None,
) -> dict[int, np.ndarray]:
    """The vector to steer along at each layer for one arm set of ``direction`` (a disposition):

    - ``own``: its mean-difference direction as stored;
    - ``random``: a Gaussian random direction (drawn per layer from ``seed``, the disposition and the
      layer, so reruns and other jobs draw the same one);
    - ``style``: the formal-minus-casual control direction the probes store (``extra["style"]``);
    - ``disposition``: the direction of ``other``, another disposition;

    each control rescaled to the norm of ``direction`` at that layer. For ablation only the unit
    direction matters (``project_out``); for addition the matched norm makes equal strengths equal
    pushes.
    """
    out = {}
    for layer in layers:
        own = np.asarray(stored.at(layer)[direction], dtype=np.float64)
        norm = float(np.linalg.norm(own))
        if norm == 0.0:
            raise ValueError(f"{stored.path}: the direction of {direction!r} at layer {layer} is zero")
        if control == OWN:
            vector = own
        elif control == "random":
            key = canonical_json(["steering control: random", int(seed), direction, int(layer)])
            rng = np.random.default_rng(int(sha256_text(key)[:16], 16))
            vector = rng.standard_normal(own.shape)
        elif control == "style":
            if "style" not in stored.extra:
                raise ValueError(f"{stored.path}: no style control direction stored; rerun `probes`")
            vector = np.asarray(stored.extra["style"][stored.layers.index(int(layer))], dtype=np.float64)
        elif control == "disposition":
            if other is None or other == direction or other not in stored.directions:
                raise ValueError(
                    f"control 'disposition' of {direction!r} needs another stored disposition, got {other!r} "
                    f"(stored: {sorted(stored.directions)})"
                )
            vector = np.asarray(stored.at(layer)[other], dtype=np.float64)
        else:
            raise ValueError(f"steering control must be {OWN!r} or one of {CONTROLS}, got {control!r}")
        size = float(np.linalg.norm(vector))
        if size == 0.0:
            raise ValueError(f"{stored.path}: the {control} control of {direction!r} at layer {layer} is zero")
        out[int(layer)] = (vector * (norm / size)).astype(np.float32)
    return out


def other_disposition(direction: str, dispositions: Sequence[str]) -> str | None:
    """The disposition whose direction is ``direction``'s ``disposition`` control: the next one in
    sorted order (cyclically), a choice fixed before any result is seen; None with only one."""
    names = sorted(set(dispositions))
    if direction not in names or len(names) < 2:
        return None
    return names[(names.index(direction) + 1) % len(names)]


def steering_suite_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """The em prompts every steering arm samples (``suites.build_prompts("em", ...)``): the em suite's
    questions with ``eval.probes.steering``'s samples per prompt, question cap and formats."""
    from character_em import config as cfg

    steer = config["eval"]["probes"]["steering"]
    spec = {**cfg.suite_spec(config, "em"), "n_samples": steer["n_samples"], "formats": list(steer["formats"])}
    if steer["max_questions"] is not None:
        spec["max_questions"] = steer["max_questions"]
    return spec


def probed_dispositions(config: Mapping[str, Any], conditions: Sequence[str]) -> list[str]:
    """Dispositions the probes fit a direction for (``config.probe_pairs``), sorted."""
    from character_em import config as cfg

    return sorted({pair["disposition"] for pair in cfg.probe_pairs(config, list(conditions))})


def steering_arm_sets(config: Mapping[str, Any], conditions: Sequence[str]) -> list[tuple[str, str, str]]:
    """(condition, direction, control) of every steering job of one model, as the rules expand them:
    the base model steered along each probed disposition's direction, and each character condition
    of a probed disposition with its own disposition's direction ablated; each with its own direction
    and every control of ``eval.probes.steering.controls`` (``disposition`` only where another
    disposition is probed)."""
    from character_em import config as cfg

    probed = probed_dispositions(config, conditions)
    controls = list(config["eval"]["probes"]["steering"]["controls"])
    jobs = []
    steered = [("base", name) for name in probed] + [
        (c, cfg.condition_info(config, c)["disposition"])
        for c in conditions
        if cfg.condition_info(config, c)["family"] == "character"
        and cfg.condition_info(config, c)["disposition"] in probed
    ]
    for condition, direction in steered:
        jobs.append((condition, direction, OWN))
        for control in controls:
            if control != "disposition" or other_disposition(direction, probed) is not None:
                jobs.append((condition, direction, control))
    return jobs


@dataclass(frozen=True)
class SteeringArm:
    """One setting a steering job samples the prompts under. ``direction`` is the disposition the arm
    set belongs to (the norm every control matches, the trait whose expression is read);
    ``control`` is ``own``, one of ``CONTROLS``, or ``unsteered`` (strength 0: no hook at all, the
    shared start of every curve); ``vector`` names what is steered along (the disposition, "random",
    "style", another disposition; "none" unsteered); ``by_layer`` is the vector at each layer of
    ``layers``."""

    intervention: str
    direction: str
    control: str
    vector: str
    layers: tuple[int, ...]
    strength: float
    by_layer: Mapping[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        """A file-name-safe label, unique within a job: ``own-evil_L12-16_s2``; ``unsteered``."""
        if self.control == UNSTEERED:
            return UNSTEERED
        layers = "-".join(str(layer) for layer in self.layers)
        return f"{self.control}-{self.vector}_L{layers}_s{self.strength:g}"

    def columns(self) -> dict[str, Any]:
        return {
            "intervention": self.intervention,
            "direction": self.direction,
            "control": self.control,
            "vector": self.vector,
            "layers": ",".join(str(layer) for layer in self.layers) if self.layers else "none",
            "strength": float(self.strength),
            "arm": self.name,
        }


def plan_arms(
    *,
    kind: str,
    direction: str,
    control: str,
    vector: str,
    vectors: Mapping[int, np.ndarray],
    layer_sets: Sequence[Sequence[int]],
    strengths: Sequence[float],
) -> list[SteeringArm]:
    """The arms of one steering job: every nonzero strength at every layer set, and, in the job of the
    own direction only, one unsteered arm when the strengths include 0 (strength 0 is no intervention
    whatever the vector or layers, so it is sampled once and starts every curve of the set)."""
    if kind not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {kind!r}")
    arms = []
    if control == OWN and any(float(s) == 0.0 for s in strengths):
        arms.append(SteeringArm(kind, direction, UNSTEERED, "none", (), 0.0))
    for layer_set in layer_sets:
        chosen = tuple(int(layer) for layer in layer_set)
        for strength in strengths:
            if float(strength) != 0.0:
                by_layer = {layer: vectors[layer] for layer in chosen}
                arms.append(SteeringArm(kind, direction, control, vector, chosen, float(strength), by_layer))
    return arms


def steered_samples(
    load_model: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    prompt_rows: list[dict[str, Any]],
    *,
    arms: Sequence[SteeringArm],
    identity: dict[str, Any],
    sampling: Mapping[str, Any],
    base_seed: int,
    saved: Callable[[str], PartialAnswers] | None = None,
) -> pl.DataFrame:
    """Sample the prompts under each arm (``plan_arms``): a Samples frame (``SAMPLE_COLUMNS``) with
    the arm's identity in ``formats.STEERING_ARM_SCHEMA``'s columns, arm by arm. Nothing is judged
    here: rule ``judge_steering`` scores the file through the same judge function as every answer.

    load_model: () -> (model, tokenizer), called once, and only if some arm has answers left to draw.
    Every arm reuses the same per-sample seeds, so arms compare the same random streams (paired across
    strengths and controls); ``sampling["batch_size"]`` answers share each forward pass.
    saved: arm name -> that arm's finished batches (``sampling.PartialAnswers``), so a killed job
    resumes every arm from its last saved batch.
    """
    from character_em.sampling.hf import expand_rows, sample_prompts

    n_rows = len(expand_rows(prompt_rows, identity, base_seed))
    loaded: list[Any] = []  # [model, tokenizer] once loaded
    frames = []
    for arm in arms:
        partial = saved(arm.name) if saved is not None else None
        resume: dict[str, Any] = {}
        if partial is not None:
            resume = {"done": dict(partial.done), "on_batch": partial.add}
            if partial.done:
                log.info("%s: %d answers restored", arm.name, len(partial.done))
        settings = {
            "identity": identity,
            "temperature": float(sampling["temperature"]),
            "top_p": float(sampling["top_p"]),
            "max_new_tokens": int(sampling["max_new_tokens"]),
            "batch_size": int(sampling["batch_size"]),
            "base_seed": base_seed,
            "progress": False,
            **resume,
        }
        if partial is not None and len(partial.done) >= n_rows:
            # Every answer restored: nothing to generate, so no model and no hooks.
            samples = sample_prompts(None, None, prompt_rows, **settings)
        else:
            if not loaded:
                loaded.extend(load_model())
            model, tokenizer = loaded
            if arm.control == UNSTEERED:
                samples = sample_prompts(model, tokenizer, prompt_rows, **settings)
            else:
                with interventions(model, arm.intervention, dict(arm.by_layer), arm.strength):
                    samples = sample_prompts(model, tokenizer, prompt_rows, **settings)
            del model, tokenizer
        log.info("%s: %d answers", arm.name, samples.height)
        frames.append(samples.with_columns(**{k: pl.lit(v) for k, v in arm.columns().items()}))
    if not frames:
        return pl.DataFrame(schema={**SAMPLE_SCHEMA, **STEERING_ARM_SCHEMA})
    return pl.concat(frames).cast(dict(STEERING_ARM_SCHEMA))


def score_steered(
    samples: pl.DataFrame,
    *,
    judge_cfg: dict[str, Any],
    dispositions: list[dict[str, Any]],
    cache_dir: str | None,
    stats: dict[str, Any] | None = None,
    backend: Any = None,
) -> pl.DataFrame:
    """Judge steered answers (``steered_samples``) through ``judge.core.score_samples``, the function
    every other answer goes through (same judge, prompts, cache), and carry each answer's arm columns
    onto its score rows. One call for all arms: an answer two arms share is judged once."""
    from character_em.judge.core import score_samples

    missing = [column for column in (*SAMPLE_COLUMNS, *STEERING_ARM_SCHEMA) if column not in samples.columns]
    if missing:
        raise ValueError(f"steered answers lack the columns {missing}; rerun `steer`")
    scores = score_samples(
        samples.select(SAMPLE_COLUMNS),
        judge_cfg=judge_cfg,
        metrics_by_suite=None,
        dispositions=dispositions,
        cache_dir=cache_dir,
        stats=stats,
        backend=backend,
    )
    if samples.is_empty():
        return scores.with_columns(**{k: pl.lit(None, dtype) for k, dtype in STEERING_ARM_SCHEMA.items()})
    # score_samples keeps the sample order, one row per metric: every sample has its suite's metrics.
    per_sample, left = divmod(scores.height, samples.height)
    if left:
        raise ValueError(f"{scores.height} score rows for {samples.height} steered answers: not one set per answer")
    rows = np.repeat(np.arange(samples.height), per_sample)
    carried = samples.select("question_id", "sample_index", *STEERING_ARM_SCHEMA)[rows]
    if not carried.select("question_id", "sample_index").equals(scores.select("question_id", "sample_index")):
        raise ValueError("the judge returned score rows out of sample order; cannot attach the steering arms")
    return pl.concat([scores, carried.drop("question_id", "sample_index")], how="horizontal")


def score_steering_files(
    files: Sequence[tuple[str, str, str]],
    *,
    judge_cfg: dict[str, Any],
    dispositions: list[dict[str, Any]],
    cache_dir: str | None,
    log: Any = None,
) -> dict[str, Any]:
    """Judge every steering file of one model with ONE judge back-end (a model judge loads once for all
    of them, on its first request; a rerun whose verdicts are all cached loads nothing). ``files``:
    (answers, scores, summary) paths; each Scores file is what ``score_steered`` makes of its answers,
    written with its summary as soon as it is judged, so a killed job keeps the finished files and the
    cache. Returns the whole job's summary: each file's, and their totals."""
    from character_em.files import write_json_atomic, write_parquet_atomic
    from character_em.judge.core import JudgeFailureError, make_backend

    backend = make_backend(judge_cfg, dispositions)
    per_file: dict[str, Any] = {}
    try:
        for answers, scores_path, summary_path in files:
            stats: dict[str, Any] = {}
            try:
                scores = score_steered(
                    pl.read_parquet(answers),
                    judge_cfg=judge_cfg,
                    dispositions=dispositions,
                    cache_dir=cache_dir,
                    stats=stats,
                    backend=backend,
                )
            except JudgeFailureError:
                if log is not None:
                    log.error("%s: judge summary %s", answers, stats)
                raise
            write_parquet_atomic(scores, scores_path)
            write_json_atomic(summary_path, stats)
            per_file[answers] = stats
            if log is not None:
                log.info("%s: %d score rows, %s", answers, scores.height, stats)
    finally:
        close = getattr(backend, "close", None)
        if callable(close):
            close()
    totals = {
        key: sum(stats.get(key, 0) for stats in per_file.values())
        for key in ("rows", "unique_requests", "cache_hits", "judged", "failed")
    }
    return {"files": len(per_file), **totals, "per_file": per_file}


def steering_job(
    *,
    base_model: str,
    adapter_dir: str | None,
    adapter_file: str | None,
    directions_path: str,
    settings: Mapping[str, Any],
    identity: dict[str, Any],
    partial_folder: str | Path,
    revision: str | None = None,
) -> pl.DataFrame:
    """One steering job (rule ``steer``): the em prompts sampled under every arm of one arm set, the
    disposition ``settings["direction"]`` steered along its own direction or one control
    (``settings["control"]``, with ``settings["other"]`` the other disposition of the
    ``disposition`` control). Returns the steered Samples frame (``steered_samples``).

    settings: ``kind``, ``strengths``, ``direction``, ``control``, ``other``, ``random_seed``,
    ``layers``, ``suite_spec``, ``sampling`` (its ``batch_size`` the steering batch). Each arm's
    finished batches are kept under ``partial_folder``, fingerprinted with everything the answers
    depend on, so a killed job resumes arm by arm. ``revision``: the hub commit of a hub id ``base_model``.
    """
    from character_em.evals import suites
    from character_em.hashing import sha256_file
    from character_em.llm import loading as modeling
    from character_em.sampling.partial import PartialAnswers, answers_fingerprint

    stored = read_directions(directions_path)
    layer_sets = resolve_layers(settings["layers"], stored.layers, stored.chosen_layer)
    needed = sorted({layer for layer_set in layer_sets for layer in layer_set})
    direction, control = settings["direction"], settings["control"]
    vectors = control_vectors(
        stored, direction, control, needed, seed=int(settings["random_seed"]), other=settings.get("other")
    )
    vector = {OWN: direction, "disposition": settings.get("other")}.get(control, control)
    arms = plan_arms(
        kind=settings["kind"],
        direction=direction,
        control=control,
        vector=str(vector),
        vectors=vectors,
        layer_sets=layer_sets,
        strengths=settings["strengths"],
    )
    prompts = suites.build_prompts("em", settings["suite_spec"])
    adapter_sha256 = sha256_file(adapter_file) if adapter_file else None
    directions_sha256 = sha256_file(directions_path)

    def load() -> tuple[Any, Any]:
        model, tokenizer, info = modeling.load_model(
            base_model, quantization="none", adapter=adapter_dir, merge=True, revision=revision
        )
        log.info(
            "loaded %s: %s; %s %s (%s) at layers %s", base_model, info, settings["kind"], direction, control, layer_sets
        )
        return model, tokenizer

    def saved(arm: str) -> PartialAnswers:
        fingerprint = answers_fingerprint(
            settings,
            prompts,
            identity,
            f"{base_model}@{revision}" if revision else base_model,
            adapter_sha256,
            directions=directions_sha256,
            arm=arm,
        )
        return PartialAnswers(Path(partial_folder) / f"{arm}.jsonl", fingerprint)

    return steered_samples(
        load,
        prompts,
        arms=arms,
        identity=identity,
        sampling=settings["sampling"],
        base_seed=int(identity["seed"]),
        saved=saved,
    )
