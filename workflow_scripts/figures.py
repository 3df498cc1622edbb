import polars as pl

from character_em import plots
from character_em.jobs import job_log

with job_log(snakemake.log[0]):
    misalignment = pl.read_csv(snakemake.input.misalignment).filter(pl.col("suite") == "em")
    plots.rate_bars(
        misalignment,
        value="misaligned_rate",
        low="misaligned_ci_low",
        high="misaligned_ci_high",
        ylabel="misaligned answers (em suite)",
        title="Emergent misalignment by condition",
        outputs=[snakemake.output.misalignment, snakemake.output.misalignment_pdf],
    )
    capabilities = pl.read_csv(snakemake.input.capabilities)
    plots.rate_bars(
        capabilities,
        value="accuracy",
        low="ci_low",
        high="ci_high",
        ylabel="multiple-choice accuracy",
        title="Capabilities by condition",
        outputs=[snakemake.output.capabilities],
    )
