import polars as pl

from character_em.files import write_text_atomic
from character_em.jobs import job_log
from character_em.judge.audit import audit_markdown, audit_table

with job_log(snakemake.log[0]):
    table = audit_table([pl.read_parquet(path) for path in snakemake.input.audits])
    write_text_atomic(snakemake.output.csv, table.write_csv())
    write_text_atomic(snakemake.output.md, audit_markdown(table, float(snakemake.params.fraction)))
