# Two rules, one script: the profile's resources are static per rule, and only a local (hf, vllm)
# generator needs a GPU. The wildcard constraints (rules/common.smk: CPU_DATA, GPU_DATA) give every
# condition to exactly one of them. Each writes the condition's pool: its answers to the domain's
# planned user turns that pass validation, dedup and the judge filter (character_em.data.build).
rule generate_data:
    input:
        external=get_external_data,
        generator=get_generation_inputs,
    output:
        pool="results/data/{trained}/pool.jsonl",
        manifest="results/data/{trained}/pool.json",
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
        pool="results/data/{trained}/pool.jsonl",
        manifest="results/data/{trained}/pool.json",
    log:
        "logs/generate_data/{trained}.log",
    benchmark:
        "benchmarks/runs/generate_data/{trained}.tsv"
    wildcard_constraints:
        trained=_alternatives(GPU_DATA) or NO_MATCH,
    conda:
        DATA_ENV
    params:
        spec=get_data_spec,
    script:
        "../workflow_scripts/generate_data.py"


# Every written condition's training data: the turns of its pool that survived in every generated
# condition of its domain, so that a domain's conditions train on the same user turns
# (character_em.data.pairing). Each training seed draws its examples from these (rules/train.smk).
rule select_data:
    input:
        pool="results/data/{trained}/pool.jsonl",
        manifest="results/data/{trained}/pool.json",
        domain=get_domain_pools,
    output:
        data="results/data/{trained}/train.jsonl",
        manifest="results/data/{trained}/manifest.json",
    log:
        "logs/select_data/{trained}.log",
    wildcard_constraints:
        trained=_alternatives(WRITTEN_DATA) or NO_MATCH,
    conda:
        "../envs/data.yaml"
    params:
        spec=get_select_spec,
    script:
        "../workflow_scripts/select_data.py"


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
