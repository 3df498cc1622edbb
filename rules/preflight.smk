# Errors before submission: the config against each model's own config.json (probe layers,
# max_seq_length, LoRA targets) and the GPU resources of GPU back-ends (character_em.preflight).
# Included after every rule, so that the resources the profiles and --set-resources gave each rule
# are known. A model whose config.json is not on disk yet (a hub model not downloaded) is checked by
# the first job that loads it, before the weights (workflow_scripts/train_adapter.py, sample.py).

from character_em import preflight

# Snakemake's Resource objects, with the profiles and --set-resources already applied.
_gpus = {
    name: getattr(rules, name).rule.resources.get("gpu").value
    for name in {rule for rule, _ in preflight.GPU_BACKENDS.values()}
    if hasattr(rules, name)
}
_errors, _unchecked = preflight.check_all(CONFIG, _gpus)
if _errors:
    raise WorkflowError(f"{CONFIG_SOURCE}: {preflight.format_errors(_errors)}")
