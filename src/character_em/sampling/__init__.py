"""Sampling answers from base and fine-tuned models: the project's seeded decoding loop (hf) and vLLM."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "sample_prompts": "hf",
    "sampling_seed": "hf",
    "sample_prompts_vllm": "vllm_backend",
    "PartialAnswers": "partial",
    "partial_path": "partial",
    "answers_fingerprint": "partial",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
