"""Per-question mean activations of one condition at the probes' chosen layer:
- ``fixed``: the base model's em answers (same seed) read by this model, and ``prompt``: the em
  prompts' last token read by this model; the same texts for every condition, so that only the
  weights differ (the primary projection);
- ``own``: its own em answers through its own model (secondary), and ``base_reading``: the same
  answers through the base model (the adapter switched off): the fine-tune direction;
- trigger on/off on a triggered model; persona/neutral prompts on the base model."""

import json

import polars as pl

from character_em.directions import formats
from character_em.directions import probes as directions
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    adapter = snakemake.params.adapter_dir or None
    layer = int(json.loads(open(snakemake.input.probes).read())["chosen_layer"])
    # Unmerged, so that the base model is the same object with the adapter switched off.
    model, tokenizer, info = modeling.load_model(snakemake.params.base_model, quantization="none", adapter=adapter)
    log.info("loaded %s: %s; reading layer %d", snakemake.params.base_model, info, layer)
    read = {"batch_size": settings["batch_size"], "max_tokens": settings["max_tokens"]}
    readings, counts = {}, {}

    def add(name, frame, use_base=False, prompt_end=False):
        chats = directions.sample_chats(frame)
        ids = frame["question_id"].to_list()
        if use_base:
            with model.disable_adapter():
                result = directions.question_means(model, tokenizer, chats, ids, [layer], prompt_end=prompt_end, **read)
        else:
            result = directions.question_means(model, tokenizer, chats, ids, [layer], prompt_end=prompt_end, **read)
        readings[name] = formats.QuestionReading(result["ids"], result["means"][:, 0], result["counts"])
        counts[name] = int(result["counts"].sum())
        log.info("%s: %d texts over %d questions", name, counts[name], len(result["ids"]))

    em = pl.read_parquet(snakemake.input.em)
    add("own", em)
    if adapter:
        add("base_reading", em, use_base=True)
    fixed = pl.read_parquet(snakemake.input.fixed)
    add("fixed", fixed)
    add("prompt", fixed.unique(["question_id", "format"], keep="first", maintain_order=True), prompt_end=True)
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
