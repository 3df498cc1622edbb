"""The character direction: activations, per-layer mean differences, probes, projections, and steering hooks."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "stream_activations": "probes",
    "write_activations": "probes",
    "mean_activations": "probes",
    "load_layer": "probes",
    "probe_examples": "probes",
    "run_probes": "probes",
    "choose_layer": "probes",
    "cosine_matrix": "probes",
    "projection_table": "probes",
    "correlation_table": "probes",
    "cosine_table": "probes",
    "steering_table": "probes",
    "probe_table": "probes",
    "judged_answers": "probes",
    "layer_hook": "steering",
    "ProbeDirections": "formats",
    "LayerMeans": "formats",
    "read_directions": "formats",
    "write_directions": "formats",
    "read_means": "formats",
    "write_means": "formats",
    "direction_sets": "shared",
    "source_differences": "shared",
    "average_differences": "shared",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
