"""Per-question mean activations of one condition at the probes' chosen layer, for every reading
that character_em.directions.texts.reading_texts lists: the fixed texts and prompts every condition
reads alike, its own answers (through its model and through the base model), and the trigger and
persona readings on identical text (plus their own-text and prompt-end variants)."""

import json

import polars as pl

from character_em.directions import formats, texts
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    adapter = snakemake.params.adapter_dir or None
    layer = int(json.loads(open(snakemake.input.probes).read())["chosen_layer"])
    # Unmerged, so that the base model is the same object with the adapter switched off.
    model, tokenizer, info = modeling.load_model(
        snakemake.params.base_model, quantization="none", adapter=adapter, revision=snakemake.params.revision or None
    )
    log.info("loaded %s: %s; reading layer %d", snakemake.params.base_model, info, layer)

    def first(paths):
        return pl.read_parquet(paths[0]) if paths else None

    plan = texts.reading_texts(
        em=pl.read_parquet(snakemake.input.em),
        fixed=pl.read_parquet(snakemake.input.fixed),
        dispositions=settings["dispositions"],
        adapter=adapter is not None,
        trigger=first(snakemake.input.trigger),
        fixed_trigger=first(snakemake.input.fixed_trigger),
        persona=first(snakemake.input.persona),
    )
    readings = texts.reading_means(
        model, tokenizer, plan, layer, batch_size=settings["batch_size"], max_tokens=settings["max_tokens"]
    )
    counts = {name: int(reading.counts.sum()) for name, reading in readings.items()}
    for name, reading in readings.items():
        log.info("%s: %d texts over %d questions", name, counts[name], len(reading.ids))
    formats.write_means(snakemake.output.means, layer=layer, readings=readings)
    write_json_atomic(
        snakemake.output.info,
        {
            "model": snakemake.wildcards.model,
            "condition": snakemake.wildcards.condition,
            "seed": int(snakemake.wildcards.seed),
            "layer": layer,
            "load": info,
            "counts": counts,
        },
    )
