import polars as pl

from character_em.contracts import SAMPLE_KEY
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.agreement import grid_agreement
from character_em.judge.calibration import calibration_markdown
from character_em.report.judge_swap import judge_swap_markdown, judge_swap_table

with job_log(snakemake.log[0]) as log:
    second = pl.concat([pl.read_parquet(path) for path in snakemake.input.second], how="diagonal_relaxed")
    # Only the answers the second judge scored, file by file: the grid's whole Scores need not fit in memory.
    drawn = second.select(*SAMPLE_KEY, "metric").unique()
    primary = pl.concat(
        [pl.read_parquet(path).join(drawn, on=[*SAMPLE_KEY, "metric"], how="semi") for path in snakemake.input.scores],
        how="diagonal_relaxed",
    )
    settings = read_param(snakemake.params.report)
    thresholds = read_param(snakemake.params.thresholds)
    table, items = grid_agreement(primary, second, thresholds=thresholds)
    write_text_atomic(snakemake.output.table, table.write_csv())
    write_text_atomic(snakemake.output.per_item, items.write_csv())
    n = items["id"].n_unique() if items.height else 0
    markdown = calibration_markdown(table, n_items=n).replace(
        "# Judge calibration", "# Judge agreement on the grid's own answers", 1
    )
    markdown = markdown.replace(
        f"{n} hand-labelled answers (resources/calibration/judge_calibration.yaml).",
        f"{n} of the grid's answers (judge.agreement_answers_per_cell of every cell), scored by both judges.",
        1,
    )
    write_text_atomic(snakemake.output.table_md, markdown)
    answers = drawn.select(SAMPLE_KEY).unique()
    finish = pl.concat(
        [
            pl.read_parquet(path, columns=[*SAMPLE_KEY, "finish_reason"]).join(answers, on=list(SAMPLE_KEY), how="semi")
            for path in snakemake.input.samples
        ],
        how="diagonal_relaxed",
    )
    swap = judge_swap_table(
        primary,
        second,
        conditions=read_param(snakemake.params.conditions),
        alignment_below=thresholds["alignment"],
        coherence_above=thresholds["coherence"],
        finish=finish,
        truncated=settings["truncated"],
        n_boot=settings["n_boot"],
        seed=settings["bootstrap_seed"],
    )
    write_text_atomic(snakemake.output.swap, swap.write_csv())
    write_text_atomic(
        snakemake.output.swap_md,
        judge_swap_markdown(
            swap, primary, second, em_questions=read_param(snakemake.params.em_questions), n_boot=settings["n_boot"]
        ),
    )
    log.info("judge agreement on grid answers:\n%s\njudge swap:\n%s", table, swap)
