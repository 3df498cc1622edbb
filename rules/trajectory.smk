# Misalignment over training (docs/trajectories.md). The trainer saves the adapter at train.eval_steps
# as a by-product of its one run, into results/adapter_steps/ (outside its declared outputs, so a
# killed run resumes with them); publish_adapter_step makes each saved step a file Snakemake tracks.
# The em suite and the capability eval then run on each step through the {step} wildcard, with the
# rules of the final adapter (use rule ... with:), so one step can be rerun on its own.

# Every saved-step label of the grid (step40, epoch0.25); `final` is the final adapter's own paths.
STEP_LABELS = sorted(
    {
        label
        for model in MODELS
        for condition in TRAINED
        for label in cfg.eval_step_labels(CONFIG, model, condition)
    }
)
TRAJECTORY_TABLES = ["trajectory", "trajectory_by_family", "emergence"]


def steps_dir(model, condition, seed):
    """The trainer's saved steps of one adapter (a param of train_adapter, not an output)."""
    return f"results/adapter_steps/{model}/{condition}/seed{seed}"


def saved_step_dir(wildcards):
    """Where the trainer saved this step: outside every declared output (rules/train.smk)."""
    return f"{steps_dir(wildcards.model, wildcards.condition, wildcards.seed)}/{wildcards.step}"


def _check_step(wildcards):
    labels = cfg.eval_step_labels(CONFIG, wildcards.model, wildcards.condition)
    if wildcards.step not in labels:
        raise WorkflowError(
            f"{wildcards.model}/{wildcards.condition}: no saved step {wildcards.step!r}; its train.eval_steps give {labels}"
        )


def get_step_adapter(wildcards):
    _check_step(wildcards)
    folder = get_step_adapter_dir(wildcards)
    return [f"{folder}/adapter_model.safetensors", f"{folder}/adapter_config.json"]


def get_step_adapter_dir(wildcards):
    _check_step(wildcards)
    return f"results/adapters_at_step/{wildcards.model}/{wildcards.condition}/seed{wildcards.seed}/{wildcards.step}"


def trajectory_points():
    """One entry per (model, condition, seed, step) on the trajectory, with the files behind it: the
    em scores, the capability result and the step's record (step.json, or run.json for `final`).
    The base model is the untrained start of every trajectory (step 0)."""
    em = "em" in EVAL_SUITES
    points = []
    for model, condition, seed in grid_jobs():
        steps = [*cfg.eval_step_labels(CONFIG, model, condition), cfg.FINAL_STEP]
        for step in steps:
            final = step == cfg.FINAL_STEP
            seed_dir = f"{model}/{condition}/seed{seed}" + ("" if final else f"/{step}")
            files = {}
            if em and (final or "em" in cfg.step_suites(CONFIG, condition)):
                files["scores"] = f"results/scores/{seed_dir}/em.parquet"
            if "capabilities" in EVAL_SUITES and (
                final or cfg.step_capabilities(CONFIG)
            ):
                files["capabilities"] = (
                    f"results/capabilities/{model}/{condition}/seed{seed}.json"
                    if final
                    else f"results/capabilities/{seed_dir}.json"
                )
            if condition != "base":
                files["info"] = (
                    f"{adapter_dir(model, condition, seed)}/run.json"
                    if final
                    else f"results/adapters_at_step/{seed_dir}/step.json"
                )
            points.append(
                {
                    "model": model,
                    "condition": condition,
                    "seed": seed,
                    "step": step,
                    "files": files,
                }
            )
    return points


def trajectory_outputs():
    """The trajectory tables and figure, when some adapter has saved steps."""
    if not STEP_LABELS:
        return []
    return [
        *expand(
            "results/tables/{table}.{ext}", table=TRAJECTORY_TABLES, ext=["csv", "md"]
        ),
        *expand("figures/trajectory.{ext}", ext=["png", "pdf"]),
    ]


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


use rule sample as sample_step with:
    input:
        model=get_base_model,
        adapter=get_step_adapter,
    output:
        samples="results/samples/{model}/{condition}/seed{seed}/{step}/{suite}.parquet",
    log:
        "logs/sample/{model}/{condition}/seed{seed}/{step}/{suite}.log",
    benchmark:
        "benchmarks/runs/sample/{model}/{condition}/seed{seed}/{step}/{suite}.tsv"
    params:
        adapter_dir=get_step_adapter_dir,


use rule judge as judge_step with:
    input:
        samples="results/samples/{model}/{condition}/seed{seed}/{step}/{suite}.parquet",
    output:
        scores="results/scores/{model}/{condition}/seed{seed}/{step}/{suite}.parquet",
        summary="results/scores/{model}/{condition}/seed{seed}/{step}/{suite}.judge.json",
    log:
        "logs/judge/{model}/{condition}/seed{seed}/{step}/{suite}.log",
    benchmark:
        "benchmarks/runs/judge/{model}/{condition}/seed{seed}/{step}/{suite}.tsv"


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
    script:
        "../workflow_scripts/trajectory.py"
