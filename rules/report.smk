rule tables:
    input:
        scores=score_files(),
        # finish_reason lives in the samples only: the truncation counts and policy need it.
        samples=[
            path.replace("results/scores/", "results/samples/", 1)
            for path in score_files()
        ],
        capabilities=capability_files(),
        overlap="results/data/overlap_check.json",
        # Claim 4's rows (none when the probes suite is off): claims.csv lists them and Holm may count them.
        direction_claims=get_direction_claims,
        # The judge gate (rule judge_gate): no table from a judge that failed it, unless overridden.
        gate="results/tables/judge_gate.json",
    output:
        expand("results/tables/{table}.{ext}", table=TABLES, ext=["csv", "md"]),
        # Which judge made the tables (report.stamps.judge_stamp): printed under every figure.
        stamp="results/tables/judge_stamp.json",
    log:
        "logs/tables.log",
    conda:
        "../envs/report.yaml"
    params:
        alignment_below=CONFIG["eval"]["alignment_below"],
        coherence_above=CONFIG["eval"]["coherence_above"],
        conditions=get_conditions_param,
        report=cfg.as_param(CONFIG["report"]),
        equivalence_margin=CONFIG["eval"]["capabilities"]["equivalence_margin"],
        em_questions=EM_QUESTIONS,
    script:
        "../workflow_scripts/tables.py"


rule figures:
    input:
        expand("results/tables/{table}.csv", table=TABLES),
        stamp="results/tables/judge_stamp.json",
    output:
        misalignment=report(
            "figures/misalignment.png",
            caption="../report/misalignment.rst",
            category="1. Emergent misalignment",
        ),
        misalignment_by_condition=report(
            "figures/misalignment_by_condition.png",
            caption="../report/misalignment_by_condition.rst",
            category="1. Emergent misalignment",
        ),
        transfer=report(
            "figures/transfer.png",
            caption="../report/transfer.rst",
            category="1. Emergent misalignment",
        ),
        capabilities=report(
            "figures/capabilities.png",
            caption="../report/capabilities.rst",
            category="2. Capabilities",
        ),
        trigger=report(
            "figures/trigger.png",
            caption="../report/trigger.rst",
            category="3. Conditional activation",
        ),
        trigger_specificity=report(
            "figures/trigger_specificity.png",
            caption="../report/trigger_specificity.rst",
            category="3. Conditional activation",
        ),
        persona=report(
            "figures/persona.png",
            caption="../report/persona.rst",
            category="3. Conditional activation",
        ),
        threshold_sensitivity=report(
            "figures/threshold_sensitivity.png",
            caption="../report/threshold_sensitivity.rst",
            category="4. Judge sensitivity",
        ),
        pdfs=expand("figures/{figure}.pdf", figure=FIGURES),
    log:
        "logs/figures.log",
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/figures.py"
