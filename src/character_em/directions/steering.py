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
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

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


def arm_name(direction: str, layer_set: Sequence[int], strength: float) -> str:
    """A file-name-safe label of one steering arm: ``evil_L12-16_s2`` (strength ``-0.5`` -> ``s-0.5``)."""
    layers = "-".join(str(int(layer)) for layer in layer_set)
    return f"{direction}_L{layers}_s{float(strength):g}"


def steered_answers(
    load_model: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    prompt_rows: list[dict[str, Any]],
    *,
    kind: str,
    layers: Sequence[Sequence[int]],
    directions: Mapping[str, Mapping[int, np.ndarray]],
    strengths: Sequence[float],
    score: Callable[[pl.DataFrame], pl.DataFrame],
    label: Callable[[pl.DataFrame], pl.DataFrame],
    identity: dict[str, Any],
    sampling: Mapping[str, Any],
    base_seed: int,
    saved: Callable[[str], PartialAnswers] | None = None,
) -> pl.DataFrame:
    """Sample the prompts under each (disposition direction, layer set, strength), then judge them, one
    row per answer. ``directions[d][layer]`` is d's direction read at that layer; ``layers`` lists
    the layer sets (``resolve_layers``), each labelled in the ``layers`` column ("12" or "12,16,20").

    load_model: () -> (model, tokenizer), called once, and only if some arm has answers left to draw.
    Every arm is sampled before any is judged, and the steered model is released in between, so a
    model judge never shares the device with it.
    score: samples frame -> Scores frame (the configured judge). label: Scores frame -> answers table
    (``analysis.answers_table`` with the configured thresholds). Every strength reuses the same
    per-sample seeds, so curves compare the same random streams (paired across alpha).

    saved: arm name (``arm_name``) -> that arm's finished batches (``sampling.PartialAnswers``). A killed
    job then resumes every arm from its last saved batch; the judge's cache holds the finished verdicts.
    """
    from character_em.sampling.hf import expand_rows, sample_prompts

    n_rows = len(expand_rows(prompt_rows, identity, base_seed))
    loaded: list[Any] = []  # [model, tokenizer] once loaded
    arms = []
    for disposition, by_layer in directions.items():
        for layer_set in layers:
            label_layers = ",".join(str(layer) for layer in layer_set)
            for strength in strengths:
                partial = saved(arm_name(disposition, layer_set, strength)) if saved is not None else None
                resume: dict[str, Any] = {}
                if partial is not None:
                    resume = {"done": dict(partial.done), "on_batch": partial.add}
                    if partial.done:
                        log.info(
                            "%s x %g at layers %s: %d answers restored",
                            disposition,
                            strength,
                            label_layers,
                            len(partial.done),
                        )
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
                    with interventions(model, kind, {layer: by_layer[layer] for layer in layer_set}, float(strength)):
                        samples = sample_prompts(model, tokenizer, prompt_rows, **settings)
                    del model, tokenizer
                log.info(
                    "%s %s x %g at layers %s: %d answers", kind, disposition, strength, label_layers, samples.height
                )
                arms.append((disposition, label_layers, strength, samples))
    if loaded:
        loaded.clear()
        _release_accelerator_memory()

    frames = []
    for disposition, label_layers, strength, samples in arms:
        answers = label(score(samples))
        answers = answers.join(
            samples.select("question_id", "format", "sample_index", "answer"),
            on=["question_id", "format", "sample_index"],
            how="left",
        )
        column = f"disposition:{disposition}"
        # How strongly the steered answers express the steered trait (the judge's own metric).
        expression = pl.col(column) if column in answers.columns else pl.lit(None, pl.Float64)
        frames.append(
            answers.with_columns(
                intervention=pl.lit(kind),
                direction=pl.lit(disposition),
                strength=pl.lit(float(strength)),
                layers=pl.lit(label_layers),
                direction_expression=expression,
            )
        )
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def _release_accelerator_memory() -> None:
    """Return the steered model's GPU memory before the judge loads (a no-op on a CPU)."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
