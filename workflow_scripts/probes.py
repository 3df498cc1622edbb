"""Probes on the base model: activations of the training data, judged em answers and the style
control streamed to disk once, then the grouped-split protocol (character_em.directions.protocol);
last, the chosen layer read on the anchor texts (character_em.directions.families)."""

from pathlib import Path

import polars as pl

from character_em.data.questions import domain_questions
from character_em.directions import families, formats, protocol
from character_em.directions import probes as directions
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    model, tokenizer, info = modeling.load_model(
        snakemake.params.base_model, quantization="none", revision=snakemake.params.revision or None
    )
    log.info("loaded %s: %s", snakemake.params.base_model, info)
    data_files = {Path(path).parent.name: path for path in snakemake.input.data}
    data_chats = {name: directions.read_chats(path, settings["max_examples"]) for name, path in data_files.items()}
    samples = [pl.read_parquet(path) for path in snakemake.input.samples]
    scores = [pl.read_parquet(path) for path in snakemake.input.scores]
    judged = (
        directions.judged_answers(
            pl.concat(samples, how="diagonal_relaxed"),
            pl.concat(scores, how="diagonal_relaxed") if scores else pl.DataFrame(schema={"metric": pl.String}),
            list(settings["groups"]),
        )
        if samples
        else pl.DataFrame()
    )
    questions = [
        q["text"]
        for name, spec in settings["domains"].items()
        for q in domain_questions({"name": name, **spec})["train"]
    ]
    chats, membership = directions.probe_examples(
        data_chats,
        judged,
        settings["groups"],
        max_sampled=settings["max_sampled"],
        expressed_at_least=settings["expressed_at_least"],
        seed=settings["seed"],
        questions=questions,
    )
    style_chats, style_labels, _ = directions.style_examples()
    style_rows = list(range(len(chats), len(chats) + len(style_chats)))
    # One pass over all chats, streamed to one memmap per layer; the probes then read a layer at a time.
    index = directions.write_activations(
        model,
        tokenizer,
        chats + style_chats,
        settings["layers"],
        snakemake.output.activations,
        batch_size=settings["batch_size"],
        max_tokens=settings["max_tokens"],
    )
    log.info(
        "activations: %d chats x %d layers, peak batch %d rows",
        len(index["kept"]),
        len(index["layers"]),
        index["peak_rows"],
    )
    chosen = protocol.selections(
        index["kept"],
        membership,
        val_fraction=settings["val_fraction"],
        test_fraction=settings["test_fraction"],
        seed=settings["seed"],
    )
    rows, vectors = protocol.run_protocol(
        snakemake.output.activations, index["layers"], chosen, n_boot=settings["n_boot"], seed=settings["seed"]
    )
    layer = protocol.choose_layer(rows, settings["layer"])
    log.info("chosen layer %d (validation AUROC)", layer)
    nulls = protocol.null_directions(
        snakemake.output.activations, layer, chosen, n_perm=settings["n_null"], seed=settings["seed"]
    )
    position = {chat: row for row, chat in enumerate(index["kept"])}
    kept_style = [i for i, r in enumerate(style_rows) if r in position]
    style = protocol.style_direction(
        snakemake.output.activations,
        index["layers"],
        [position[style_rows[i]] for i in kept_style],
        [style_labels[i] for i in kept_style],
    )
    write_json_atomic(
        snakemake.output.report,
        {
            "model": snakemake.wildcards.model,
            "load": info,
            "chosen_layer": layer,
            "selection": "fixed" if settings["layer"] is not None else "validation",
            "layers": rows,
            "examples": protocol.example_counts(membership, chosen),
            # Em questions whose judged answers fitted a direction: never used to score one.
            "fit_questions": protocol.fit_questions(chosen),
            "peak_rows": index["peak_rows"],
        },
    )
    formats.write_directions(
        snakemake.output.directions,
        layers=index["layers"],
        chosen_layer=layer,
        directions=vectors,
        extra={"style": style, **{f"null_{name}": value for name, value in nulls.items()}},
    )
    # Texts every model family's probes job reads alike (rows past max_examples: never probed, never
    # scored), at the chosen layer, so the report can map one family's probes into another's space.
    anchors = families.anchor_activations(
        model,
        tokenizer,
        families.select_anchor_chats(
            data_files,
            skip=settings["max_examples"],
            limit=settings["anchors"],
            exclude={families.anchor_key(chat) for chats in data_chats.values() for chat in chats},
        ),
        layer,
        settings["groups"],
        batch_size=settings["batch_size"],
        max_tokens=settings["max_tokens"],
    )
    log.info("anchors: %d texts at layer %d", len(anchors.keys), layer)
    formats.write_anchors(snakemake.output.anchors, anchors)
