"""Tables and figures of the character-direction analysis, from the probes, the per-question mean
activations, the em scores and the judged steering runs (computations in character_em.directions),
and claim 4's rows for claims.csv (character_em.report.direction_claims)."""

import json

import polars as pl

from character_em.directions import families, formats, readings, shared
from character_em.directions import probes as directions
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import direction_claims, plots_directions
from character_em.report import tables as analysis
from character_em.report.stamps import judge_stamp

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    conditions = read_param(snakemake.params.conditions)
    reports = [json.loads(open(path).read()) for path in snakemake.input.reports]
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    # Which judge labelled the answers these tables read (refuses scores of two judges for one metric).
    preamble = judge_stamp(scores, em_questions=read_param(snakemake.params.em_questions))["text"] + ".\n\n"
    answers = analysis.answers_table(
        scores,
        conditions=conditions,
        alignment_below=settings["alignment_below"],
        coherence_above=settings["coherence_above"],
    )
    misalignment = analysis.rates(answers, ["model", "condition", "seed"], "misaligned")

    records = []
    for path, info_path in zip(snakemake.input.means, snakemake.input.info, strict=True):
        info = json.loads(open(info_path).read())
        spec = conditions[info["condition"]]
        records.append(
            {
                "model": info["model"],
                "condition": info["condition"],
                "seed": info["seed"],
                "family": spec["family"],
                "spec": spec,
                "means": formats.read_means(path),
            }
        )
    probes, vectors, nulls, baselines = {}, {}, {}, {}
    for report, path in zip(reports, snakemake.input.directions, strict=True):
        model = report["model"]
        stored = formats.read_directions(path)
        column = stored.layers.index(stored.chosen_layer)
        at = stored.at()
        hidden = len(next(iter(at.values())))
        baselines[model] = directions.random_cosine_baseline(
            hidden, n_pairs=settings["random_pairs"], seed=settings["seed"]
        )
        probes[model] = {
            "directions": at,
            "nulls": {name: stored.extra[f"null_{name}"] for name in at},
            "style": stored.extra["style"][column],
            "fit_questions": set(report["fit_questions"]),
            "isotropic_cos_p95": baselines[model]["p95_abs_cos"],
            "layer": stored.chosen_layer,
        }
        of_model = [r for r in records if r["model"] == model]
        vectors[model] = shared.direction_sets(
            {model: at},
            [{"model": model, "condition": r["condition"], "means": r["means"].pooled()} for r in of_model],
            conditions,
        )[model] | {"control:style": probes[model]["style"]}
        nulls[model] = {f"probe:{name}": value for name, value in probes[model]["nulls"].items()}
        for label, parts in readings.source_question_differences(of_model, model).items():
            nulls[model][label] = readings.sign_flip_nulls(parts, n_null=settings["n_null"], seed=settings["seed"])
    log.info("models %s; %d condition readings", sorted(probes), len(records))
    anchors = {
        report["model"]: formats.read_anchors(path)
        for report, path in zip(reports, snakemake.input.anchors, strict=True)
    }

    projections = readings.projection_table(
        records, probes, misalignment, n_boot=settings["n_boot"], seed=settings["seed"]
    )
    steering_scores = [pl.read_parquet(path) for path in snakemake.input.steering]
    steered = direction_claims.steered_answers(
        pl.concat(steering_scores, how="diagonal_relaxed") if steering_scores else pl.DataFrame(),
        conditions=conditions,
        alignment_below=settings["alignment_below"],
        coherence_above=settings["coherence_above"],
        expressed_at_least=settings["expressed_at_least"],
    )
    tables = {
        "probe_auroc": directions.probe_table(reports),
        "direction_projections": projections,
        "direction_correlation": readings.correlation_table(
            projections, n_boot=settings["n_boot"], seed=settings["seed"]
        ),
        "direction_cosine": readings.cosine_null_table(vectors, nulls, baselines),
        # Each model's own probes, then (where the grid has more than one model family) every other
        # family's probes mapped in through the shared anchor texts.
        "direction_transfer": pl.concat(
            [
                readings.transfer_table(records, reports, probes, n_boot=settings["n_boot"], seed=settings["seed"]),
                families.family_transfer_table(
                    records, probes, anchors, n_boot=settings["n_boot"], seed=settings["seed"]
                ),
            ]
        ),
        "steering": directions.steering_table(steered),
        # Claim 4's rows, in the claims table's columns; the tables rule puts them in claims.csv.
        "direction_claims": direction_claims.direction_claims_table(
            projections=projections,
            misalignment=misalignment,
            records=records,
            probes=probes,
            steered=steered,
            n_boot=settings["n_boot"],
            seed=settings["seed"],
        ),
    }
    for path in snakemake.output.tables:
        name, extension = path.rsplit("/", 1)[1].rsplit(".", 1)
        if extension == "csv":
            tables[name].write_csv(path)
        else:
            write_text_atomic(path, analysis.to_markdown(tables[name], preamble=preamble))
    pdfs = {path.rsplit("/", 1)[1].removesuffix(".pdf"): path for path in snakemake.output.pdfs}

    def both(name):
        return [getattr(snakemake.output, name), pdfs[name]]

    plots_directions.probe_auroc(tables["probe_auroc"], outputs=both("probe_auroc"))
    plots_directions.projection_scatter(
        projections, tables["direction_correlation"], outputs=both("projection_vs_misalignment")
    )
    plots_directions.cosine_heatmap(tables["direction_cosine"], outputs=both("direction_cosine"))
    plots_directions.transfer_matrix(tables["direction_transfer"], outputs=both("direction_transfer"))
    plots_directions.steering_curves(tables["steering"], outputs=both("steering"))
