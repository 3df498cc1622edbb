from character_em import resources
from character_em.evals import capabilities
from character_em.files import write_json_atomic
from character_em.jobs import job_log, read_param
from character_em.llm import loading as modeling

with job_log(snakemake.log[0]):
    settings = read_param(snakemake.params.settings)
    task_file = settings["task_file"] or str(resources.packaged_path("tasks/smoke_mc.jsonl"))
    if settings["backend"] == "lm_eval":
        # Optional extra: imported only when selected, so the own back-end never needs lm_eval.
        from character_em.evals import lmeval as capabilities_lmeval

        result = capabilities_lmeval.evaluate(
            snakemake.params.base_model,
            revision=snakemake.params.revision or None,
            adapter=snakemake.params.adapter_dir or None,
            task_file=task_file,
            tasks=settings["lm_eval_tasks"] or None,
            batch_size=settings["batch_size"],
            max_items=settings["max_items"],
        )
        info = {"backend": "lm_eval", "adapter": snakemake.params.adapter_dir or None}
    else:
        items = capabilities.load_mc_items(task_file)
        model, tokenizer, info = modeling.load_model(
            snakemake.params.base_model,
            quantization="none",
            adapter=snakemake.params.adapter_dir or None,
            merge=True,
            revision=snakemake.params.revision or None,
        )
        result = capabilities.evaluate_multiple_choice(
            model, tokenizer, items, batch_size=settings["batch_size"], max_items=settings["max_items"]
        )
        result["backend"] = "own"
    write_json_atomic(
        snakemake.output.result,
        {
            "model": snakemake.wildcards.model,
            "condition": snakemake.wildcards.condition,
            "seed": int(snakemake.wildcards.seed),
            "task_file": task_file,
            "load": info,
            **result,
        },
    )
