import json
from pathlib import Path

from character_em.data.build import write_dataset
from character_em.data.pairing import select_data
from character_em.files import iter_jsonl
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = read_param(snakemake.params.spec)
    chosen, manifest = select_data(
        [example for _, example in iter_jsonl(snakemake.input.pool)],
        json.loads(Path(snakemake.input.manifest).read_text(encoding="utf-8")),
        domain_manifests={
            name: json.loads(Path(path).read_text(encoding="utf-8"))
            for name, path in zip(spec["paired"], snakemake.input.domain, strict=True)
        },
        n_examples=spec["n_examples"],
        trigger_fraction=spec["trigger_fraction"],
        order_seed=spec["order_seed"],
    )
    write_dataset(chosen, manifest, snakemake.output.data, snakemake.output.manifest)
    log.info("%s: pairing %s", spec["condition"], json.dumps(manifest["pairing"], sort_keys=True))
    log.info(
        "%s: %d examples; training seeds 0..%d draw disjoint sets of %d",
        spec["condition"],
        len(chosen),
        manifest["draw"]["disjoint_draws"] - 1,
        manifest["draw"]["n"],
    )
