import json

import polars as pl

from character_em import analysis
from character_em.jobs import job_log, read_param, write_text_atomic

with job_log(snakemake.log[0]):
    families = read_param(snakemake.params.families)
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    tables = analysis.misalignment_tables(
        scores,
        families=families,
        alignment_below=snakemake.params.alignment_below,
        coherence_above=snakemake.params.coherence_above,
    )
    pooled = tables["pooled"]
    pooled.write_csv(snakemake.output.misalignment)
    write_text_atomic(snakemake.output.misalignment_md, analysis.to_markdown(pooled))
    capability_rows = [json.loads(open(path).read()) for path in snakemake.input.capabilities]
    analysis.capability_table(capability_rows, families=families).write_csv(snakemake.output.capabilities)
