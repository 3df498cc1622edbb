from character_em.jobs import job_log
from character_em.train.steps import publish_saved_step

with job_log(snakemake.log[0]):
    publish_saved_step(
        saved_dir=snakemake.params.saved,
        run_json=snakemake.input.run,
        step=snakemake.wildcards.step,
        outputs=dict(snakemake.output.items()),
    )
