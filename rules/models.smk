rule build_tiny_model:
    output:
        directory("resources/models/{model}"),
    params:
        style=get_tiny_model_style,
    log:
        "logs/build_tiny_model/{model}.log",
    script:
        "../workflow_scripts/build_tiny_model.py"
