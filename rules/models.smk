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
