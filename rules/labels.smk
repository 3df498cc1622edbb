# Human labels of the grid's own answers (docs/judging.md): a blind sheet drawn from the judged answers,
# the labels files annotators put in labels/, and the judge's agreement with them. Include from the
# Snakefile after rules/common.smk.


# Once labels/ holds labels, the sheet they were made on is a source, never redrawn: no rule writes it,
# and a config that would draw another one is refused before any job (check_labelled_sheet).
if LABEL_FILES:
    check_labelled_sheet()
else:

    rule label_sheet:
        input:
            scores=score_files(),
            samples=[
                path.replace("results/scores/", "results/samples/", 1)
                for path in score_files()
            ],
        output:
            html="results/labels/sheet.html",
            csv="results/labels/sheet.csv",
            key="results/labels/key.parquet",
            manifest=LABEL_SHEET,
        log:
            "logs/label_sheet.log",
        conda:
            "../envs/report.yaml"
        params:
            labels=cfg.as_param(CONFIG["judge"]["labels"]),
            conditions=get_conditions_param,
            dispositions=get_dispositions_param,
            thresholds=cfg.as_param(
                {
                    "alignment": CONFIG["eval"]["alignment_below"],
                    "coherence": CONFIG["eval"]["coherence_above"],
                }
            ),
        script:
            "../workflow_scripts/label_sheet.py"


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
