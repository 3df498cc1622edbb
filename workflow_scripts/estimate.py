from character_em.files import write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.report import estimate

with job_log(snakemake.log[0]) as log:
    result = estimate.estimate(read_param(snakemake.params.config), runs_root=".")
    text = estimate.render_markdown(result, snakemake.params.source, estimate.profile_runtimes())
    write_text_atomic(snakemake.output.report, text)
    log.info("estimate: %.1f GPU-hours in all", result["gpu_hours"])
    print(text)
