# Named targets: `snakemake stage_sample` builds every samples file of the grid and what they need,
# `snakemake model_llama31-8b` every per-run file of one model. Each target is a list of files from the
# file-list functions of rules/common.smk (and rules/directions_common.smk), never a rule name, so a
# target keeps its meaning when the rules that make its files change. With `select` (docs/config.md)
# they build the selected part of the grid. docs/config.md lists them.


def trained_adapter_files():
    return adapter_files() + loss_curves()


# Stage -> the files that finish it, in DAG order. `snakemake tables` and `snakemake figures` (the
# rules) and `snakemake all` finish the grid.
STAGE_TARGETS = {
    "data": training_data_files,
    "train": trained_adapter_files,
    "sample": sample_files,
    "judge": score_files,
    "capabilities": capability_files,
    "trajectory": trajectory_outputs,
    "directions": probe_files,
}


def stage_files(stage):
    return STAGE_TARGETS[stage]()


def model_files(model):
    """Every file of one model's runs (adapters, samples, scores, capabilities; with the probes suite its
    probes, mean activations and steering): the files under results/{kind}/{model}/. The tables and
    figures combine every model: `snakemake tables figures`."""
    per_model = [
        *adapter_files(),
        *loss_curves(),
        *sample_files(),
        *score_files(),
        *capability_files(),
    ]
    if probe_files():
        per_model += [
            *expand("results/probes/{model}/probes.json", model=MODELS),
            *direction_means_files("npz"),
            *steering_files(),
        ]
    return [path for path in per_model if path.split("/")[2] == model]


for _stage in STAGE_TARGETS:

    rule:
        name:
            f"stage_{_stage}"
        input:
            stage_files(_stage),
        localrule: True


for _model in MODELS:

    rule:
        name:
            f"model_{_model}"
        input:
            model_files(_model),
        localrule: True
