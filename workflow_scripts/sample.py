from character_em.evals import suites
from character_em.files import write_parquet_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling
from character_em.sampling.hf import sample_prompts

with job_log(snakemake.log[0]) as log:
    settings = read_param(snakemake.params.sampling)
    prompts = suites.build_prompts(snakemake.wildcards.suite, read_param(snakemake.params.suite_spec))
    identity = {
        "model": snakemake.wildcards.model,
        "condition": snakemake.wildcards.condition,
        "seed": int(snakemake.wildcards.seed),
    }
    # Per-sample seeds depend on the seed and the prompt, not on the model, so every condition
    # answers the same prompt with the same random stream (paired comparisons).
    base_seed = int(snakemake.wildcards.seed)
    backend = settings.get("backend", "hf")
    if backend == "vllm":
        # Optional GPU back-end, untested on CPU (character_em.sampling.vllm_backend); imported only here so the
        # hf path never needs vLLM. It serves the adapter unmerged.
        from character_em.sampling.vllm_backend import sample_prompts_vllm

        log.info("sampling %s with vLLM (adapter %s)", snakemake.params.base_model, snakemake.params.adapter_dir)
        samples = sample_prompts_vllm(
            snakemake.params.base_model,
            snakemake.params.adapter_dir or None,
            prompts,
            identity=identity,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            max_new_tokens=settings["max_new_tokens"],
            base_seed=base_seed,
        )
    else:
        model, tokenizer, info = modeling.load_model(
            snakemake.params.base_model, quantization="none", adapter=snakemake.params.adapter_dir or None, merge=True
        )
        log.info("loaded %s: %s", snakemake.params.base_model, info)
        samples = sample_prompts(
            model,
            tokenizer,
            prompts,
            identity=identity,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            max_new_tokens=settings["max_new_tokens"],
            batch_size=settings["batch_size"],
            base_seed=base_seed,
        )
    write_parquet_atomic(samples, snakemake.output.samples)
