# Errors before submission (character_em.preflight): the config against each model's own config.json
# (probe layers, max_seq_length, LoRA targets), the GPU resources of GPU back-ends, whether vLLM can be
# imported where the jobs that run it will run, and whether each model a GPU job loads fits its GPU
# (cluster.gpu_memory_gb). Included after every rule, so that the resources the profiles and
# --set-resources gave each rule, and each rule's conda environment, are known. A model whose
# config.json is not on disk yet (a hub model not downloaded) is checked by the first job that loads it,
# before the weights (workflow_scripts/train_adapter.py, sample.py).

import os

from snakemake.iocontainers import Wildcards
from snakemake.settings.types import DeploymentMethod

from character_em import preflight

_checked_rules = {rule for rule, _ in preflight.GPU_BACKENDS.values()} | set(
    preflight.MODEL_SECTIONS.values()
)
# Snakemake's Resource objects, with the profiles and --set-resources already applied.
_gpus = {
    name: getattr(rules, name).rule.resources.get("gpu").value
    for name in _checked_rules
    if hasattr(rules, name)
}


def _conda_env_of(rule):
    """The environment file a rule's jobs run in with --sdm conda, by model (a rule may pick its
    environment from the model's back-end, as rule sample does)."""

    def env_file(model):
        env = rule.conda_env
        if callable(env):
            env = env(Wildcards(fromdict={"model": model} if model else {}))
        if not isinstance(env, str):
            return None
        return os.path.normpath(
            os.path.join(rule.basedir.get_path_or_uri(secret_free=True), env)
        )

    return env_file


_conda_envs = (
    {
        name: _conda_env_of(getattr(rules, name).rule)
        for name in _checked_rules
        if hasattr(rules, name)
    }
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else None
)
_errors, _unchecked = preflight.check_all(CONFIG, _gpus, _conda_envs)
if _errors:
    raise WorkflowError(f"{CONFIG_SOURCE}: {preflight.format_errors(_errors)}")
