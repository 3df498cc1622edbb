from character_em.fetch import WheelSpec, fetch_wheel
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]):
    fetch_wheel(WheelSpec(**read_param(snakemake.params.spec)), snakemake.output.wheel)
