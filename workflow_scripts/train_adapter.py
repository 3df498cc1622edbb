from pathlib import Path

from character_em import preflight
from character_em.jobs import job_log, read_param
from character_em.train.trainer import train_adapter

with job_log(snakemake.log[0]) as log:
    # Before any expensive work: the settings against the model's config.json (character_em.preflight).
    preflight.check_in_job(snakemake.config, snakemake.wildcards.model, log=log)
    train_adapter(
        base_model=snakemake.params.base_model,
        data_path=snakemake.input.data,
        output_dir=str(Path(snakemake.output.adapter).parent),
        checkpoint_dir=snakemake.params.checkpoint_dir,
        hparams=read_param(snakemake.params.hparams),
        seed=int(snakemake.wildcards.seed),
        steps_dir=snakemake.params.steps_dir,
    )
