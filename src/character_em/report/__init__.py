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
    "wilson_interval": "stats",
    "clustered_bootstrap_difference": "stats",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
