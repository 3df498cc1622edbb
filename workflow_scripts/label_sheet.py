import polars as pl

from character_em.contracts import SAMPLE_KEY
from character_em.files import write_json_atomic, write_parquet_atomic, write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.labels import build_sheet, metric_guide, sheet_csv, sheet_html, sheet_metrics

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.labels)
    thresholds = read_param(snakemake.params.thresholds)
    columns = [*SAMPLE_KEY, "metric", "score", "label", "judge_hash"]
    scores = pl.concat(
        [
            pl.read_parquet(path, columns=columns).with_columns(pl.lit(path).alias("path"))
            for path in snakemake.input.scores
        ]
    )
    # Only the drawn answers' text is read (build_sheet collects a semi-join of this lazy frame).
    samples = pl.concat(
        [pl.scan_parquet(path).select(*SAMPLE_KEY, "question", "answer") for path in snakemake.input.samples]
    )
    families = {name: spec["family"] for name, spec in read_param(snakemake.params.conditions).items()}
    key, manifest = build_sheet(
        scores, samples, families=families, thresholds=thresholds, size=settings["sheet_size"], seed=settings["seed"]
    )
    guide = metric_guide(sheet_metrics(key), read_param(snakemake.params.dispositions), thresholds)
    write_parquet_atomic(key, snakemake.output.key)
    write_text_atomic(snakemake.output.html, sheet_html(key, guide))
    write_text_atomic(snakemake.output.csv, sheet_csv(key))
    write_json_atomic(snakemake.output.manifest, manifest)
    log.info(
        "sheet %s: %d items from %d judged answers", manifest["sheet_id"], manifest["n_items"], manifest["n_answers"]
    )
