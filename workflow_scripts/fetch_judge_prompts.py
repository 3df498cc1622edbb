from character_em.evals.judge_prompts import write_judge_prompts
from character_em.fetch import WheelSpec, manifest_json
from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = WheelSpec(**read_param(snakemake.params.spec))
    name = snakemake.wildcards.prompt_set
    manifest = write_judge_prompts(name, snakemake.input.wheel, snakemake.output.prompts, spec=spec)
    write_text_atomic(snakemake.output.manifest, manifest_json(manifest))
    log.info(
        "%s: judge prompts for %s (reply: %s) from %s", name, manifest["metric"], manifest["reply"], manifest["members"]
    )
