# Two rules, one script: the profile's resources are static per rule, and only a local (hf) generator
# needs a GPU. The wildcard constraints (rules/common.smk: CPU_DATA, GPU_DATA) give every condition to
# exactly one of them.
rule generate_data:
    input:
        external=get_external_data,
        generator=get_generation_inputs,
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    log:
        "logs/generate_data/{trained}.log",
    benchmark:
        "benchmarks/runs/generate_data/{trained}.tsv"
    wildcard_constraints:
        trained=_alternatives(CPU_DATA) or NO_MATCH,
    conda:
        # The judge stage's env: openai for API generation, polars for the judge filter (same env as judging).
        "../envs/judge.yaml"
    params:
        spec=get_data_spec,
    script:
        "../workflow_scripts/generate_data.py"


rule generate_data_gpu:
    input:
        external=get_external_data,
        generator=get_generation_inputs,
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    log:
        "logs/generate_data/{trained}.log",
    benchmark:
        "benchmarks/runs/generate_data/{trained}.tsv"
    wildcard_constraints:
        trained=_alternatives(GPU_DATA) or NO_MATCH,
    conda:
        "../envs/judge.yaml"
    params:
        spec=get_data_spec,
    script:
        "../workflow_scripts/generate_data.py"


# The severity-matched arm (data.severity_matched): the character data subsampled to the judged
# alignment distribution of incorrect-{domain}'s data (character_em.data.matching).
rule match_severity:
    input:
        unpack(get_matched_inputs),
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    log:
        "logs/match_severity/{trained}.log",
    wildcard_constraints:
        trained=_alternatives(MATCHED_DATA) or NO_MATCH,
    conda:
        "../envs/judge.yaml"
    params:
        spec=get_matched_spec,
    script:
        "../workflow_scripts/match_severity.py"


rule check_overlap:
    input:
        data=training_data_files(),
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
