import json
from pathlib import Path

from character_em import preflight
from character_em.data.pairing import training_draw
from character_em.jobs import job_log, read_param
from character_em.train.trainer import train_adapter

with job_log(snakemake.log[0]) as log:
    # Before any expensive work: the settings against the model's config.json (character_em.preflight).
    preflight.check_in_job(snakemake.config, snakemake.wildcards.model, log=log)
    seed = int(snakemake.wildcards.seed)
    draw = training_draw(
        json.loads(Path(snakemake.input.manifest).read_text(encoding="utf-8")),
        seed=seed,
        **read_param(snakemake.params.draw),
    )
    log.info(
        "training on %d of the %d lines of %s (draw %d)",
        draw["n"],
        draw["n_lines"],
        snakemake.input.data,
        draw["draw_index"],
    )
    train_adapter(
        base_model=snakemake.params.base_model,
        data_path=snakemake.input.data,
        output_dir=str(Path(snakemake.output.adapter).parent),
        checkpoint_dir=snakemake.params.checkpoint_dir,
        hparams=read_param(snakemake.params.hparams),
        seed=seed,
        steps_dir=snakemake.params.steps_dir,
        selection=draw,
        revision=snakemake.params.revision or None,
    )
