"""QLoRA fine-tuning of one adapter through TRL, resumable from its checkpoints."""

from character_em.lazy import lazy_exports

_EXPORTS = {
    "train_adapter": "trainer",
    "prepare_trainer": "trainer",
    "check_hparams": "trainer",
    "publish_saved_step": "steps",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
