import json

from character_em.data.audit import judge_training_data
from character_em.files import iter_jsonl, write_json_atomic, write_parquet_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.core import JudgeFailureError

with job_log(snakemake.log[0]) as log:
    summary = {}
    try:
        scores = judge_training_data(
            [example for _, example in iter_jsonl(snakemake.input.data)],
            condition=snakemake.wildcards.trained,
            judge_cfg=read_param(snakemake.params.judge),
            dispositions=read_param(snakemake.params.dispositions),
            cache_dir=snakemake.params.cache_dir,
            stats=summary,
        )
    except JudgeFailureError:
        log.error("judge summary: %s", json.dumps(summary, indent=2, sort_keys=True))
        raise
    log.info("judge summary: %s", json.dumps(summary, sort_keys=True))
    write_parquet_atomic(scores, snakemake.output.scores)
    write_json_atomic(snakemake.output.summary, summary)
