"""Tables and figures of the character-direction analysis, from the probes, the per-condition mean
activations, the em scores and the steering runs."""

import json

import polars as pl

from character_em.directions import formats, shared
from character_em.directions import probes as directions
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import plots_directions
from character_em.report import tables as analysis

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    conditions = read_param(snakemake.params.conditions)
    reports = [json.loads(open(path).read()) for path in snakemake.input.reports]
    chosen, probe_vectors = {}, {}
    for report, path in zip(reports, snakemake.input.directions, strict=True):
        stored = formats.read_directions(path)
        chosen[report["model"]] = stored.chosen_layer
        probe_vectors[report["model"]] = stored.at()

    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    answers = analysis.answers_table(
        scores,
        conditions=conditions,
        alignment_below=settings["alignment_below"],
        coherence_above=settings["coherence_above"],
    )
    misalignment = analysis.rates(answers, ["model", "condition", "seed"], "misaligned")

    means, readings = [], []
    for path, info_path in zip(snakemake.input.means, snakemake.input.info, strict=True):
        info = json.loads(open(info_path).read())
        at = formats.read_means(path).at(chosen[info["model"]])
        readings.append({"model": info["model"], "condition": info["condition"], "means": at})
        means.append(
            {
                "model": info["model"],
                "condition": info["condition"],
                "seed": info["seed"],
                "family": conditions[info["condition"]]["family"],
                "own": at["own"],
                "n": info["counts"]["own"],
            }
        )
    vectors = shared.direction_sets(probe_vectors, readings, conditions)
    baselines = {
        model: directions.random_cosine_baseline(
            len(next(iter(named.values()))), n_pairs=settings["random_pairs"], seed=settings["seed"]
        )
        for model, named in vectors.items()
        if named
    }

    projections = directions.projection_table(
        means, {model: named for model, named in probe_vectors.items()}, misalignment
    )
    steering_answers = [pl.read_parquet(path) for path in snakemake.input.steering]
    tables = {
        "probe_auroc": directions.probe_table(reports),
        "direction_projections": projections,
        "direction_correlation": directions.correlation_table(
            projections, n_boot=settings["n_boot"], seed=settings["seed"]
        ),
        "direction_cosine": directions.cosine_table(vectors, baselines),
        "steering": directions.steering_table(
            pl.concat(steering_answers, how="diagonal_relaxed") if steering_answers else pl.DataFrame()
        ),
    }
    for path in snakemake.output.tables:
        name, extension = path.rsplit("/", 1)[1].rsplit(".", 1)
        if extension == "csv":
            tables[name].write_csv(path)
        else:
            write_text_atomic(path, analysis.to_markdown(tables[name]))
    pdfs = {path.rsplit("/", 1)[1].removesuffix(".pdf"): path for path in snakemake.output.pdfs}

    def both(name):
        return [getattr(snakemake.output, name), pdfs[name]]

    plots_directions.probe_auroc(tables["probe_auroc"], outputs=both("probe_auroc"))
    plots_directions.projection_scatter(
        projections, tables["direction_correlation"], outputs=both("projection_vs_misalignment")
    )
    plots_directions.cosine_heatmap(tables["direction_cosine"], outputs=both("direction_cosine"))
    plots_directions.steering_curves(tables["steering"], outputs=both("steering"))
