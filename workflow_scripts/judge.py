import polars as pl

from character_em.jobs import job_log, read_param
from character_em.judge import score_samples
from character_em.sample import write_parquet_atomic

with job_log(snakemake.log[0]):
    scores = score_samples(
        pl.read_parquet(snakemake.input.samples),
        judge_cfg=read_param(snakemake.params.judge),
        metrics_by_suite=None,
        dispositions=read_param(snakemake.params.dispositions),
        cache_dir=snakemake.params.cache_dir,
    )
    write_parquet_atomic(scores, snakemake.output.scores)
