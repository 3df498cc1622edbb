"""Tables, statistics, figures and the GPU-hour estimate."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "rate_bars": "plots",
    "transfer_heatmap": "plots",
    "threshold_lines": "plots",
    "answers_table": "tables",
    "em_tables": "tables",
    "transfer_table": "tables",
    "trigger_table": "tables",
    "persona_table": "tables",
    "capability_table": "tables",
    "to_markdown": "tables",
    "judge_stamp": "stamps",
    "judge_swap_table": "judge_swap",
    "sampling_stamp": "stamps",
    "training_data_table": "training_data",
    "harm_figure": "training_data",
    "MixedJudgeError": "stamps",
    "load_trajectory": "trajectory",
    "trajectory_tables": "trajectory",
    "emergence_table": "trajectory",
    "plot_trajectory": "trajectory",
    # wilson_interval lives in character_em.stats; tables re-exports it (there is no report.stats).
    "wilson_interval": "tables",
    "hierarchical_rates": "tables",
    "claims_table": "tables",
    "denominators_table": "tables",
    "Grid": "hierarchical",
    "bootstrap_rate": "hierarchical",
    "bootstrap_contrast": "hierarchical",
    "bootstrap_statistic": "hierarchical",
    "holm": "hierarchical",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
