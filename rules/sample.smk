import os
from functools import lru_cache


# Each sampling job asks SLURM for its own expected time (character_em.report.estimate: the suite's
# answers at this model's measured or anchored speed, x1.5), rather than one runtime for every
# model and suite: the Qwen-14B em job needs hours, a transfer job minutes. A job that still reaches
# its limit resumes from its saved batches on the retry (results/.partial/). Sites cap the request
# at the partition's MaxTime with CHARACTER_EM_MAX_RUNTIME (minutes); --set-resources
# sample:runtime=N overrides it.
@lru_cache(maxsize=None)
def sample_minutes():
    from character_em.report.estimate import sample_job_minutes

    return sample_job_minutes(CONFIG, ".")


def sample_runtime(wildcards):
    from character_em.report.estimate import runtime_request

    cap = os.environ.get("CHARACTER_EM_MAX_RUNTIME", "").strip()
    expected = sample_minutes()[(wildcards.model, wildcards.suite)]
    return runtime_request(expected, float(cap) if cap else None)


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
