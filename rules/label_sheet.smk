# The blind sheet of the grid's own answers for human labels (docs/judging.md). The Snakefile includes
# this file only while labels/ holds no labels, so a labelled sheet is never drawn again.


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
