import json

from character_em.jobs import job_log, read_param
from character_em.judge.core import JudgeFailureError, WaveFile, score_wave

with job_log(snakemake.log[0]) as log:
    files = [
        WaveFile(samples, scores, summary)
        for samples, scores, summary in zip(
            snakemake.input.samples,
            snakemake.output.scores,
            snakemake.output.summaries,
            strict=True,
        )
    ]
    try:
        summary = score_wave(
            files,
            judge_cfg=read_param(snakemake.params.judge),
            dispositions=read_param(snakemake.params.dispositions),
            cache_dir=snakemake.params.cache_dir,
            wave_summary=snakemake.output.wave,
            audit=snakemake.output.audit,
            audit_fraction=float(snakemake.params.audit_fraction),
        )
    except JudgeFailureError as err:
        # Snakemake deletes a failed job's outputs, so the summary goes to the log, which it keeps.
        log.error("judge summary: %s", json.dumps(err.summary, indent=2, sort_keys=True))
        raise
    log.info("judge summary: %s", json.dumps(summary, sort_keys=True))
