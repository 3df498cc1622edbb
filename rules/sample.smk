rule sample:
    input:
        model=get_base_model,
        adapter=get_adapter,
    output:
        samples="results/samples/{model}/{condition}/seed{seed}/{suite}.parquet",
    params:
        base_model=get_model_source,
        adapter_dir=get_adapter_dir,
        suite_spec=get_suite_spec,
        sampling=get_sampling_params,
    log:
        "logs/sample/{model}/{condition}/seed{seed}/{suite}.log",
    benchmark:
        "benchmarks/runs/sample/{model}/{condition}/seed{seed}/{suite}.tsv"
    script:
        "../workflow_scripts/sample.py"
