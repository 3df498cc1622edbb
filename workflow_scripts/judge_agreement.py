import polars as pl

from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.calibration import calibration_markdown, grid_agreement

with job_log(snakemake.log[0]) as log:
    samples = pl.concat([pl.read_parquet(path) for path in snakemake.input.samples], how="diagonal_relaxed")
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    table, items = grid_agreement(
        samples,
        scores,
        judge_cfg=read_param(snakemake.params.judge),
        dispositions=read_param(snakemake.params.dispositions),
        cache_dir=snakemake.params.cache_dir,
        thresholds=read_param(snakemake.params.thresholds),
        max_answers=int(snakemake.params.max_answers),
    )
    write_text_atomic(snakemake.output.table, table.write_csv())
    write_text_atomic(snakemake.output.per_item, items.write_csv())
    n = items["id"].n_unique() if items.height else 0
    markdown = calibration_markdown(table, n_items=n).replace(
        "# Judge calibration", "# Judge agreement on the grid's own answers", 1
    )
    markdown = markdown.replace(
        f"{n} hand-labelled answers (resources/calibration/judge_calibration.yaml).",
        f"{n} of the grid's em answers (a seeded draw, judge.agreement_max_answers), scored by both judges.",
        1,
    )
    write_text_atomic(snakemake.output.table_md, markdown)
    log.info("judge agreement on grid answers:\n%s", table)
