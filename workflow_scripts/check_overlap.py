from character_em.data import build as data
from character_em.evals import suites
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]):
    specs = read_param(snakemake.params.suites)
    eval_texts = [row["question"] for suite, spec in specs.items() for row in suites.build_prompts(suite, spec)]
    report = data.check_overlap(snakemake.input.data, eval_texts)
    write_json_atomic(snakemake.output.report, report)
    if report["overlaps"]:
        raise SystemExit(f"training data overlaps evaluation questions: {report['overlaps'][:5]}")
