import polars as pl

from character_em.contracts import SAMPLE_KEY
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.labels import human_agreement_report, human_markdown
from character_em.report.stamps import judge_stamp

with job_log(snakemake.log[0]) as log:
    key = pl.read_parquet(snakemake.input.key)
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    samples = pl.concat([pl.scan_parquet(path).select(*SAMPLE_KEY, "answer") for path in snakemake.input.samples])
    table, items = human_agreement_report(
        key, snakemake.input.labels, scores, samples, thresholds=read_param(snakemake.params.thresholds)
    )
    # Which judge the humans are compared with: the one whose verdicts on these answers are on disk now.
    stamp = judge_stamp(scores.join(key.select(SAMPLE_KEY), on=list(SAMPLE_KEY), how="semi"))["text"]
    table.write_csv(snakemake.output.table)
    items.write_csv(snakemake.output.per_item)
    write_text_atomic(
        snakemake.output.table_md, human_markdown(table, sheet_id=key["sheet_id"][0], n_items=key.height, stamp=stamp)
    )
    log.info("judge against human labels:\n%s", table)
