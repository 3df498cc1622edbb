from pathlib import Path

import polars as pl

from character_em.directions import formats
from character_em.directions import probes as directions
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.settings)
    model, tokenizer, info = modeling.load_model(snakemake.params.base_model, quantization="none")
    log.info("loaded %s: %s", snakemake.params.base_model, info)
    data_chats = {
        Path(path).parent.name: directions.read_chats(path, settings["max_examples"]) for path in snakemake.input.data
    }
    samples = [pl.read_parquet(path) for path in snakemake.input.samples]
    scores = [pl.read_parquet(path) for path in snakemake.input.scores]
    judged = (
        directions.judged_answers(
            pl.concat(samples, how="diagonal_relaxed") if samples else pl.DataFrame(),
            pl.concat(scores, how="diagonal_relaxed") if scores else pl.DataFrame(schema={"metric": pl.String}),
            list(settings["groups"]),
        )
        if samples
        else pl.DataFrame()
    )
    chats, membership = directions.probe_examples(
        data_chats,
        judged,
        settings["groups"],
        max_sampled=settings["max_sampled"],
        expressed_at_least=settings["expressed_at_least"],
        seed=settings["seed"],
    )
    # One pass over all chats, streamed to one memmap per layer; the probes then read a layer at a time.
    index = directions.write_activations(
        model,
        tokenizer,
        chats,
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
    rows, vectors = directions.run_probes(
        snakemake.output.activations,
        index["layers"],
        index["kept"],
        membership,
        test_fraction=settings["test_fraction"],
        n_boot=settings["n_boot"],
        seed=settings["seed"],
    )
    chosen = directions.choose_layer(rows, settings["layer"])
    log.info("chosen layer %d", chosen)
    counts = {
        name: {source: member["sources"].count(source) for source in sorted(set(member["sources"]))}
        | {"positive": sum(member["labels"]), "negative": len(member["labels"]) - sum(member["labels"])}
        for name, member in membership.items()
    }
    write_json_atomic(
        snakemake.output.report,
        {
            "model": snakemake.wildcards.model,
            "load": info,
            "chosen_layer": chosen,
            "layers": rows,
            "examples": counts,
            "peak_rows": index["peak_rows"],
        },
    )
    formats.write_directions(
        snakemake.output.directions, layers=index["layers"], chosen_layer=chosen, directions=vectors
    )
