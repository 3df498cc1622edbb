rule capabilities:
    input:
        model=get_base_model,
        adapter=get_adapter,
        task=get_capability_task,
    output:
        result="results/capabilities/{model}/{condition}/seed{seed}.json",
    log:
        "logs/capabilities/{model}/{condition}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/capabilities/{model}/{condition}/seed{seed}.tsv"
    conda:
        "../envs/evals.yaml"
    params:
        base_model=get_model_source,
        adapter_dir=get_adapter_dir,
        settings=get_capability_params,
    script:
        "../workflow_scripts/capabilities.py"


rule probes:
    input:
        model=get_base_model,
        data=get_probe_data,
    output:
        report="results/probes/{model}/probes.json",
        directions="results/probes/{model}/directions.npz",
    log:
        "logs/probes/{model}.log",
    benchmark:
        "benchmarks/runs/probes/{model}.tsv"
    conda:
        "../envs/evals.yaml"
    params:
        base_model=get_model_source,
        settings=get_probe_params,
    script:
        "../workflow_scripts/probes.py"
