"""The character direction: activations, the grouped probe protocol, the texts each reading reads
(identical text for input effects), fixed-text readings with their nulls, the shared structure of
directions from three sources, maps between model families, file formats, and steering (hooks, control
directions at matched norm, generation-only jobs, their judging)."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "stream_activations": "probes",
    "write_activations": "probes",
    "mean_activations": "probes",
    "load_layer": "probes",
    "probe_examples": "probes",
    "cosine_matrix": "probes",
    "steering_table": "probes",
    "probe_table": "probes",
    "judged_answers": "probes",
    "layer_hook": "steering",
    "resolve_layers": "steering",
    "control_vectors": "steering",
    "plan_arms": "steering",
    "steered_samples": "steering",
    "steering_job": "steering",
    "score_steered": "steering",
    "score_steering_files": "steering",
    "steering_arm_sets": "steering",
    "reading_texts": "texts",
    "reading_means": "texts",
    "question_means": "probes",
    "style_examples": "probes",
    "grouped_split": "protocol",
    "run_protocol": "protocol",
    "choose_layer": "protocol",
    "null_directions": "protocol",
    "projection_table": "readings",
    "correlation_table": "readings",
    "transfer_table": "readings",
    "cosine_null_table": "readings",
    "family_transfer_table": "families",
    "fit_linear_map": "families",
    "select_anchor_chats": "families",
    "anchor_activations": "families",
    "Anchors": "formats",
    "read_anchors": "formats",
    "write_anchors": "formats",
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
