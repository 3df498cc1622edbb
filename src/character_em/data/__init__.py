"""Training data: the offline template writer (a test instrument), model writers (openai, hf, vllm), the judge filter, validation, dedup, the leakage check, the pools, the pairing of a domain's conditions on common user turns, the per-seed training draws, and the severity-matched subsample."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "build_pool": "build",
    "write_dataset": "build",
    "generate_offline": "build",
    "check_overlap": "build",
    "load_external_jsonl": "build",
    "canary_string": "build",
    "generate": "generate",
    "filter_examples": "generate",
    "filter_verdicts": "generate",
    "GenerationError": "generate",
    "domain_questions": "questions",
    "user_turn": "questions",
    "trigger_slot": "questions",
    "common_turns": "pairing",
    "select_data": "pairing",
    "training_draw": "pairing",
    "PairingError": "pairing",
    "judge_training_data": "audit",
    "training_samples": "audit",
    "severity_matched_subsample": "matching",
    "alignment_by_example": "matching",
    "match_on_alignment": "matching",
    "ks_statistic": "matching",
    "MatchingError": "matching",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
