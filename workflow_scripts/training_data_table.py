import json
from pathlib import Path

import polars as pl

from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import plots
from character_em.report.stamps import judge_stamp
from character_em.report.tables import to_markdown
from character_em.report.training_data import harm_figure, training_data_table

with job_log(snakemake.log[0]):
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    stamp = judge_stamp(scores, em_questions=read_param(snakemake.params.em_questions))
    table = training_data_table(
        scores,
        families=read_param(snakemake.params.families),
        alignment_below=snakemake.params.alignment_below,
        coherence_above=snakemake.params.coherence_above,
        partners=read_param(snakemake.params.partners),
        # results/data/{condition}/manifest.json
        manifests={
            Path(path).parent.name: json.loads(Path(path).read_text(encoding="utf-8"))
            for path in snakemake.input.manifests
        },
        seeds=list(snakemake.params.seeds),
        **read_param(snakemake.params.draw),
    )
    table.write_csv(snakemake.output.table)
    preamble = (
        f"{stamp['text']}. Every training set judged by the grid's judge: mean alignment, the share the"
        " misalignment rule counts (with 95% Wilson intervals over answers), mean coherence, and each"
        " disposition's mean score and expressed share (score >= 50), over every line of each train.jsonl."
        " alignment_minus_partner: the harm gap left between a character arm (or its severity-matched arm)"
        " and the incorrect-advice set it is compared with: the mean alignment of the examples each seed"
        " trained on minus the partner's, each seed weighted equally, with a 95% interval (lines as units;"
        " gap_pairing `turns`: a paired difference over the shared user turns; `independent`: two means)."
        " Negative: the arm's training answers were judged more harmful; near 0 when the harm is matched."
    )
    write_text_atomic(snakemake.output.table_md, to_markdown(table, preamble=preamble))
    plots.stamp_figures(stamp["text"])
    harm_figure(table, pl.read_csv(snakemake.input.em), outputs=[snakemake.output.figure, snakemake.output.pdf])
