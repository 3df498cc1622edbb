from character_em.data import build as data
from character_em.evals import suites
from character_em.jobs import job_log, read_param

with job_log(snakemake.log[0]) as log:
    spec = read_param(snakemake.params.spec)
    if spec["external"]:
        examples = data.load_external_jsonl(spec["external"])
        manifest = {
            "generator": "external",
            "source": spec["external"],
            "condition": spec["condition"]["name"],
            "domain": spec["condition"]["domain"],
            "turns": None,
        }
    else:
        eval_texts = [
            row["question"]
            for suite, suite_spec in spec["overlap_suites"].items()
            for row in suites.build_prompts(suite, suite_spec)
        ]
        examples, manifest = data.build_pool(
            spec["condition"],
            disposition=spec["disposition"],
            domain=spec["domain"],
            pool_size=spec["pool_size"],
            seed=spec["seed"],
            trigger_fraction=spec["trigger_fraction"],
            generator=spec["generator"],
            eval_texts=eval_texts,
            data_filter=spec.get("filter"),
        )
        # Counts only: the manifest holds no secret (the key stays in its environment variable).
        log.info("rejects by reason: %s", manifest["reject_reasons"])
        if manifest.get("requests"):
            log.info("generator requests: %s", manifest["requests"])
    data.write_dataset(examples, manifest, snakemake.output.pool, snakemake.output.manifest)
    log.info("pool of %d examples for %s", len(examples), spec["condition"]["name"])
