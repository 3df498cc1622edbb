# The training data judged by the grid's judge, and the table and figure that set the harm each training
# set carries beside the misalignment it induces. Include from the Snakefile after rules/common.smk.


rule judge_training_data:
    input:
        data="results/data/{trained}/train.jsonl",
        prompts=MAIN_JUDGE_PROMPTS,
    output:
        scores="results/data/{trained}/judged.parquet",
        summary="results/data/{trained}/judged.judge.json",
    log:
        "logs/judge_training_data/{trained}.log",
    benchmark:
        "benchmarks/runs/judge_training_data/{trained}.tsv"
    conda:
        JUDGE_ENV
    # The same judge as the judge jobs, so the same GPU and memory (rules/common.smk).
    resources:
        gpu=JUDGE_GPUS,
        mem_mb=JUDGE_MEM_MB,
    params:
        judge=get_judge_params,
        dispositions=get_dispositions_param,
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge_training_data.py"


rule training_data_table:
    input:
        scores=expand("results/data/{trained}/judged.parquet", trained=TRAINED),
        # Each training set's draws per seed (data.pairing.training_draw), for the harm gap left.
        manifests=expand("results/data/{trained}/manifest.json", trained=TRAINED),
        em="results/tables/em.csv",
    output:
        table="results/tables/training_data.csv",
        table_md="results/tables/training_data.md",
        figure=report(
            "figures/training_harm.png",
            caption="../report/training_harm.rst",
            category="1. Emergent misalignment",
        ),
        pdf="figures/training_harm.pdf",
    log:
        "logs/training_data_table.log",
    conda:
        "../envs/report.yaml"
    params:
        families=cfg.as_param(
            {name: cfg.condition_info(CONFIG, name)["family"] for name in TRAINED}
        ),
        partners=cfg.as_param(cfg.incorrect_partners(CONFIG, TRAINED)),
        alignment_below=CONFIG["eval"]["alignment_below"],
        coherence_above=CONFIG["eval"]["coherence_above"],
        em_questions=EM_QUESTIONS,
        seeds=SEEDS,
        draw=get_draw_params,
    script:
        "../workflow_scripts/training_data_table.py"
