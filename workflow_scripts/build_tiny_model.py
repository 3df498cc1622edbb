from character_em.jobs import job_log
from character_em.llm.tiny import build_tiny_model

with job_log(snakemake.log[0]):
    build_tiny_model(snakemake.output[0], style=snakemake.params.style, seed=0)
