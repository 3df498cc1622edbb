from character_em.jobs import job_log
from character_em.report.plots import loss_curve

with job_log(snakemake.log[0]):
    loss_curve(snakemake.input.steps, snakemake.output.figure)
