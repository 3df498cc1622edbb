# One job per model and seed samples every Samples file of that seed (the base model, every adapter, the
# adapters saved at train.eval_steps; every suite that applies) with one engine: a multi-LoRA vLLM engine
# on GPU nodes, the hf loop adapter by adapter elsewhere (character_em.sampling.wave). Its outputs are
# the files the judge reads, at their usual paths; finished batches survive kills in results/.partial/,
# which also make a rerun of unchanged files free. It asks SLURM for its own expected time
# (sample_runtime, rules/common.smk).
rule sample:
    input:
        model=get_base_model,
        adapters=get_wave_adapters,
        harmful=get_wave_harmful_requests,
    output:
        samples=WAVE_SAMPLES,
        record="results/samples/{model}/seed{seed}.wave.json",
    log:
        "logs/sample/{model}/seed{seed}.log",
    benchmark:
        "benchmarks/runs/sample/{model}/seed{seed}.tsv"
    # Before capabilities jobs when both are ready: judging and the tables wait on the samples, while
    # capabilities is a leaf.
    priority: 1
    conda:
        get_sample_env
    resources:
        runtime=sample_runtime,
    params:
        base_model=get_model_source,
        revision=get_model_revision,
        files=get_sampling_wave,
        suite_specs=get_wave_suite_specs,
        sampling=get_sampling_params,
    script:
        "../workflow_scripts/sample.py"
