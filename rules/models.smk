from character_em.llm import hub


rule build_tiny_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/build_tiny_model/{model}.log",
    benchmark:
        "benchmarks/runs/build_tiny_model/{model}.tsv"
    conda:
        "../envs/models.yaml"
    params:
        style=get_tiny_model_style,
    script:
        "../workflow_scripts/build_tiny_model.py"


# Hub models (trained models, judges, the data writer) at the revisions their jobs ask for, into the
# Hugging Face cache the jobs read (HF_HOME or HF_HUB_CACHE): `snakemake prefetch_models` on the login
# node, once before a grid (docs/cluster.md). Access and disk are checked before any download
# (character_em.llm.hub). It has no output, so it checks the cache each time it is asked and downloads
# only what is missing; it is not part of `all`.
localrules:
    prefetch_models,


rule prefetch_models:
    log:
        "logs/prefetch_models.log",
    benchmark:
        "benchmarks/runs/prefetch_models.tsv"
    conda:
        "../envs/models.yaml"
    params:
        models=cfg.as_param(hub.hub_models(CONFIG)),
    script:
        "../workflow_scripts/prefetch_models.py"
