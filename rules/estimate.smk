# GPU-hours and judge calls of the configured grid, before launch: `snakemake estimate`.
# Not part of `all`. It reads whatever earlier runs left in results/ and benchmarks/runs/ (measured
# throughput) without declaring them as inputs, so it never makes training or sampling run.


localrules:
    estimate,


rule estimate:
    output:
        report="results/estimate.md",
    log:
        "logs/estimate.log",
    conda:
        "../envs/report.yaml"
    params:
        # The validated config: any change to the grid reruns the estimate. A function, because
        # the condition templates' braces would otherwise be read as wildcards.
        config=lambda wildcards: cfg.as_param(CONFIG),
        source=CONFIG_SOURCE,
    script:
        "../workflow_scripts/estimate.py"
