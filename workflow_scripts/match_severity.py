import json
from pathlib import Path

import polars as pl

from character_em.data.build import write_dataset
from character_em.data.matching import alignment_by_example, severity_matched_subsample
from character_em.files import iter_jsonl
from character_em.hashing import sha256_file
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = read_param(snakemake.params.spec)
    examples = [example for _, example in iter_jsonl(snakemake.input.data)]
    incorrect_n = sum(1 for _ in iter_jsonl(snakemake.input.incorrect_data))
    character_alignment = alignment_by_example(
        pl.read_parquet(snakemake.input.character_scores),
        spec["character"],
        len(examples),
        source=snakemake.input.character_scores,
    )
    incorrect_alignment = alignment_by_example(
        pl.read_parquet(snakemake.input.incorrect_scores),
        spec["incorrect"],
        incorrect_n,
        source=snakemake.input.incorrect_scores,
    )
    matched, manifest = severity_matched_subsample(
        examples,
        character_alignment,
        incorrect_alignment,
        condition=spec["condition"],
        character=spec["character"],
        incorrect=spec["incorrect"],
        caliper=spec["caliper"],
        min_share=spec["min_share"],
        seed=spec["seed"],
        n_examples=spec["n_examples"],
        turns=json.loads(Path(snakemake.input.character_manifest).read_text(encoding="utf-8"))["turns"],
        inputs={role: sha256_file(path) for role, path in snakemake.input.items()},
    )
    write_dataset(matched, manifest, snakemake.output.data, snakemake.output.manifest)
    log.info(
        "%s: %d of %d incorrect-advice examples matched; KS matched vs incorrect %.3f (full character set %.3f)",
        spec["condition"],
        manifest["n_matched"],
        manifest["n_incorrect"],
        manifest["ks"]["matched_vs_incorrect"],
        manifest["ks"]["character_vs_incorrect"],
    )
