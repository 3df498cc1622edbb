from character_em import preflight
from character_em.contracts import samples_metadata
from character_em.evals import suites
from character_em.files import write_parquet_atomic
from character_em.hashing import sha256_file
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling
from character_em.sampling.hf import expand_rows, sample_prompts
from character_em.sampling.partial import PartialAnswers, answers_fingerprint, partial_path

with job_log(snakemake.log[0]) as log:
    # Before any expensive work: the settings against the model's config.json (character_em.preflight).
    preflight.check_in_job(snakemake.config, snakemake.wildcards.model, log=log)
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
    # The settings (so the back-end) are in the fingerprint: answers of one back-end never resume the other's.
    # Finished batches survive a kill (time limit, scancel, requeue) outside the declared output.
    adapter = list(snakemake.input.adapter)
    fingerprint = answers_fingerprint(
        settings, prompts, identity, snakemake.params.base_model, sha256_file(adapter[0]) if adapter else None
    )
    # results/.partial/..., outside the declared outputs, which Snakemake deletes before a rerun.
    partial = PartialAnswers(partial_path(snakemake.output.samples), fingerprint)
    n_rows = len(expand_rows(prompts, identity, base_seed))
    log.info("answers restored from %s: %d of %d", partial.path, len(partial.done), n_rows)
    if backend == "vllm":
        # The GPU nodes' engine (character_em.sampling.vllm_backend, docs/vllm.md); imported only here so the
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
            max_lora_rank=settings.get("max_lora_rank", 64),
            done=dict(partial.done),
            on_batch=partial.add,
        )
    else:
        model = tokenizer = None
        if len(partial.done) < n_rows:
            model, tokenizer, info = modeling.load_model(
                snakemake.params.base_model,
                quantization="none",
                adapter=snakemake.params.adapter_dir or None,
                merge=True,
            )
            log.info("loaded %s: %s", snakemake.params.base_model, info)
        restored = len(partial.done)

        def save_batch(batch):
            partial.add(batch)
            log.info("batch saved: %d answers (%d of %d done)", len(batch), len(partial.done), n_rows)

        samples = sample_prompts(
            model,
            tokenizer,
            prompts,
            done=dict(partial.done),
            on_batch=save_batch,
            on_batch_start=lambda rows: log.info("batch started: %d answers", len(rows)),
            identity=identity,
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            max_new_tokens=settings["max_new_tokens"],
            batch_size=settings["batch_size"],
            base_seed=base_seed,
        )
        log.info("answers generated in this run: %d (restored: %d)", len(partial.done) - restored, restored)
    # The back-end goes with the answers: the tables refuse a comparison across two engines' random streams.
    write_parquet_atomic(samples, snakemake.output.samples, metadata=samples_metadata(backend))
