"""Evaluation suites: the prompt sets of em, transfer, trigger and persona, and multiple-choice capabilities (own scorer or lm-evaluation-harness)."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "build_prompts": "suites",
    "evaluate_multiple_choice": "capabilities",
    "load_mc_items": "capabilities",
    "format_mc_prompt": "capabilities",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
