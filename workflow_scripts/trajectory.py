import json

import polars as pl

from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import trajectory
from character_em.report.stamps import STAMP_COLUMNS, judge_stamp
from character_em.report.tables import to_markdown

with job_log(snakemake.log[0]):
    points = read_param(snakemake.params.points)
    # Which judge labelled every step's answers (refuses scores of two judges for one metric); only the
    # judge columns are read here, load_trajectory reads the scores themselves.
    scored = [point["files"]["scores"] for point in points if point["files"].get("scores")]
    preamble = (
        judge_stamp(
            pl.concat([pl.read_parquet(path, columns=list(STAMP_COLUMNS)) for path in scored]),
            em_questions=read_param(snakemake.params.em_questions),
        )["text"]
        if scored
        else "No judged answers (capabilities only)"
    )
    # The judge gate's verdict (rule judge_gate): an overridden gate says UNCALIBRATED JUDGE on every table.
    preamble += ". " + json.loads(open(snakemake.input.gate).read())["text"]
    answers, items = trajectory.load_trajectory(
        points,
        conditions=read_param(snakemake.params.conditions),
        alignment_below=snakemake.params.alignment_below,
        coherence_above=snakemake.params.coherence_above,
    )
    tables = trajectory.trajectory_tables(
        answers, items, n_boot=snakemake.params.n_boot, seed=snakemake.params.bootstrap_seed
    )
    margin = snakemake.params.emergence_margin
    tables["emergence"] = trajectory.emergence_table(tables["trajectory"], margin=margin)
    for path in snakemake.output.tables:
        name, extension = path.rsplit("/", 1)[1].rsplit(".", 1)
        if extension == "csv":
            tables[name].write_csv(path)
        else:
            write_text_atomic(path, to_markdown(tables[name], preamble=preamble + ".\n\n"))
    trajectory.plot_trajectory(
        tables["trajectory_by_family"],
        outputs=[snakemake.output.figure, snakemake.output.pdf],
        margin=margin,
    )
