rule generate_data:
    input:
        external=get_external_data,
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    params:
        spec=get_data_spec,
    log:
        "logs/generate_data/{trained}.log",
    benchmark:
        "benchmarks/runs/generate_data/{trained}.tsv"
    script:
        "../workflow_scripts/generate_data.py"


rule check_overlap:
    input:
        data=expand("results/data/{trained}/train.jsonl", trained=TRAINED),
    output:
        report="results/data/overlap_check.json",
    params:
        suites=get_overlap_params,
    log:
        "logs/check_overlap.log",
    script:
        "../workflow_scripts/check_overlap.py"
