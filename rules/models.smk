rule build_tiny_model:
    output:
        directory("resources/models/{model}"),
    params:
        style=get_tiny_model_style,
    conda:
        "../envs/models.yaml"
    log:
        "logs/build_tiny_model/{model}.log",
    benchmark:
        "benchmarks/runs/build_tiny_model/{model}.tsv"
    script:
        "../workflow_scripts/build_tiny_model.py"
