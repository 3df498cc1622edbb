import json

import polars as pl

from character_em.files import write_json_atomic, write_parquet_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.agreement import draw_answers, score_drawn
from character_em.judge.core import JudgeFailureError

with job_log(snakemake.log[0]) as log:
    per_cell = int(snakemake.params.per_cell)
    # Drawn file by file (a file is a cell): the wave's whole answers need not sit in memory at once.
    samples = pl.concat(
        [draw_answers(pl.read_parquet(path), per_cell) for path in snakemake.input.samples], how="diagonal_relaxed"
    )
    summary = {}
    try:
        scores = score_drawn(
            samples,
            per_cell=per_cell,
            judge_cfg=read_param(snakemake.params.judge),
            dispositions=read_param(snakemake.params.dispositions),
            cache_dir=snakemake.params.cache_dir,
            stats=summary,
        )
    except JudgeFailureError:
        # Snakemake deletes a failed job's outputs, so the summary goes to the log, which it keeps.
        log.error("second judge summary: %s", json.dumps(summary, indent=2, sort_keys=True))
        raise
    log.info("second judge summary: %s", json.dumps(summary, sort_keys=True))
    write_parquet_atomic(scores, snakemake.output.scores)
    write_json_atomic(snakemake.output.summary, summary)
