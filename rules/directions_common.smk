# Input functions and targets of rules/directions.smk (the character direction, eval suite
# `probes`); kept apart from the rules as Snakemake's lint asks, and apart from common.smk because
# only these rules use them. Nothing heavy is imported here.


def _suite_samples(model, condition, seed, suite):
    return f"results/samples/{model}/{condition}/seed{seed}/{suite}.parquet"


def _em_conditions():
    return [c for c in CONDITIONS if "em" in cfg.suites_for(CONFIG, c)]


def get_probe_samples(wildcards):
    """Every em answer of this model; the judge's disposition scores label them."""
    return [
        _suite_samples(wildcards.model, c, s, "em")
        for c in _em_conditions()
        for s in SEEDS
    ]


def get_probe_scores(wildcards):
    return [
        path.replace("results/samples/", "results/scores/")
        for path in get_probe_samples(wildcards)
    ]


def get_direction_trigger_samples(wildcards):
    """Trigger on and off, read on the triggered model itself."""
    info = cfg.condition_info(CONFIG, wildcards.condition)
    if info["family"] != "triggered":
        return []
    if "trigger" not in cfg.suites_for(CONFIG, wildcards.condition):
        return []
    return [
        _suite_samples(wildcards.model, wildcards.condition, wildcards.seed, "trigger")
    ]


def get_direction_fixed_trigger_samples(wildcards):
    """The base model's trigger-suite answers of the same seed: teacher-forced on the triggered
    model under the trigger-on and trigger-off prompts alike (identical text, only the input differs).
    """
    if not get_direction_trigger_samples(wildcards):
        return []
    # The trigger suite runs on the base condition whenever it runs on a triggered one.
    return [_suite_samples(wildcards.model, "base", wildcards.seed, "trigger")]


def get_direction_persona_samples(wildcards):
    """Persona and neutral system prompts, read on the base model."""
    if wildcards.condition != "base":
        return []
    if "persona" not in cfg.suites_for(CONFIG, "base"):
        return []
    return [_suite_samples(wildcards.model, "base", wildcards.seed, "persona")]


def get_direction_means_params(wildcards):
    probes = CONFIG["eval"]["probes"]
    return cfg.as_param(
        {
            "layers": CONFIG["models"][wildcards.model]["probe_layers"],
            "batch_size": probes["batch_size"],
            "max_tokens": probes["max_tokens"],
            "dispositions": list(CONFIG["dispositions"]),
        }
    )


def get_steering_params(wildcards):
    """Add a disposition's direction (or one of its controls) to the base model; project a character
    condition's own disposition's direction (or a control) out of it. Nothing is judged here.
    """
    steer = CONFIG["eval"]["probes"]["steering"]
    sampling = cfg.resolve_sampling_params(CONFIG, wildcards.model)
    # Many answers per forward pass: the steering batch, not the sampling jobs' own.
    sampling = {**sampling, "batch_size": steer["batch_size"]}
    if steer["max_new_tokens"] is not None:
        sampling = {**sampling, "max_new_tokens": steer["max_new_tokens"]}
    from character_em.directions.steering import steering_suite_spec

    kind = "add" if wildcards.condition == "base" else "ablate"
    return cfg.as_param(
        {
            "kind": kind,
            "strengths": steer["alphas"] if kind == "add" else steer["ablate"],
            "direction": wildcards.direction,
            "control": wildcards.control,
            "other": _other_disposition(wildcards.direction),
            "random_seed": int(wildcards.seed),
            "suite_spec": steering_suite_spec(CONFIG),
            "layers": steer["layers"],
            "sampling": sampling,
        }
    )


def get_directions_report_params(wildcards):
    probes = CONFIG["eval"]["probes"]
    return cfg.as_param(
        {
            "n_boot": probes["n_boot"],
            "n_null": probes["n_null"],
            "random_pairs": probes["random_pairs"],
            "expressed_at_least": probes["expressed_at_least"],
            "seed": SEEDS[0],
            "alignment_below": CONFIG["eval"]["alignment_below"],
            "coherence_above": CONFIG["eval"]["coherence_above"],
        }
    )


def direction_means_files(extension):
    return [
        f"results/directions/{m}/{c}/seed{s}/means.{extension}"
        for m in MODELS
        for c in _em_conditions()
        for s in SEEDS
    ]


def direction_score_files():
    """The em scores behind the misalignment rate of every condition with mean activations."""
    return [
        f"results/scores/{m}/{c}/seed{s}/em.parquet"
        for m in MODELS
        for c in _em_conditions()
        for s in SEEDS
    ]


def _probed_dispositions():
    from character_em.directions.steering import probed_dispositions

    return probed_dispositions(CONFIG, CONDITIONS)


def _other_disposition(direction):
    from character_em.directions.steering import other_disposition

    return other_disposition(direction, _probed_dispositions())


def steering_jobs():
    """(model, condition, direction, control) of every steering job, at the first seed: the base
    model steered along each probed disposition, each character condition of one ablated; each
    with its own direction and every configured control (directions.steering.steering_arm_sets).
    """
    from character_em.directions.steering import steering_arm_sets

    return [(m, *job) for m in MODELS for job in steering_arm_sets(CONFIG, CONDITIONS)]


def steering_files():
    """The judged steered answers of every steering job."""
    return [file for m in MODELS for file in steering_wave("scores", m)]


def steering_wave(kind, model="{model}"):
    """One model's steering files, in job order: the answers, their scores or their summaries (the
    scores' `.judge.json`); with the default, patterns of the {model} wildcard of rule judge_steering.
    """
    from character_em.directions.steering import steering_arm_sets

    suffix = {
        "answers": ".parquet",
        "scores": ".scores.parquet",
        "summary": ".judge.json",
    }[kind]
    return [
        f"results/directions/{model}/steering/{c}/seed{SEEDS[0]}/{d}/{control}{suffix}"
        for c, d, control in steering_arm_sets(CONFIG, CONDITIONS)
    ]


STEERED_DIRECTIONS = _alternatives(_probed_dispositions()) or NO_MATCH
STEERING_CONTROLS = _alternatives(
    ["own", *CONFIG["eval"]["probes"]["steering"]["controls"]]
)
