# character-em: character as a latent variable behind emergent misalignment.
# This file is a table of contents; rules/common.smk reads and checks the config.


from snakemake.utils import min_version

min_version("9.14.1")


# A --configfile (e.g. presets/smoke.yaml) is a complete config and replaces this one, so a
# preset never inherits the paper grid's models by dictionary merging.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/fetch.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/sample.smk"
include: "rules/judge.smk"
include: "rules/calibration.smk"
include: "rules/labels.smk"
include: "rules/evals.smk"
include: "rules/trajectory.smk"
include: "rules/directions.smk"
include: "rules/report.smk"
include: "rules/training_data.smk"
include: "rules/estimate.smk"
include: "rules/preflight.smk"


# Human labels: the sheet is drawn until labels/ holds labels for it, then never again.
if not LABEL_FILES:

    include: "rules/label_sheet.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),


# Named targets per stage and per model (snakemake stage_sample, snakemake model_llama31-8b).
include: "rules/targets.smk"
