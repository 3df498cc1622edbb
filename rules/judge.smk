# One judge job per wave (model, seed): it judges every Samples file of the wave (every condition, suite
# and saved step) with one judge engine, loaded once, and writes each file's Scores at its usual path.
# The judge cache outlives the job, so a killed, failed or repeated job never pays twice, and rerunning a
# finished wave loads no model at all (docs/vllm.md).
rule judge:
    input:
        samples=get_wave_samples,
        prompts=MAIN_JUDGE_PROMPTS,
    output:
        # In the order of the samples: wave_files() builds all three lists from one list of runs.
        scores=wave_files("scores"),
        # Per Scores file: calls, cache hits, errors, the scoring path used.
        summaries=wave_files("summary"),
        # The whole job: the engine's counts (prompt tokens, cached tokens, loads) and the audit.
        wave="results/judge_waves/{model}/seed{seed}.json",
        audit="results/judge_waves/{model}/seed{seed}.audit.parquet",
    log:
        "logs/judge/{model}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/judge/{model}/seed{seed}.tsv"
    conda:
        JUDGE_ENV
    # A local model judge (hf, vllm) asks for its GPU and memory here, and every judge job for its
    # own expected time (rules/common.smk).
    resources:
        gpu=JUDGE_GPUS,
        mem_mb=JUDGE_MEM_MB,
        runtime=judge_runtime,
    params:
        judge=get_judge_params,
        dispositions=get_dispositions_param,
        audit_fraction=JUDGE_AUDIT,
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge.py"


# How often the exact definition agrees with the first-token verdicts it audited, over every wave.
rule judge_audit:
    input:
        audits=expand(
            "results/judge_waves/{model}/seed{seed}.audit.parquet",
            model=MODELS,
            seed=SEEDS,
        ),
    output:
        csv="results/tables/judge_audit.csv",
        md="results/tables/judge_audit.md",
    log:
        "logs/judge_audit.log",
    localrule: True
    conda:
        "../envs/report.yaml"
    params:
        fraction=JUDGE_AUDIT,
    script:
        "../workflow_scripts/judge_audit.py"
