"""One steering job: the em prompts sampled under one arm set (a disposition's own direction, or one
of its controls at matched norm) at every strength and layer set, added to the base model or
projected out of a character condition's model. Generation only: rule judge_steering scores the file."""

from character_em.contracts import samples_metadata
from character_em.directions import steering
from character_em.files import write_parquet_atomic
from character_em.jobs import job_log, read_param
from character_em.sampling.partial import partial_path

with job_log(snakemake.log[0]):
    adapter = list(snakemake.input.adapter)
    answers = steering.steering_job(
        base_model=snakemake.params.base_model,
        adapter_dir=snakemake.params.adapter_dir or None,
        adapter_file=adapter[0] if adapter else None,
        directions_path=snakemake.input.directions,
        settings=read_param(snakemake.params.settings),
        identity={
            "model": snakemake.wildcards.model,
            "condition": snakemake.wildcards.condition,
            "seed": int(snakemake.wildcards.seed),
        },
        # Outside the declared output (which Snakemake deletes before a rerun): a job killed at its
        # time limit resumes arm by arm.
        partial_folder=partial_path(snakemake.output.answers).with_suffix(""),
        revision=snakemake.params.revision or None,
    )
    # Steering hooks the transformers forward pass, so its answers always come from the hf sampler.
    write_parquet_atomic(answers, snakemake.output.answers, metadata=samples_metadata("hf"))
