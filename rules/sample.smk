# Each sampling job asks SLURM for its own expected time (sample_runtime, rules/common.smk).
rule sample:
    input:
        model=get_base_model,
        adapter=get_adapter,
        harmful=get_harmful_requests,
    output:
        samples="results/samples/{model}/{condition}/seed{seed}/{suite}.parquet",
    log:
        "logs/sample/{model}/{condition}/seed{seed}/{suite}.log",
    benchmark:
        "benchmarks/runs/sample/{model}/{condition}/seed{seed}/{suite}.tsv"
    # Before the adapter's capabilities job when both are ready (in an evaluation group they share one
    # GPU): judging and the tables wait on the samples, while capabilities is a leaf. It also makes the
    # group's order fixed rather than whatever order the scheduler's set of ready jobs gives.
    priority: 1
    conda:
        "../envs/sample.yaml"
    resources:
        runtime=sample_runtime,
    params:
        base_model=get_model_source,
        adapter_dir=get_adapter_dir,
        suite_spec=get_suite_spec,
        sampling=get_sampling_params,
    script:
        "../workflow_scripts/sample.py"
