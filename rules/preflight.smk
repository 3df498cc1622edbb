# Errors before submission: the config against each model's own config.json (probe layers,
# max_seq_length, LoRA targets) and the GPU resources of GPU back-ends (character_em.preflight).
# Included after every rule, so that the resources the profiles and --set-resources gave each rule
# are known. A tiny test model not built yet is checked against the config.json its build will write
# (llm.tiny.planned_config); a hub model, against its config.json in the Hugging Face cache (filled by
# `snakemake prefetch_models`). One whose config.json is nowhere yet is checked by the first job that
# loads it, before the weights (workflow_scripts/train_adapter.py, sample.py).

from character_em import preflight
from character_em.llm import tiny

# Snakemake's Resource objects, with the profiles and --set-resources already applied.
_gpus = {
    name: getattr(rules, name).rule.resources.get("gpu").value
    for name in {rule for rule, _ in preflight.GPU_BACKENDS.values()}
    if hasattr(rules, name)
}
_planned = {
    model: tiny.planned_config()
    for model, spec in CONFIG["models"].items()
    if (spec["build"] or "").startswith("tiny-")
}
_errors, _unchecked = preflight.check_all(CONFIG, _gpus, planned=_planned)
if _errors:
    raise WorkflowError(f"{CONFIG_SOURCE}: {preflight.format_errors(_errors)}")
