from character_em.evals.mmlu import convert_mmlu
from character_em.fetch import WheelSpec, manifest_json
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = WheelSpec(**read_param(snakemake.params.spec))
    manifest = convert_mmlu(snakemake.input.wheel, snakemake.output.task, spec=spec)
    write_text_atomic(snakemake.output.manifest, manifest_json(manifest))
    log.info(
        "MMLU: %d items in %d subjects, %d source rows rejected: %s",
        manifest["n_items"],
        manifest["n_subjects"],
        manifest["n_rejected"],
        manifest["rejects"],
    )
