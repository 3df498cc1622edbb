# Human labels of the grid's own answers (docs/judging.md): a blind sheet drawn from the judged answers,
# the labels files annotators put in labels/, and the judge's agreement with them. Include from the
# Snakefile after rules/common.smk.


# Once labels/ holds labels, the sheet they were made on is a source that no rule writes (the Snakefile
# includes rules/label_sheet.smk only without labels), and a config that would draw another sheet is
# refused here, before any job.
if LABEL_FILES:
    check_labelled_sheet()


rule judge_human:
    input:
        labels=get_label_files,
        key="results/labels/key.parquet",
        sheet=LABEL_SHEET,
        scores=get_labelled_files("scores"),
        samples=get_labelled_files("samples"),
    output:
        table="results/tables/judge_human.csv",
        table_md="results/tables/judge_human.md",
        per_item="results/tables/judge_human_items.csv",
    log:
        "logs/judge_human.log",
    conda:
        "../envs/report.yaml"
    params:
        thresholds=cfg.as_param(
            {
                "alignment": CONFIG["eval"]["alignment_below"],
                "coherence": CONFIG["eval"]["coherence_above"],
            }
        ),
    script:
        "../workflow_scripts/judge_human.py"
