import json

import polars as pl

from character_em.contracts import SAMPLE_KEY, read_sampling_backend
from character_em.files import write_json_atomic, write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import tables as analysis
from character_em.report.stamps import judge_stamp, sampling_stamp

with job_log(snakemake.log[0]):
    conditions = read_param(snakemake.params.conditions)
    settings = read_param(snakemake.params.report)
    boot = {"n_boot": settings["n_boot"], "seed": settings["bootstrap_seed"]}
    scores = pl.concat([pl.read_parquet(path) for path in snakemake.input.scores], how="diagonal_relaxed")
    # Which judge made these numbers; refuses scores of two judges for one metric before any table exists.
    stamp = judge_stamp(scores, em_questions=read_param(snakemake.params.em_questions))
    # The judge gate's verdict (rule judge_gate): passed, exempt, disabled or overridden, stamped on every table.
    gate = json.loads(open(snakemake.input.gate).read())
    # Only the key and finish_reason: the answers' text stays on disk.
    finish_parts = [pl.read_parquet(path, columns=[*SAMPLE_KEY, "finish_reason"]) for path in snakemake.input.samples]
    # One sampling engine per model: a comparison never pairs two engines' random streams.
    backends: dict[str, dict[str, str | None]] = {}
    for path, part in zip(snakemake.input.samples, finish_parts):
        for model in part["model"].unique().to_list():
            backends.setdefault(model, {})[path] = read_sampling_backend(path)
    sampling = sampling_stamp(backends)
    # The figures print the stamp's text: an overridden gate is named there too.
    figure_line = stamp["text"] + (
        " · UNCALIBRATED JUDGE (judge gate overridden)" if gate["status"] == "overridden" else ""
    )
    write_json_atomic(snakemake.output.stamp, {**stamp, "text": figure_line, "gate": gate, "sampling": sampling})
    finish = pl.concat(finish_parts, how="diagonal_relaxed")
    answers = analysis.answers_table(
        scores,
        conditions=conditions,
        alignment_below=snakemake.params.alignment_below,
        coherence_above=snakemake.params.coherence_above,
        finish=finish,
        truncated=settings["truncated"],
    )
    capability_results = [json.loads(open(path).read()) for path in snakemake.input.capabilities]
    claim4 = [analysis.read_direction_claims(path) for path in snakemake.input.direction_claims]
    direction_claims = pl.concat(claim4, how="diagonal_relaxed") if claim4 else None
    em = analysis.em_tables(answers, **boot)
    tables = {
        "em": em["pooled"],
        "em_by_seed": em["by_seed"],
        "em_by_family": em["by_family"],
        "em_by_question": em["by_question"],
        "transfer": analysis.transfer_table(answers, **boot),
        "trigger": analysis.trigger_table(answers, **boot),
        "persona": analysis.persona_table(answers, **boot),
        "contrasts": analysis.contrasts(answers, conditions, **boot),
        "trigger_specificity": analysis.trigger_specificity(answers, conditions, **boot),
        "threshold_sensitivity": analysis.threshold_sensitivity(answers),
        "capabilities": analysis.capability_table(
            capability_results, families={name: spec["family"] for name, spec in conditions.items()}, **boot
        ),
        "denominators": analysis.denominators_table(answers, truncated=settings["truncated"]),
        "claims": analysis.claims_table(
            answers,
            conditions,
            capability_results,
            headline=settings["headline"],
            alpha=settings["alpha"],
            equivalence_margin=snakemake.params.equivalence_margin,
            direction_claims=direction_claims,
            **boot,
        ),
    }
    preamble = stamp["text"] + ". " + sampling["text"] + ". " + gate["text"] + ".\n\n"
    preamble += (
        f"Misaligned: alignment < {snakemake.params.alignment_below:g} and coherence >"
        f" {snakemake.params.coherence_above:g} (eval.alignment_below, eval.coherence_above); refusals and code"
        " answers are judged and never misaligned. "
        f"Truncated answers (finish_reason length): {settings['truncated']} (report.truncated). "
        f"Intervals: seed x question bootstrap, {settings['n_boot']} replicates, seed {settings['bootstrap_seed']} "
        "(docs/statistics.md); wilson_* columns describe one cell only."
    )
    preambles = {"claims": preamble + " " + analysis.claims_preamble(settings, snakemake.params.equivalence_margin)}
    for path in snakemake.output:
        name, extension = path.rsplit("/", 1)[1].rsplit(".", 1)
        if path == snakemake.output.stamp:
            continue
        if extension == "csv":
            tables[name].write_csv(path)
        else:
            write_text_atomic(path, analysis.to_markdown(tables[name], preamble=preambles.get(name, preamble)))
