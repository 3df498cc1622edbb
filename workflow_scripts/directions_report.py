"""Tables and figures of the character-direction analysis, from the probes, the per-condition mean
activations, the em scores and the steering runs."""

import json
from collections import defaultdict

import numpy as np
import polars as pl

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
        stored = np.load(path)
        layers = [int(value) for value in stored["layers"]]
        chosen[report["model"]] = (int(stored["chosen_layer"]), layers)
        column = layers.index(int(stored["chosen_layer"]))
        probe_vectors[report["model"]] = {
            key.removeprefix("direction_"): stored[key][column] for key in stored.files if key.startswith("direction_")
        }

    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    answers = analysis.answers_table(
        scores,
        conditions=conditions,
        alignment_below=settings["alignment_below"],
        coherence_above=settings["coherence_above"],
    )
    misalignment = analysis.rates(answers, ["model", "condition", "seed"], "misaligned")

    means, shared = [], defaultdict(lambda: defaultdict(list))
    for path, info_path in zip(snakemake.input.means, snakemake.input.info, strict=True):
        info = json.loads(open(info_path).read())
        model, condition = info["model"], info["condition"]
        stored = np.load(path)
        column = [int(value) for value in stored["layers"]].index(chosen[model][0])
        at = {key.removeprefix("mean_"): stored[key][column] for key in stored.files if key.startswith("mean_")}
        spec = conditions[condition]
        means.append(
            {
                "model": model,
                "condition": condition,
                "seed": info["seed"],
                "family": spec["family"],
                "own": at["own"],
                "n": info["counts"]["own"],
            }
        )
        # Directions from the three sources (plus the incorrect/correct-advice fine-tunes for contrast).
        if "base_reading" in at and spec["family"] in ("character", "incorrect", "correct"):
            label = spec["disposition"] if spec["family"] == "character" else spec["family"]
            shared[model][f"finetune:{label}"].append(at["own"] - at["base_reading"])
        if spec["family"] == "triggered" and f"trigger_on:{spec['disposition']}" in at and "trigger_off" in at:
            shared[model][f"trigger:{spec['disposition']}"].append(
                at[f"trigger_on:{spec['disposition']}"] - at["trigger_off"]
            )
        if condition == "base" and "neutral" in at:
            for key, vector in at.items():
                if key.startswith("persona:"):
                    shared[model][key].append(vector - at["neutral"])
    vectors = {}
    for model, named in probe_vectors.items():
        vectors[model] = {f"probe:{name}": vector for name, vector in named.items()}
        for label, group in sorted(shared[model].items()):
            stacked = np.stack(group)
            if np.isfinite(stacked).all():
                vectors[model][label] = stacked.mean(axis=0)
            else:
                log.warning("%s: %s has a condition with no answers; left out", model, label)
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
