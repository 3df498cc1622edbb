# Misalignment over training (docs/trajectories.md). The trainer saves the adapter at train.eval_steps
# as a by-product of its one run, into results/adapter_steps/ (outside its declared outputs, so a
# killed run resumes with them); publish_adapter_step makes each saved step a file Snakemake tracks.
# Rule sample answers the em suite on every saved step in its wave, and rule judge judges those answers
# in its wave (one job each per model and seed); the capability eval then runs on each step through the
# {step} wildcard, with the rule of the final adapter (use rule ... with:), so one step can be rerun on its own.


include: "trajectory_common.smk"


wildcard_constraints:
    step=_alternatives(STEP_LABELS) if STEP_LABELS else NO_MATCH,


rule publish_adapter_step:
    input:
        # The step is final only once its run has finished (the trainer checks every step is saved).
        run="results/adapters/{model}/{condition}/seed{seed}/run.json",
    output:
        adapter="results/adapters_at_step/{model}/{condition}/seed{seed}/{step}/adapter_model.safetensors",
        adapter_config="results/adapters_at_step/{model}/{condition}/seed{seed}/{step}/adapter_config.json",
        info="results/adapters_at_step/{model}/{condition}/seed{seed}/{step}/step.json",
    log:
        "logs/publish_adapter_step/{model}/{condition}/seed{seed}/{step}.log",
    localrule: True
    conda:
        "../envs/report.yaml"
    params:
        saved=saved_step_dir,
    script:
        "../workflow_scripts/publish_adapter_step.py"


use rule capabilities as capabilities_step with:
    input:
        model=get_base_model,
        adapter=get_step_adapter,
        task=get_capability_task,
    output:
        result="results/capabilities/{model}/{condition}/seed{seed}/{step}.json",
    log:
        "logs/capabilities/{model}/{condition}/seed{seed}/{step}.log",
    benchmark:
        "benchmarks/runs/capabilities/{model}/{condition}/seed{seed}/{step}.tsv"
    params:
        adapter_dir=get_step_adapter_dir,


rule trajectory:
    input:
        points=[
            path for point in trajectory_points() for path in point["files"].values()
        ],
        gate="results/tables/judge_gate.json",
    output:
        tables=expand(
            "results/tables/{table}.{ext}",
            table=TRAJECTORY_TABLES,
            ext=["csv", "md"],
        ),
        figure=report(
            "figures/trajectory.png",
            caption="../report/trajectory.rst",
            category="1. Emergent misalignment",
        ),
        pdf="figures/trajectory.pdf",
    log:
        "logs/trajectory.log",
    conda:
        "../envs/report.yaml"
    params:
        points=cfg.as_param(trajectory_points()),
        conditions=get_conditions_param,
        alignment_below=CONFIG["eval"]["alignment_below"],
        coherence_above=CONFIG["eval"]["coherence_above"],
        emergence_margin=CONFIG["eval"]["trajectory"]["emergence_margin"],
        n_boot=CONFIG.get("report", {}).get("n_boot", 2000),
        bootstrap_seed=CONFIG.get("report", {}).get("bootstrap_seed", 0),
        em_questions=EM_QUESTIONS,
    script:
        "../workflow_scripts/trajectory.py"
