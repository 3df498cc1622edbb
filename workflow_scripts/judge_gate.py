import polars as pl

from character_em.files import write_json_atomic, write_text_atomic
from character_em.jobs import job_log, read_param
from character_em.judge.calibration import gate_page, judge_gate

with job_log(snakemake.log[0]) as log:
    human = pl.read_csv(snakemake.input.human[0]) if snakemake.input.human else None
    # Raises with the failing checks (the job fails, so no report rule runs) unless overridden.
    gate = judge_gate(pl.read_csv(snakemake.input.calibration), human, **read_param(snakemake.params.gate))
    write_json_atomic(snakemake.output.gate, gate)
    write_text_atomic(snakemake.output.table_md, gate_page(gate))
    log.info("%s", gate["text"])
