"""Judging answers: prompts, judge hashes, the cache in front of every back-end (rubric test instrument, openai, hf, vllm), one judge job per wave, the exact audit of first-token verdicts, calibration, the judge gate, human labels and the second judge on the grid's answers, and per-job settings."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "score_samples": "core",
    "score_wave": "core",
    "WaveFile": "core",
    "audit_table": "audit",
    "audit_markdown": "audit",
    "make_backend": "core",
    "judge_hash": "core",
    "judge_identity": "core",
    "metric_template": "core",
    "judge_prompts": "core",
    "JudgePrompt": "core",
    "build_judge_prompt": "core",
    "JudgeCache": "core",
    "JudgeResult": "verdicts",
    "JudgeRequest": "verdicts",
    "JudgeFailureError": "verdicts",
    "JudgeConfigError": "verdicts",
    "RubricJudge": "core",
    "load_calibration_set": "calibration",
    "calibration_report": "calibration",
    "calibration_metrics": "calibration",
    "calibration_markdown": "calibration",
    "draw_answers": "agreement",
    "score_drawn": "agreement",
    "grid_agreement": "agreement",
    "judge_gate": "calibration",
    "build_sheet": "labels",
    "read_labels": "labels",
    "human_agreement_report": "labels",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
