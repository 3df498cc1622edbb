"""Mean response activations of one condition, per probed layer, for the projection and shared-structure
analyses: its own em answers through its own model (and, for a fine-tuned model, the same answers
through the base model), trigger on/off on a triggered model, persona/neutral prompts on the base model."""

import polars as pl

from character_em.directions import formats
from character_em.directions import probes as directions
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    adapter = snakemake.params.adapter_dir or None
    # Unmerged, so that the base model is the same object with the adapter switched off.
    model, tokenizer, info = modeling.load_model(snakemake.params.base_model, quantization="none", adapter=adapter)
    log.info("loaded %s: %s", snakemake.params.base_model, info)
    layers = directions.check_layers(model, settings["layers"])
    read = {"batch_size": settings["batch_size"], "max_tokens": settings["max_tokens"]}
    means, counts = {}, {}

    def add(name, frame, use_base=False):
        chats = directions.sample_chats(frame)
        if use_base:
            with model.disable_adapter():
                means[name], counts[name] = directions.mean_activations(model, tokenizer, chats, layers, **read)
        else:
            means[name], counts[name] = directions.mean_activations(model, tokenizer, chats, layers, **read)
        log.info("%s: %d answers", name, counts[name])

    em = pl.read_parquet(snakemake.input.em)
    add("own", em)
    if adapter:
        add("base_reading", em, use_base=True)
    for path in snakemake.input.trigger:
        trigger = pl.read_parquet(path)
        add("trigger_off", trigger.filter(pl.col("trigger_variant") == "none"))
        for name in settings["dispositions"]:
            add(
                f"trigger_on:{name}",
                trigger.filter((pl.col("trigger_variant") == "exact") & (pl.col("persona") == name)),
            )
    for path in snakemake.input.persona:
        persona = pl.read_parquet(path)
        add("neutral", persona.filter(pl.col("system_prompt_id") == "neutral"))
        for name in settings["dispositions"]:
            add(f"persona:{name}", persona.filter(pl.col("system_prompt_id") == f"persona-{name}"))
    formats.write_means(snakemake.output.means, layers=layers, means=means)
    write_json_atomic(
        snakemake.output.info,
        {
            "model": snakemake.wildcards.model,
            "condition": snakemake.wildcards.condition,
            "seed": int(snakemake.wildcards.seed),
            "load": info,
            "counts": counts,
        },
    )
