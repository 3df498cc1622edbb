rule judge:
    input:
        samples="results/samples/{model}/{condition}/seed{seed}/{suite}.parquet",
        prompts=MAIN_JUDGE_PROMPTS,
    output:
        scores="results/scores/{model}/{condition}/seed{seed}/{suite}.parquet",
        # Failure summary: calls, cache hits, retries, errors, which scoring path was used.
        summary="results/scores/{model}/{condition}/seed{seed}/{suite}.judge.json",
    log:
        "logs/judge/{model}/{condition}/seed{seed}/{suite}.log",
    benchmark:
        "benchmarks/runs/judge/{model}/{condition}/seed{seed}/{suite}.tsv"
    conda:
        "../envs/judge.yaml"
    # A local model judge (hf, vllm) asks for its GPU and memory here, and every judge job for its
    # own expected time (rules/common.smk).
    resources:
        gpu=JUDGE_GPUS,
        mem_mb=JUDGE_MEM_MB,
        runtime=judge_runtime,
    params:
        judge=get_judge_params,
        dispositions=get_dispositions_param,
        # The cache outlives the job, so a killed, failed or repeated job never pays twice.
        cache_dir=CONFIG["judge"]["cache_dir"],
    script:
        "../workflow_scripts/judge.py"
