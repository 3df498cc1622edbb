"""Sampling answers from base and fine-tuned models: one wave per model and seed (``wave``), answered by the
project's seeded decoding loop (hf) or one multi-LoRA vLLM engine."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "sample_prompts": "hf",
    "sampling_seed": "hf",
    "sample_prompts_vllm": "vllm_backend",
    "sample_wave_vllm": "vllm_backend",
    "sample_wave": "wave",
    "plan_wave": "wave",
    "PartialAnswers": "partial",
    "partial_path": "partial",
    "answers_fingerprint": "partial",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
