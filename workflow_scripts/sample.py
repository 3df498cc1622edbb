from character_em import preflight
from character_em.evals import suites
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.sampling.wave import sample_wave

with job_log(snakemake.log[0]) as log:
    # Before any expensive work: the settings against the model's config.json (character_em.preflight).
    preflight.check_in_job(snakemake.config, snakemake.wildcards.model, log=log)
    specs = read_param(snakemake.params.suite_specs)
    # One engine answers every file of this model and seed (character_em.sampling.wave): the back-end is
    # chosen there, from the settings.
    record = sample_wave(
        snakemake.params.base_model,
        read_param(snakemake.params.files),
        {suite: suites.build_prompts(suite, spec) for suite, spec in specs.items()},
        model=snakemake.wildcards.model,
        seed=int(snakemake.wildcards.seed),
        settings=read_param(snakemake.params.sampling),
        logger=log,
        revision=snakemake.params.revision or None,
    )
    write_json_atomic(snakemake.output.record, record)
