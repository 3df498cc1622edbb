"""Steered answers judged through the judge function every other answer goes through (same judge,
prompts and cache as rule judge), each score row keeping its answer's steering arm."""

import json

import polars as pl

from character_em.directions import steering
from character_em.files import write_json_atomic, write_parquet_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.core import JudgeFailureError

with job_log(snakemake.log[0]) as log:
    summary = {}
    try:
        scores = steering.score_steered(
            pl.read_parquet(snakemake.input.answers),
            judge_cfg=read_param(snakemake.params.judge),
            dispositions=read_param(snakemake.params.dispositions),
            cache_dir=snakemake.params.cache_dir,
            stats=summary,
        )
    except JudgeFailureError:
        # Snakemake deletes a failed job's outputs, so the summary goes to the log, which it keeps.
        log.error("judge summary: %s", json.dumps(summary, indent=2, sort_keys=True))
        raise
    log.info("judge summary: %s", json.dumps(summary, sort_keys=True))
    write_parquet_atomic(scores, snakemake.output.scores)
    write_json_atomic(snakemake.output.summary, summary)
