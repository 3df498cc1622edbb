rule tables:
    input:
        scores=score_files(),
        capabilities=capability_files(),
        overlap="results/data/overlap_check.json",
    output:
        misalignment="results/tables/misalignment.csv",
        misalignment_md="results/tables/misalignment.md",
        capabilities="results/tables/capabilities.csv",
    log:
        "logs/tables.log",
    conda:
        "../envs/report.yaml"
    params:
        alignment_below=CONFIG["eval"]["alignment_below"],
        coherence_above=CONFIG["eval"]["coherence_above"],
        families=cfg.as_param(cfg.condition_families(CONFIG)),
    script:
        "../workflow_scripts/tables.py"


rule figures:
    input:
        misalignment="results/tables/misalignment.csv",
        capabilities="results/tables/capabilities.csv",
    output:
        misalignment=report(
            "figures/misalignment.png",
            caption="../report/misalignment.rst",
            category="Emergent misalignment",
        ),
        misalignment_pdf="figures/misalignment.pdf",
        capabilities=report(
            "figures/capabilities.png",
            caption="../report/capabilities.rst",
            category="Capabilities",
        ),
    log:
        "logs/figures.log",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figures.py"
