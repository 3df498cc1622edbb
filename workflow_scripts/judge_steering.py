"""Every steering file of one model judged through one judge back-end (the judge, prompts and cache of
rule judge), each score row keeping its answer's steering arm."""

from character_em.directions import steering
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    summary = steering.score_steering_files(
        list(zip(snakemake.input.answers, snakemake.output.scores, snakemake.output.summaries, strict=True)),
        judge_cfg=read_param(snakemake.params.judge),
        dispositions=read_param(snakemake.params.dispositions),
        cache_dir=snakemake.params.cache_dir,
        log=log,
    )
    write_json_atomic(snakemake.output.job, summary)
