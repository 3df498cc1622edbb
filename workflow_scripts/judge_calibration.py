from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.calibration import calibration_markdown, calibration_report, load_calibration_set

with job_log(snakemake.log[0]) as log:
    calibration = load_calibration_set(snakemake.input.calibration)
    table, items = calibration_report(
        calibration,
        [tuple(judge) for judge in read_param(snakemake.params.judges)],
        dispositions=read_param(snakemake.params.dispositions),
        cache_dir=snakemake.params.cache_dir,
        thresholds=read_param(snakemake.params.thresholds),
    )
    write_text_atomic(snakemake.output.table, table.write_csv())
    write_text_atomic(snakemake.output.per_item, items.write_csv())
    write_text_atomic(snakemake.output.table_md, calibration_markdown(table, n_items=len(calibration["items"])))
    log.info("judge calibration:\n%s", table)
