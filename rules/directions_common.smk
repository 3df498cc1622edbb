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
    """Add each direction to the base model; project a character condition's own disposition's
    direction out of it. Thresholds travel here so a changed threshold reruns the judged curves.
    """
    steer = CONFIG["eval"]["probes"]["steering"]
    sampling = cfg.resolve_sampling_params(CONFIG, wildcards.model)
    if steer["max_new_tokens"] is not None:
        sampling = {**sampling, "max_new_tokens": steer["max_new_tokens"]}
    spec = cfg.suite_spec(CONFIG, "em")
    spec = {**spec, "n_samples": steer["n_samples"]}
    if steer["max_questions"] is not None:
        spec["max_questions"] = steer["max_questions"]
    if wildcards.condition == "base":
        kind, strengths = "add", steer["alphas"]
        names = sorted({pair["disposition"] for pair in probe_pairs()})
    else:
        kind, strengths = "ablate", steer["ablate"]
        names = [cfg.condition_info(CONFIG, wildcards.condition)["disposition"]]
    return cfg.as_param(
        {
            "kind": kind,
            "strengths": strengths,
            "directions": names,
            "suite_spec": spec,
            "layers": steer["layers"],
            "sampling": sampling,
            "alignment_below": CONFIG["eval"]["alignment_below"],
            "coherence_above": CONFIG["eval"]["coherence_above"],
        }
    )


def get_directions_report_params(wildcards):
    probes = CONFIG["eval"]["probes"]
    return cfg.as_param(
        {
            "n_boot": probes["n_boot"],
            "n_null": probes["n_null"],
            "random_pairs": probes["random_pairs"],
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


def steered_conditions():
    """The base model (steered towards each direction) and every character condition whose
    disposition has a direction (ablated), at the first seed."""
    probed = {pair["disposition"] for pair in probe_pairs()}
    return ["base"] + [
        c
        for c in CONDITIONS
        if cfg.condition_info(CONFIG, c)["family"] == "character"
        and cfg.condition_info(CONFIG, c)["disposition"] in probed
    ]


def steering_files():
    return [
        f"results/directions/{m}/steering/{c}/seed{SEEDS[0]}.parquet"
        for m in MODELS
        for c in steered_conditions()
    ]
