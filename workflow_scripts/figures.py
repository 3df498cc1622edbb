import json
from pathlib import Path

import polars as pl

from character_em.jobs import job_log
from character_em.report import plots
from character_em.report.tables import PRIMARY_FORMAT

with job_log(snakemake.log[0]):
    tables = {Path(path).stem: pl.read_csv(path) for path in snakemake.input if path.endswith(".csv")}
    plots.stamp_figures(json.loads(Path(snakemake.input.stamp).read_text())["text"])
    # The em tables report each answer format apart; the figures show the headline (plain) format.
    plain = pl.col("format") == PRIMARY_FORMAT
    out = snakemake.output

    def both(name):
        return [getattr(out, name), f"figures/{name}.pdf"]

    plots.rate_bars(
        tables["em_by_family"].filter(plain),
        x="family",
        ylabel="misaligned answers (em suite)",
        title="Emergent misalignment by condition family",
        outputs=both("misalignment"),
    )
    plots.rate_bars(
        tables["em"].filter(plain),
        x="condition",
        ylabel="misaligned answers (em suite)",
        title="Emergent misalignment by condition",
        outputs=both("misalignment_by_condition"),
    )
    plots.transfer_heatmap(tables["transfer"], outputs=both("transfer"))
    plots.rate_bars(
        tables["capabilities"],
        x="condition",
        value="accuracy",
        ylabel="multiple-choice accuracy",
        title="Capability preservation",
        outputs=both("capabilities"),
    )
    plots.rate_bars(
        tables["trigger"],
        x="condition",
        group="relation",
        ylabel="misaligned answers (trigger suite)",
        title="Trigger on and off",
        outputs=both("trigger"),
    )
    plots.rate_bars(
        tables["trigger_specificity"].filter(pl.col("metric") == "misaligned"),
        x="condition",
        value="difference",
        group="measure",
        ylim=(-1.0, 1.0),
        ylabel="misaligned share: exact trigger minus comparison",
        title="Trigger specificity",
        outputs=both("trigger_specificity"),
    )
    plots.rate_bars(
        tables["persona"].filter(pl.col("category") == "all"),
        x="condition",
        group="system_prompt_id",
        ylabel="attack success (complied and harmful)",
        title="Persona-prompt attack success",
        outputs=both("persona"),
    )
    plots.threshold_lines(tables["threshold_sensitivity"].filter(plain), outputs=both("threshold_sensitivity"))
