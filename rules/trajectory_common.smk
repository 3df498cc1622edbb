# Input functions and targets of rules/trajectory.smk (saved training steps, docs/trajectories.md).


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
    return step_adapter_dir(
        wildcards.model, wildcards.condition, wildcards.seed, wildcards.step
    )


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
            run_dir = f"{model}/{condition}/seed{seed}"
            seed_dir = run_dir if final else f"{run_dir}/{step}"
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
