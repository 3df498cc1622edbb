rule generate_data:
    input:
        external=get_external_data,
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    log:
        "logs/generate_data/{trained}.log",
    benchmark:
        "benchmarks/runs/generate_data/{trained}.tsv"
    conda:
        "../envs/data.yaml"
    params:
        spec=get_data_spec,
    script:
        "../workflow_scripts/generate_data.py"


rule check_overlap:
    input:
        data=expand("results/data/{trained}/train.jsonl", trained=TRAINED),
    output:
        report="results/data/overlap_check.json",
    log:
        "logs/check_overlap.log",
    conda:
        "../envs/data.yaml"
    params:
        suites=get_overlap_params,
    script:
        "../workflow_scripts/check_overlap.py"
