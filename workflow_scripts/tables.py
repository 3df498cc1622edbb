import json

import polars as pl

from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import tables as analysis

with job_log(snakemake.log[0]):
    conditions = read_param(snakemake.params.conditions)
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    answers = analysis.answers_table(
        scores,
        conditions=conditions,
        alignment_below=snakemake.params.alignment_below,
        coherence_above=snakemake.params.coherence_above,
    )
    em = analysis.em_tables(answers)
    tables = {
        "em": em["pooled"],
        "em_by_seed": em["by_seed"],
        "em_by_family": em["by_family"],
        "em_by_question": em["by_question"],
        "transfer": analysis.transfer_table(answers),
        "trigger": analysis.trigger_table(answers),
        "persona": analysis.persona_table(answers),
        "contrasts": analysis.contrasts(answers, conditions),
        "trigger_specificity": analysis.trigger_specificity(answers, conditions),
        "threshold_sensitivity": analysis.threshold_sensitivity(answers),
        "capabilities": analysis.capability_table(
            [json.loads(open(path).read()) for path in snakemake.input.capabilities],
            families={name: spec["family"] for name, spec in conditions.items()},
        ),
    }
    for path in snakemake.output:
        name, extension = path.rsplit("/", 1)[1].rsplit(".", 1)
        if extension == "csv":
            tables[name].write_csv(path)
        else:
            write_text_atomic(path, analysis.to_markdown(tables[name]))
