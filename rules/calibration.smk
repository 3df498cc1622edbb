# Judge calibration: the configured judge (and optionally a second one, `judge.agreement_with`) on
# hand-labelled answers. Include from the Snakefile after rules/common.smk.

from character_em import job_settings


rule judge_calibration:
    input:
        calibration=job_settings.calibration_file(CONFIG["judge"]),
        # An hf judge on a model folder this workflow builds (the demo's agreement judge).
        judge_models=get_calibration_judge_models,
        prompts=JUDGE_PROMPT_FILES,
    output:
        table="results/tables/judge_calibration.csv",
        table_md="results/tables/judge_calibration.md",
        per_item="results/tables/judge_calibration_items.csv",
    log:
        "logs/judge_calibration.log",
    benchmark:
        "benchmarks/runs/judge_calibration.tsv"
    # It needs nothing the grid makes, so start it early rather than leave a model-judge
    # calibration (minutes) as the last job of a run.
    priority: 10
    conda:
        CALIBRATION_ENV
    resources:
        gpu=CALIBRATION_GPUS,
        mem_mb=CALIBRATION_MEM_MB,
    params:
        # The same settings the judge jobs receive (never a secret: only the key variable's name).
        judges=cfg.as_param(job_settings.calibration_judges(CONFIG["judge"])),
        dispositions=get_dispositions_param,
        # Calibrate at the thresholds the tables use.
        thresholds=cfg.as_param(
            {
                "alignment": CONFIG["eval"]["alignment_below"],
                "coherence": CONFIG["eval"]["coherence_above"],
            }
        ),
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge_calibration.py"


# With judge.agreement_with: the second judge scores judge.agreement_answers_per_cell answers of every cell
# of the grid (the same prompts in every condition), one job per model and seed as the judge jobs, through
# the same scoring path and cache (judge.agreement).
rule judge_second:
    input:
        samples=get_second_judge_samples,
        judge_models=get_calibration_judge_models,
        prompts=JUDGE_PROMPT_FILES,
    output:
        scores="results/scores_second/{model}/seed{seed}.parquet",
        summary="results/scores_second/{model}/seed{seed}.judge.json",
    log:
        "logs/judge_second/{model}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/judge_second/{model}/seed{seed}.tsv"
    conda:
        AGREEMENT_ENV
    resources:
        gpu=AGREEMENT_GPUS,
        mem_mb=AGREEMENT_MEM_MB,
        runtime=second_judge_runtime,
    params:
        judge=get_agreement_params,
        dispositions=get_dispositions_param,
        per_cell=CONFIG["judge"]["agreement_answers_per_cell"],
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge_second.py"


# Both judges on the answers the second one scored: agreement per metric, and the judge-swap table (each
# condition's EM rate and each headline contrast under either judge, with kappa between them).
rule judge_agreement:
    input:
        second=second_judge_files(),
        scores=score_files(),
        # finish_reason lives in the samples only: the tables' truncation policy needs it.
        samples=[
            path.replace("results/scores/", "results/samples/", 1)
            for path in score_files()
        ],
    output:
        table="results/tables/judge_agreement.csv",
        table_md="results/tables/judge_agreement.md",
        per_item="results/tables/judge_agreement_items.csv",
        swap="results/tables/judge_swap.csv",
        swap_md="results/tables/judge_swap.md",
    log:
        "logs/judge_agreement.log",
    conda:
        "../envs/report.yaml"
    params:
        thresholds=cfg.as_param(
            {
                "alignment": CONFIG["eval"]["alignment_below"],
                "coherence": CONFIG["eval"]["coherence_above"],
            }
        ),
        conditions=get_conditions_param,
        report=cfg.as_param(CONFIG["report"]),
        em_questions=EM_QUESTIONS,
    script:
        "../workflow_scripts/judge_agreement.py"


# The judge gate (docs/judging.md): every report rule (tables, directions_report, trajectory) takes its
# output as an input, so no table is built from a judge that failed it unless the config says so.
rule judge_gate:
    input:
        calibration="results/tables/judge_calibration.csv",
        human=get_judge_human_table,
    output:
        gate="results/tables/judge_gate.json",
        table_md="results/tables/judge_gate.md",
    log:
        "logs/judge_gate.log",
    conda:
        "../envs/report.yaml"
    params:
        gate=cfg.as_param(
            {
                **{
                    key: CONFIG["judge"][key]
                    for key in (
                        "min_kappa",
                        "min_subset_accuracy",
                        "allow_uncalibrated",
                    )
                },
                "metrics": GATE_METRICS,
            }
        ),
    script:
        "../workflow_scripts/judge_gate.py"
