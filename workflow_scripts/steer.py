"""Steering along the base model's character direction at the chosen layer (and at the configured set
of layers): alpha x direction added to the base model, or the direction projected out of a fine-tuned
model; each answer judged."""

from character_em.directions import formats, steering
from character_em.evals import suites
from character_em.files import write_parquet_atomic
from character_em.hashing import sha256_file
from character_em.jobs import job_log, read_param
from character_em.judge.core import make_backend, score_samples
from character_em.llm import loading as modeling
from character_em.report import tables as analysis
from character_em.sampling.partial import PartialAnswers, answers_fingerprint, partial_path

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    judge_cfg = read_param(snakemake.params.judge)
    dispositions = read_param(snakemake.params.dispositions)
    conditions = read_param(snakemake.params.conditions)
    stored = formats.read_directions(snakemake.input.directions)
    layer_sets = steering.resolve_layers(settings["layers"], stored.layers, stored.chosen_layer)
    needed = sorted({layer for layer_set in layer_sets for layer in layer_set})
    vectors = {name: {layer: stored.at(layer)[name] for layer in needed} for name in settings["directions"]}

    def load():
        model, tokenizer, info = modeling.load_model(
            snakemake.params.base_model, quantization="none", adapter=snakemake.params.adapter_dir or None, merge=True
        )
        log.info("loaded %s: %s; %s at layers %s", snakemake.params.base_model, info, settings["kind"], layer_sets)
        return model, tokenizer

    # One judge for every arm (a model judge loads once, after the steered model is released).
    judge = make_backend(judge_cfg, dispositions)
    prompts = suites.build_prompts("em", settings["suite_spec"])
    identity = {
        "model": snakemake.wildcards.model,
        "condition": snakemake.wildcards.condition,
        "seed": int(snakemake.wildcards.seed),
    }
    # Each arm's finished batches live under results/.partial/ (outside the declared output, which
    # Snakemake deletes before a rerun), so a job killed at its time limit resumes arm by arm.
    adapter = list(snakemake.input.adapter)
    adapter_sha256 = sha256_file(adapter[0]) if adapter else None
    directions_sha256 = sha256_file(snakemake.input.directions)
    folder = partial_path(snakemake.output.answers).with_suffix("")

    def saved(arm):
        fingerprint = answers_fingerprint(
            settings,
            prompts,
            identity,
            snakemake.params.base_model,
            adapter_sha256,
            directions=directions_sha256,
            arm=arm,
        )
        return PartialAnswers(folder / f"{arm}.jsonl", fingerprint)

    answers = steering.steered_answers(
        load,
        prompts,
        kind=settings["kind"],
        layers=layer_sets,
        directions=vectors,
        strengths=settings["strengths"],
        score=lambda samples: score_samples(
            samples,
            judge_cfg=judge_cfg,
            metrics_by_suite=None,
            dispositions=dispositions,
            cache_dir=snakemake.params.cache_dir,
            backend=judge,
        ),
        label=lambda scores: analysis.answers_table(
            scores,
            conditions=conditions,
            alignment_below=settings["alignment_below"],
            coherence_above=settings["coherence_above"],
        ),
        identity=identity,
        sampling=settings["sampling"],
        base_seed=int(snakemake.wildcards.seed),
        saved=saved,
    )
    write_parquet_atomic(answers, snakemake.output.answers)
