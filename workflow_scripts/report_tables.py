from character_em.jobs import job_log
from character_em.report.pages import write_markdown_pages

with job_log(snakemake.log[0]):
    write_markdown_pages({name: (snakemake.input[name], snakemake.output[name]) for name in snakemake.params.pages})
