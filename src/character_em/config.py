"""Load, validate and resolve the experiment config.

Everything the workflow needs from the config goes through here, so that the Snakefile,
the scripts and the tests agree on one reading of it. Pure Python: no torch.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from character_em import job_settings
from character_em.conditions import RESERVED_NAMES, matched_arm, matched_source
from character_em.conditions import parse_condition as parse_condition_name
from character_em.hashing import stable_int

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
CONDITION_TEMPLATES = (
    "base",
    "{disposition}-{domain}",
    "incorrect-{domain}",
    "correct-{domain}",
    "{disposition}-{domain}-trig",
)
SAMPLED_SUITES = ("em", "transfer", "trigger", "persona")
# The trigger suite compares triggered with untriggered prompts; it answers a question only for
# models that were trained with a trigger, and for the base model as the reference.
TRIGGER_SUITE_FAMILIES = ("base", "triggered")
_YAML_FLOAT_HINT = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")


class ConfigError(ValueError):
    """A config that cannot run. The message names the source, the key and what was expected."""


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    with SCHEMA_PATH.open() as handle:
        return yaml.safe_load(handle)


def _validator_with_defaults() -> Any:
    import jsonschema

    base = jsonschema.Draft202012Validator

    def fill_defaults(validator: Any, properties: Mapping[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})


def _format_error(error: Any, source: str) -> str:
    path = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    message = error.message
    if path.endswith("api_key_env"):
        # Someone may have pasted the key itself here; never echo it.
        return f"{source}: {path}: must be the NAME of an environment variable (letters, digits, underscores); the value is not shown"
    if error.validator == "type" and isinstance(error.instance, str) and _YAML_FLOAT_HINT.match(error.instance):
        message += (
            f" (YAML reads {error.instance!r} as a string because it has no decimal point;"
            f" write it as {float(error.instance):.1e} with a decimal point, e.g. 2.0e-4)"
        )
    if error.validator == "additionalProperties":
        message += "; check the spelling against schemas/config.schema.yaml"
    return f"{source}: {path}: {message}"


# What an error in a value given with `snakemake --config key=value` names instead of the config file.
COMMAND_LINE_SOURCE = "the command line (--config)"


def validate_config(
    config: Mapping[str, Any], source: str = "config", command_line: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Validate against the JSON schema, fill defaults and check cross-references.

    ``command_line``: the values given with ``snakemake --config``, already merged into ``config``.
    Snakemake reads the scalars inside a list or mapping there as strings (``seeds=[0]`` is ``["0"]``), so
    each one the schema refuses as a string is read again as YAML; an error in a value from the command
    line names the command line, not ``source``.

    Returns a new dict; raises ConfigError naming the offending key.
    """
    resolved = copy.deepcopy(dict(config))
    validator = _validator_with_defaults()(load_schema())
    command_line = command_line or {}
    if command_line:
        _type_command_line_values(resolved, command_line, validator)
    errors = sorted(validator.iter_errors(resolved), key=lambda err: list(err.absolute_path))
    if errors:
        raise ConfigError(
            "\n".join(_format_error(err, _source_of(err.absolute_path, source, command_line)) for err in errors)
        )
    combined = f"{source} with --config {', '.join(command_line)}" if command_line else source
    _check_references(resolved, combined)
    _check_selection(resolved, _source_of(["select"], source, command_line))
    _check_eval_steps(resolved, combined)
    _check_lora_rank(resolved, combined)
    _check_judge_quantization(resolved, combined)
    _check_sampling_waves(resolved, combined)
    _check_test_instruments(resolved, combined)
    _check_em_questions(resolved, combined)
    _check_replication(resolved, combined)
    return resolved


def _from_command_line(path: Any, command_line: Mapping[str, Any]) -> bool:
    """Whether the value at ``path`` (keys and list indices) was given with --config."""
    parts = list(path)
    node: Any = command_line
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return False
    return bool(parts)


def _source_of(path: Any, source: str, command_line: Mapping[str, Any]) -> str:
    return COMMAND_LINE_SOURCE if _from_command_line(path, command_line) else source


def _type_command_line_values(config: dict[str, Any], command_line: Mapping[str, Any], validator: Any) -> None:
    """Read again as YAML each string from the command line that the schema refuses as a string, so that
    ``--config 'seeds=[0, 1]'`` means the integers 0 and 1. A string the schema accepts stays a string."""
    for _ in range(1000):  # every pass types at least one value, and there are finitely many
        typed = False
        for error in validator.iter_errors(copy.deepcopy(config)):
            path = list(error.absolute_path)
            if not isinstance(error.instance, str) or not _from_command_line(path, command_line):
                continue
            try:
                value = yaml.safe_load(error.instance)
            except yaml.YAMLError:
                continue
            if isinstance(value, str):
                continue
            node: Any = config
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
            typed = True
            break
        if not typed:
            return


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, merge overrides (e.g. a preset) and validate it."""
    path = Path(path)
    try:
        with path.open() as handle:
            raw = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if overrides:
        raw = deep_merge(raw, overrides)
    return validate_config(raw, source=str(path))


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Snakemake's own rule for --configfile layering: mappings merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------- conditions


def parse_condition(
    name: str, dispositions: set[str] | Mapping[str, Any], domains: set[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Split a condition name into family, disposition and domain; raise ValueError if it names unknowns."""
    return parse_condition_name(name, set(dispositions), set(domains))


def expand_conditions(config: Mapping[str, Any]) -> list[str]:
    """Expand templates and explicit names in config order, without duplicates; then, with
    ``data.severity_matched.enabled``, the severity-matched arm of every character condition whose
    ``incorrect-{domain}`` is in the grid (``severity_matched_arms``)."""
    listed = listed_conditions(config)
    return listed + severity_matched_arms(config, listed)


def severity_matched_arms(config: Mapping[str, Any], listed: list[str]) -> list[str]:
    """``{disposition}-{domain}-matched`` for each character condition of ``listed`` whose incorrect-advice
    partner is listed too, in ``listed`` order; none unless ``data.severity_matched.enabled``."""
    if not ((config.get("data") or {}).get("severity_matched") or {}).get("enabled"):
        return []
    arms = []
    for name in listed:
        # Names are checked against the grammar later (_check_references); a bad one is not an arm.
        try:
            info = parse_condition(name, config["dispositions"], config["domains"])
        except ValueError:
            continue
        if info["family"] == "character" and f"incorrect-{info['domain']}" in listed:
            arms.append(matched_arm(name))
    return arms


def listed_conditions(config: Mapping[str, Any]) -> list[str]:
    """The ``conditions`` list: templates expanded and explicit names, in config order, without duplicates."""
    dispositions, domains = list(config["dispositions"]), list(config["domains"])
    names: list[str] = []
    for entry in config["conditions"]:
        if "{" in entry:
            fields = re.findall(r"{(\w+)}", entry)
            unknown = set(fields) - {"disposition", "domain"}
            if unknown:
                raise ConfigError(
                    f"conditions: template {entry!r} uses unknown field(s) {sorted(unknown)}; expected {{disposition}} and {{domain}}"
                )
            values = {"disposition": dispositions, "domain": domains}
            for combo in itertools.product(*(values[field] for field in fields)):
                names.append(entry.format(**dict(zip(fields, combo, strict=True))))
        else:
            names.append(entry)
    return list(dict.fromkeys(names))


def _check_references(config: dict[str, Any], source: str) -> None:
    for section in ("dispositions", "domains"):
        for name in config[section]:
            if name in RESERVED_NAMES:
                raise ConfigError(
                    f"{source}: {section}.{name}: {name!r} is reserved for condition names; choose another name"
                )
    try:
        conditions = expand_conditions(config)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    for name in conditions:
        try:
            parse_condition(name, config["dispositions"], config["domains"])
        except ValueError as err:
            raise ConfigError(f"{source}: conditions: {err}") from err
    _check_severity_matched(config, source)
    for key, label in ((config["train_overrides"], "train_overrides"), (config["data"]["external"], "data.external")):
        for name in key:
            if name not in conditions:
                raise ConfigError(f"{source}: {label}.{name}: not a configured condition; expected one of {conditions}")
    generator = config["data"]["generator"]
    if generator["backend"] in ("openai", "hf", "vllm") and not generator.get("model"):
        raise ConfigError(
            f"{source}: data.generator.model: the {generator['backend']} generator needs a model"
            " (the endpoint's model name, or a local folder / Hugging Face id for hf and vllm)"
        )
    quantization = generator["quantization"]
    allowed = {"nf4": "hf", "fp8": "vllm"}.get(quantization)
    # Only the local writers read the key (job_settings.GENERATOR_PARAM_KEYS); for the others it is inert.
    if allowed and generator["backend"] in ("hf", "vllm") and generator["backend"] != allowed:
        raise ConfigError(
            f"{source}: data.generator.quantization: {quantization} is read by the {allowed} generator only, not"
            f" data.generator.backend: {generator['backend']}; use "
            + ("fp8 for vllm" if quantization == "nf4" else "nf4 for hf")
            + " or none"
        )
    flt = config["data"]["filter"]
    filter_judge = flt["judge"] or config["judge"]
    filter_backend = filter_judge.get("backend", "rubric")
    if flt["enabled"] and filter_backend in ("openai", "hf") and not filter_judge.get("model"):
        where = "data.filter.judge" if flt["judge"] else "judge"
        raise ConfigError(f"{source}: {where}.model: the data filter's {filter_backend} judge needs a model")
    if "base" in config["data"]["external"]:
        raise ConfigError(f"{source}: data.external.base: the base condition has no training data")
    for model, spec in config["models"].items():
        if spec["build"] and spec["path"] != f"resources/models/{model}":
            raise ConfigError(
                f"{source}: models.{model}.path: a model with `build: {spec['build']}` is built into"
                f" resources/models/{model}; set path to that"
            )
        layers = spec.get("probe_layers")
        if layers is not None and len(set(layers)) != len(layers):
            raise ConfigError(f"{source}: models.{model}.probe_layers: layers must be unique")


def _check_severity_matched(config: dict[str, Any], source: str) -> None:
    """The matched arms are derived from the grid (one home: ``data.severity_matched``), so they are never
    listed by hand nor given their own data, and turning the switch on must add at least one."""
    listed = listed_conditions(config)
    for name in listed:
        if parse_condition(name, config["dispositions"], config["domains"])["family"] == "matched":
            raise ConfigError(
                f"{source}: conditions: {name!r} is a severity-matched arm; it is added by"
                " data.severity_matched.enabled for every character condition whose incorrect-{domain} is in the"
                " grid, so do not list it"
            )
    arms = severity_matched_arms(config, listed)
    for name in arms:
        if name in config["data"]["external"]:
            raise ConfigError(
                f"{source}: data.external.{name}: a severity-matched arm's data is a subsample of"
                f" {matched_source(condition_info(config, name))['character']}'s data; give that condition the file"
            )
    if config["data"]["severity_matched"]["enabled"] and not arms:
        raise ConfigError(
            f"{source}: data.severity_matched.enabled: no character condition {{disposition}}-{{domain}} has its"
            " incorrect-{domain} in the grid, so there is nothing to match; add both to `conditions` or turn it off"
        )


# The two test instruments: they make the smoke and demo presets run with no model and no network, and they
# measure their own keywords (the offline templates plant the markers the rubric counts).
TEST_INSTRUMENT_REASON = {
    "rubric": (
        "the rubric judge counts the disposition's marker phrases, the very phrases the offline templates plant,"
        " so its scores measure keywords, not character"
    ),
    "offline": (
        "the offline generator fills templates with the rubric's marker phrases instead of having a model write"
        " answers, so a grid trained on it learns keywords"
    ),
}


def test_instruments_in_use(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``[(config key, instrument), ...]`` for every place a validated config uses a test instrument."""
    used: list[tuple[str, str]] = []
    judge = config["judge"]
    if judge.get("backend", "rubric") == "rubric":
        used.append(("judge.backend", "rubric"))
    agreement = judge.get("agreement_with")
    if agreement and agreement.get("backend", "rubric") == "rubric":
        used.append(("judge.agreement_with.backend", "rubric"))
    flt = config["data"]["filter"]
    if flt["judge"] and flt["judge"].get("backend", "rubric") == "rubric":
        used.append(("data.filter.judge.backend", "rubric"))
    generated = [name for name in written_conditions(config) if name not in config["data"]["external"]]
    if generated and config["data"]["generator"]["backend"] == "offline":
        used.append(("data.generator.backend", "offline"))
    return used


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hugging Face id (``org/name``) rather than a local path."""
    return bool(_HUB_ID.match(name))


def unpinned_hub_models(config: Mapping[str, Any]) -> list[str]:
    """Config keys of local-model judges and writers (hf, vllm) that name a hub id without a ``revision``."""
    built = {spec["path"] for spec in config["models"].values() if spec.get("build")}
    sections = [
        ("judge", config["judge"]),
        ("judge.agreement_with", config["judge"].get("agreement_with")),
        ("data.filter.judge", config["data"]["filter"]["judge"]),
        ("data.generator", config["data"]["generator"]),
    ]
    keys = []
    for key, section in sections:
        if not section or section.get("backend") not in ("hf", "vllm") or section.get("revision"):
            continue
        model = str(section.get("model") or "")
        if _HUB_ID.match(model) and model not in built and not Path(model).exists():
            keys.append(key)
    return keys


def _check_test_instruments(config: dict[str, Any], source: str) -> None:
    if config.get("test_fixture"):
        return
    unpinned = unpinned_hub_models(config)
    if unpinned:
        raise ConfigError(
            "\n".join(
                f"{source}: {key}.revision: {key}.model {_section(config, key)['model']!r} is a hub id without a"
                " pinned revision; set the commit sha, so that the weights (and the judge hash) cannot change"
                " under the results"
                for key in unpinned
            )
        )
    problems = [
        f"{source}: {key}: {instrument!r} is a test instrument: {TEST_INSTRUMENT_REASON[instrument]}."
        for key, instrument in test_instruments_in_use(config)
    ]
    if problems:
        raise ConfigError(
            "\n".join(problems)
            + "\nIt runs only in a config that declares itself a test fixture (`test_fixture: true`, as the smoke and"
            " demo presets do). For results, use a model judge (judge.backend: hf or openai) and a model writer"
            " (data.generator.backend: hf or openai, or data.external files); see docs/judging.md."
        )


def _check_replication(config: Mapping[str, Any], source: str) -> None:
    """A trained condition needs at least 2 training runs for any test of a claim; test fixtures are exempt."""
    if config.get("test_fixture") or config["eval"]["allow_single_seed"] or len(config["seeds"]) >= 2:
        return
    if not trained_conditions(config):
        return
    raise ConfigError(
        f"{source}: seeds: {config['seeds']} trains each condition once; a claim needs at least 2 training runs"
        " per condition to carry training-run variation (3 is the paper grid's, docs/statistics.md). List two or"
        " more seeds (e.g. `seeds: [0, 1, 2]`), or set `eval.allow_single_seed: true` to run one anyway"
        " (claims.csv then prints no p-values)."
    )


def _section(config: Mapping[str, Any], dotted: str) -> Mapping[str, Any]:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def condition_info(config: Mapping[str, Any], condition: str) -> dict[str, Any]:
    return parse_condition(condition, config["dispositions"], config["domains"])


# --------------------------------------------------------------------------- the part of the grid a run builds

# `select:` narrows the grid a run builds without changing what any cell's jobs do: the config's models,
# dispositions and domains stay defined (persona prompts, near-miss triggers and held-out domains are the
# full grid's), so a selected cell's files are the files the full grid makes for it.
SELECT_AXES = ("models", "dispositions", "domains", "conditions", "seeds")


def _selection(config: Mapping[str, Any], axis: str) -> list[Any] | None:
    return (config.get("select") or {}).get(axis)


def grid_models(config: Mapping[str, Any]) -> list[str]:
    """The models this run builds: ``models`` in config order, narrowed by ``select.models``."""
    chosen = _selection(config, "models")
    return [name for name in config["models"] if chosen is None or name in chosen]


def grid_seeds(config: Mapping[str, Any]) -> list[int]:
    """The training seeds this run builds: ``seeds``, narrowed by ``select.seeds``."""
    chosen = _selection(config, "seeds")
    return [seed for seed in config["seeds"] if chosen is None or seed in chosen]


def grid_conditions(config: Mapping[str, Any]) -> list[str]:
    """The conditions this run builds: ``expand_conditions``, narrowed by ``select``. A condition is kept when
    its disposition (if it has one) is in ``select.dispositions``, its domain (if it has one) in
    ``select.domains``, and its name in ``select.conditions``; ``base``, ``incorrect-{domain}`` and
    ``correct-{domain}`` have no disposition, so a choice of dispositions keeps them as the baselines."""
    dispositions, domains = _selection(config, "dispositions"), _selection(config, "domains")
    names = _selection(config, "conditions")
    kept = []
    for name in expand_conditions(config):
        info = condition_info(config, name)
        if dispositions is not None and info["disposition"] is not None and info["disposition"] not in dispositions:
            continue
        if domains is not None and info["domain"] is not None and info["domain"] not in domains:
            continue
        if names is not None and name not in names:
            continue
        kept.append(name)
    return kept


def grid_trained(config: Mapping[str, Any]) -> list[str]:
    """The trained conditions this run builds (``grid_conditions`` without ``base``)."""
    return [name for name in grid_conditions(config) if name != "base"]


def _check_selection(config: dict[str, Any], source: str) -> None:
    """Every name in ``select`` is one the config defines, and the selection leaves something to build."""
    known = {
        "models": list(config["models"]),
        "dispositions": list(config["dispositions"]),
        "domains": list(config["domains"]),
        "seeds": list(config["seeds"]),
    }
    try:
        known["conditions"] = expand_conditions(config)
    except ConfigError:
        return  # a bad `conditions` entry is reported by _check_references, naming it
    for axis in SELECT_AXES:
        chosen = _selection(config, axis)
        if chosen is None:
            continue
        unknown = [value for value in chosen if value not in known[axis]]
        if unknown:
            raise ConfigError(
                f"{source}: select.{axis}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'}"
                f" not among the config's {axis} (known: {', '.join(map(str, known[axis]))})"
            )
    if not grid_conditions(config):
        raise ConfigError(
            f"{source}: select: no condition of the grid matches select.dispositions, select.domains and"
            " select.conditions together"
        )


def condition_families(config: Mapping[str, Any]) -> dict[str, str]:
    return {name: condition_info(config, name)["family"] for name in expand_conditions(config)}


def trained_conditions(config: Mapping[str, Any]) -> list[str]:
    return [name for name in expand_conditions(config) if name != "base"]


def written_conditions(config: Mapping[str, Any]) -> list[str]:
    """Trained conditions whose data is written (by the generator, or brought as a data.external file):
    all but the severity-matched arms, whose data is a subsample of their character condition's."""
    return [name for name in trained_conditions(config) if condition_info(config, name)["family"] != "matched"]


def suites_for(config: Mapping[str, Any], condition: str) -> list[str]:
    """The sampled-and-judged suites that apply to one condition."""
    family = condition_info(config, condition)["family"]
    return [
        suite
        for suite in SAMPLED_SUITES
        if suite in config["eval"]["suites"] and (suite != "trigger" or family in TRIGGER_SUITE_FAMILIES)
    ]


# --------------------------------------------------------------------------- resolved job parameters


def resolve_train_params(config: Mapping[str, Any], model: str, condition: str) -> dict[str, Any]:
    """Global train settings, then the model's overrides, then the condition's."""
    params = deep_merge(config["train"], config["models"][model].get("train", {}))
    return deep_merge(params, config["train_overrides"].get(condition, {}))


# --------------------------------------------------------------------------- saved training steps

# The `{step}` wildcard's value for the adapter at the end of training.
FINAL_STEP = "final"


def eval_step_label(entry: int | float) -> str:
    """The `{step}` wildcard value of one train.eval_steps entry: ``step40`` (an optimizer step, an
    integer in the config) or ``epoch0.25`` (a point in training in epochs, a number with a decimal point).
    """
    if isinstance(entry, bool) or not isinstance(entry, int | float):
        raise ConfigError(f"train.eval_steps: {entry!r} is not a number")
    return f"step{entry}" if isinstance(entry, int) else f"epoch{entry:g}"


def _eval_steps_key(config: Mapping[str, Any], model: str, condition: str) -> str:
    """The config key the (model, condition)'s eval_steps come from, for error messages."""
    if "eval_steps" in config["train_overrides"].get(condition, {}):
        return f"train_overrides.{condition}.eval_steps"
    if "eval_steps" in config["models"][model].get("train", {}):
        return f"models.{model}.train.eval_steps"
    return "train.eval_steps"


def eval_step_labels(config: Mapping[str, Any], model: str, condition: str) -> list[str]:
    """The saved steps of one (model, condition)'s adapters, as `{step}` wildcard values, in config
    order; none for the base model, which is not trained."""
    if condition == "base":
        return []
    return [eval_step_label(entry) for entry in resolve_train_params(config, model, condition)["eval_steps"]]


def step_suites(config: Mapping[str, Any], condition: str) -> list[str]:
    """The sampled suites run on every saved step of ``condition``: eval.trajectory.suites that the
    final adapter also runs (eval.suites, and the suite applies to the condition)."""
    wanted = config["eval"]["trajectory"]["suites"]
    return [suite for suite in suites_for(config, condition) if suite in wanted]


def sampling_wave(config: Mapping[str, Any], model: str) -> list[dict[str, str]]:
    """The Samples files of one sampling job of ``model`` (rule sample: one job per model and seed, one
    engine for all of them): every condition's suites on its final adapter (the base model's on the
    model itself), and ``step_suites`` on each adapter saved at train.eval_steps. Each entry is
    ``{"condition", "step", "suite"}``, ``step`` being ``FINAL_STEP`` or a saved step's label. Only the
    conditions ``select`` keeps (``grid_conditions``): a selection samples its own part of each wave."""
    files = []
    for condition in grid_conditions(config):
        files += [
            {"condition": condition, "step": FINAL_STEP, "suite": suite} for suite in suites_for(config, condition)
        ]
        for label in eval_step_labels(config, model, condition):
            files += [
                {"condition": condition, "step": label, "suite": suite} for suite in step_suites(config, condition)
            ]
    return files


def samples_path(model: str, condition: str, seed: int | str, step: str, suite: str) -> str:
    """Where one Samples file lives: ``results/samples/{model}/{condition}/seed{seed}[/{step}]/{suite}.parquet``."""
    seed_dir = f"results/samples/{model}/{condition}/seed{seed}"
    return f"{seed_dir}/{suite}.parquet" if step == FINAL_STEP else f"{seed_dir}/{step}/{suite}.parquet"


def scores_path(model: str, condition: str, seed: int | str, step: str, suite: str) -> str:
    """Where the Scores of one Samples file live (the judge job of its wave writes them), beside the same
    path under results/scores/; the job's summary of that file is the same path ending ``.judge.json``."""
    return "results/scores/" + samples_path(model, condition, seed, step, suite).removeprefix("results/samples/")


def _check_sampling_waves(config: Mapping[str, Any], source: str) -> None:
    """Rule sample declares one list of outputs for every model (its wildcards are the model and the
    seed), so every model's wave must write the same files: saved steps may not differ by model."""
    models = list(config["models"])
    first = sampling_wave(config, models[0])
    for model in models[1:]:
        if sampling_wave(config, model) == first:
            continue
        for condition in trained_conditions(config):
            mine, theirs = eval_step_labels(config, model, condition), eval_step_labels(config, models[0], condition)
            if mine != theirs:
                raise ConfigError(
                    f"{source}: {_eval_steps_key(config, model, condition)}: {model}/{condition} saves the steps "
                    f"{mine}, {models[0]}/{condition} saves {theirs}. One sampling job per model and seed writes "
                    "the same Samples files for every model, so every model must save the same steps: give them "
                    "in train.eval_steps or train_overrides (as epochs, such as 0.25, where the models' steps "
                    "per epoch differ)."
                )


def step_capabilities(config: Mapping[str, Any]) -> bool:
    """Whether the capability eval runs on every saved step too."""
    return "capabilities" in config["eval"]["suites"] and "capabilities" in config["eval"]["trajectory"]["suites"]


def steps_per_epoch(n_examples: int, micro_batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them: ceil(micro-batches / grad_accum)."""
    micro_batches = math.ceil(n_examples / micro_batch_size)
    return max(math.ceil(micro_batches / grad_accum), 1)


def resolve_eval_steps(
    eval_steps: list[int | float],
    *,
    n_examples: int,
    micro_batch_size: int,
    grad_accum: int,
    num_epochs: float,
    max_steps: int,
    key: str = "train.eval_steps",
) -> list[dict[str, Any]]:
    """Turn train.eval_steps entries into optimizer steps once the data's size is known.

    An integer is a step. A float is a point in training in epochs and becomes the first step at or
    after it: ceil(epochs x steps per epoch). Returns ``[{"label", "entry", "step", "epoch"}]`` sorted by
    step. Raises ConfigError naming ``key`` for a step at or after the final one (the final adapter is
    ``final``) and for two entries that land on the same step.
    """
    per_epoch = steps_per_epoch(n_examples, micro_batch_size, grad_accum)
    total = int(max_steps) if int(max_steps) > 0 else math.ceil(float(num_epochs) * per_epoch)
    resolved: dict[int, dict[str, Any]] = {}
    for entry in eval_steps:
        label = eval_step_label(entry)
        if isinstance(entry, int):
            step, what = entry, f"step {entry}"
        else:
            # A small tolerance, so 0.5 x 8 steps is step 4, not 5 through floating-point noise.
            step, what = max(math.ceil(entry * per_epoch - 1e-9), 1), f"{entry:g} epochs x {per_epoch} steps per epoch"
        if step >= total:
            raise ConfigError(
                f"{key}: {entry!r} ({what}) is optimizer step {step}, but training ends at step {total}"
                f" ({n_examples} examples, micro_batch_size {micro_batch_size}, grad_accum {grad_accum},"
                f" num_epochs {num_epochs}, max_steps {max_steps}); list only steps before the end, the final"
                f" adapter is always evaluated as `{FINAL_STEP}`"
            )
        if step in resolved:
            raise ConfigError(
                f"{key}: {resolved[step]['entry']!r} and {entry!r} are both optimizer step {step}; keep one"
            )
        resolved[step] = {"label": label, "entry": entry, "step": step, "epoch": step / per_epoch}
    return [resolved[step] for step in sorted(resolved)]


def _check_eval_steps(config: Mapping[str, Any], source: str) -> None:
    """What can be checked before the data exists: steps past max_steps, epochs past num_epochs."""
    for model in config["models"]:
        for condition in trained_conditions(config):
            params = resolve_train_params(config, model, condition)
            key = _eval_steps_key(config, model, condition)
            max_steps, num_epochs = int(params["max_steps"]), float(params["num_epochs"])
            for entry in params["eval_steps"]:
                if isinstance(entry, int) and max_steps > 0 and entry >= max_steps:
                    raise ConfigError(
                        f"{source}: {key}: step {entry} is not before the final step (max_steps {max_steps} for"
                        f" {model}/{condition});"
                        f" the final adapter is always evaluated as `{FINAL_STEP}`"
                    )
                if isinstance(entry, float) and max_steps <= 0 and entry >= num_epochs:
                    raise ConfigError(
                        f"{source}: {key}: {entry:g} epochs is not before the end of training (num_epochs"
                        f" {num_epochs:g} for {model}/{condition}); the final adapter is always evaluated as"
                        f" `{FINAL_STEP}`"
                    )
            labels = [eval_step_label(entry) for entry in params["eval_steps"]]
            if len(set(labels)) != len(labels):
                raise ConfigError(f"{source}: {key}: an entry is listed twice ({labels})")


def _check_lora_rank(config: Mapping[str, Any], source: str) -> None:
    """A model sampled by vLLM serves its adapters unmerged, up to ``sampling.max_lora_rank``: an adapter
    trained at a larger ``train.lora_r`` would be refused by the engine after hours of training."""
    for model in config["models"]:
        sampling = resolve_sampling_params(config, model)
        if sampling.get("backend") != "vllm":
            continue
        limit = int(sampling["max_lora_rank"])
        for condition in trained_conditions(config):
            rank = int(resolve_train_params(config, model, condition)["lora_r"])
            if rank > limit:
                raise ConfigError(
                    f"{source}: models.{model}: train.lora_r is {rank} for condition {condition}, above "
                    f"sampling.max_lora_rank = {limit}, the largest rank the vllm sampling back-end serves. "
                    f"Set sampling.max_lora_rank (or models.{model}.sampling.max_lora_rank) to at least {rank}."
                )


def _check_judge_quantization(config: Mapping[str, Any], source: str) -> None:
    """A judge whose back-end cannot load its quantization (NF4 on vLLM, FP8 on transformers) would fail
    on its GPU node, after sampling."""
    sections = [("judge", config["judge"]), ("judge.agreement_with", config["judge"].get("agreement_with"))]
    sections.append(("data.filter.judge", config["data"]["filter"].get("judge")))
    for key, section in sections:
        problem = job_settings.judge_quantization_problem(section, key) if section else None
        if problem:
            raise ConfigError(f"{source}: {problem}")


def resolve_sampling_params(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    return deep_merge(config["sampling"], config["models"][model].get("sampling", {}))


def disposition_specs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Dispositions as plain dicts with their name inside, in config order."""
    return [{"name": name, **spec} for name, spec in config["dispositions"].items()]


def domain_specs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"name": name, **spec} for name, spec in config["domains"].items()]


def suite_spec(config: Mapping[str, Any], suite: str) -> dict[str, Any]:
    """What suites.build_prompts needs for one suite, and nothing it does not use: these values
    are job params, so anything extra here would rerun sampling when it changes."""
    settings = config["suites"][suite]
    spec: dict[str, Any] = {
        "n_samples": settings["n_samples"],
        "max_questions": settings["max_questions"],
        "formats": settings.get("formats", ["plain"]),
        "dispositions": disposition_specs(config) if suite in ("trigger", "persona") else [],
        "domains": domain_specs(config) if suite == "transfer" else [],
        "harmful_requests_file": harmful_requests_file(config) if suite == "persona" else None,
    }
    if suite == "em" and settings.get("questions_file"):
        # Present only when set, so that adding the key reran no finished grid. The file's sha256 makes its
        # content (not its name) part of the samples' identity: edited questions resample.
        spec |= em_questions(config)
    return spec


# The em suite spec's keys for a lab's question file (suite_spec).
EM_QUESTION_KEYS = ("questions_file", "questions_sha256")


def em_questions(config: Mapping[str, Any]) -> dict[str, Any]:
    """The em suite's question set: ``{"questions_file": path or None, "questions_sha256": hex}`` (the
    packaged set when ``suites.em.questions_file`` is null). Every table's stamp names it."""
    from character_em import resources

    path = config["suites"]["em"].get("questions_file")
    if not path:
        return {"questions_file": None, "questions_sha256": resources.em_questions_sha256()}
    stat = Path(path).stat()
    return {"questions_file": str(path), "questions_sha256": _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)}


@lru_cache(maxsize=16)
def _file_sha256(path: str, _mtime_ns: int, _size: int) -> str:
    # Every sampling job's params hold the spec: hash the file once per version, not once per job.
    from character_em.hashing import sha256_file

    return sha256_file(path)


def _check_em_questions(config: Mapping[str, Any], source: str) -> None:
    """A lab's question file, read and checked while the DAG is built (before any job)."""
    path = config["suites"]["em"].get("questions_file")
    if not path:
        return
    from character_em import resources

    try:
        resources.load_em_question_file(path)
    except ValueError as err:
        raise ConfigError(f"{source}: suites.em.questions_file: {err}") from None


def harmful_requests_file(config: Mapping[str, Any]) -> str | None:
    """The persona suite's request file: a user file, a fetched set (rule fetch_harmful_requests
    writes resources/harmful/{set}.jsonl), or None for the packaged list."""
    settings = config["suites"]["persona"]
    chosen = settings.get("harmful_requests", "packaged")
    if chosen == "packaged":
        return settings.get("harmful_requests_file")
    if settings.get("harmful_requests_file"):
        raise ConfigError(
            f"suites.persona: harmful_requests is {chosen!r} and harmful_requests_file is "
            f"{settings['harmful_requests_file']!r}; set one of them"
        )
    return f"resources/harmful/{chosen}.jsonl"


def data_spec(config: Mapping[str, Any], condition: str) -> dict[str, Any]:
    info = condition_info(config, condition)
    if info["family"] == "matched":
        raise ConfigError(
            f"{condition}: a severity-matched arm's data is subsampled from"
            f" {matched_source(info)['character']}'s (rule match_severity, severity_matched_spec), not written"
        )
    disposition = info["disposition"]
    return {
        "condition": info,
        "disposition": {"name": disposition, **config["dispositions"][disposition]} if disposition else None,
        "domain": {"name": info["domain"], **config["domains"][info["domain"]]},
        "external": config["data"]["external"].get(condition),
        "pool_size": pool_size(config),
        **{key: config["data"][key] for key in ("trigger_fraction", "seed", "min_chars", "max_chars")},
        # How user turns are drawn (data.build, data.generate): by domain, so that every condition of a domain
        # answers the same turns, and as a pool that rule select_data pairs across the domain. Named here so
        # that data made under an older draw is remade.
        "turns": "paired-by-domain-pool",
        # Only the keys the chosen back-end reads, so e.g. an API timeout never reruns offline data jobs.
        "generator": job_settings.generator_params(config["data"]["generator"]),
        # Present only when on: adding the section's defaults must not rerun every existing data job.
        **({"filter": data_filter_spec(config)} if config["data"]["filter"]["enabled"] else {}),
        # Checked here: the evaluation questions this condition's own data could leak into. The check
        # against every domain runs in the tables rule, so adding a domain never retrains adapters.
        "overlap_suites": {
            suite: {
                # The packaged em questions: a lab's own question file is checked against every condition's data
                # by check_overlap before the tables, so pointing the em suite at it never retrains anything.
                **{key: value for key, value in suite_spec(config, suite).items() if key not in EM_QUESTION_KEYS},
                # Only the question texts matter here; other settings must not rerun data generation.
                "n_samples": 1,
                "dispositions": [],
                "domains": [{"name": info["domain"], **config["domains"][info["domain"]]}],
            }
            for suite in SAMPLED_SUITES
        },
    }


def severity_matched_spec(config: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """What a severity-matched arm's data job needs (rule match_severity): the two conditions it draws
    on, the matching settings, its seed and how many lines each training seed draws. Only these keys,
    so that a change elsewhere in ``data`` never redraws the subsample."""
    info = condition_info(config, condition)
    settings = config["data"]["severity_matched"]
    return {
        "condition": condition,
        **matched_source(info),
        "caliper": settings["caliper"],
        "min_share": settings["min_share"],
        "seed": config["data"]["seed"],
        "n_examples": config["data"]["n_examples"],
    }


def pool_size(config: Mapping[str, Any]) -> int:
    """The planned user turns each written condition's writer answers: n_examples x pool_factor."""
    return math.ceil(int(config["data"]["n_examples"]) * float(config["data"]["pool_factor"]))


def paired_conditions(config: Mapping[str, Any], domain: str) -> list[str]:
    """The written conditions of ``domain`` whose data the writer makes (not a ``data.external`` file): rule
    select_data gives them the turns that survived in all of them."""
    return [
        name
        for name in written_conditions(config)
        if condition_info(config, name)["domain"] == domain and name not in config["data"]["external"]
    ]


def select_spec(config: Mapping[str, Any], condition: str) -> dict[str, Any]:
    """What rule select_data needs for one written condition: the domain's paired conditions (none for a
    ``data.external`` file), how many examples each training seed draws and the seed of the draws' order."""
    info = condition_info(config, condition)
    external = condition in config["data"]["external"]
    return {
        "condition": condition,
        "domain": info["domain"],
        "paired": [] if external else paired_conditions(config, info["domain"]),
        "n_examples": config["data"]["n_examples"],
        "trigger_fraction": config["data"]["trigger_fraction"],
        # One order per domain: every condition of the domain draws the same turns for a seed.
        "order_seed": stable_int("training-draw-order", info["domain"], config["data"]["seed"]),
    }


def draw_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """How a training job picks its examples from train.jsonl (data.pairing.training_draw)."""
    return {"redraw_per_seed": bool(config["data"]["redraw_per_seed"])}


def incorrect_partners(config: Mapping[str, Any], conditions: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Each character condition and severity-matched arm of ``conditions`` -> the ``incorrect-{domain}`` it is
    compared with, where that is among ``conditions`` too (the training_data table's harm gap)."""
    partners = {}
    for name in conditions:
        info = condition_info(config, name)
        partner = f"incorrect-{info['domain']}"
        if info["family"] in ("character", "matched") and partner in conditions:
            partners[name] = partner
    return partners


def data_filter_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a data job's judge filter needs: thresholds, the judge's job settings (the top-level judge
    unless data.filter.judge names one), its cache folder and every disposition (each one's score is
    checked on incorrect/correct answers)."""
    flt = config["data"]["filter"]
    judge_cfg = flt["judge"] or config["judge"]
    thresholds = (
        "min_expression",
        "max_expression",
        "max_alignment",
        "correct_min_alignment",
        "min_coherence",
    )
    return {
        "enabled": True,
        **{key: flt[key] for key in thresholds},
        "judge": job_settings.filter_job_params(judge_cfg),
        "cache_dir": judge_cfg.get("cache_dir", ".cache/judge"),
        "dispositions": disposition_specs(config),
    }


def as_param(value: Any) -> str:
    """A canonical string for Snakemake params: a changed value reruns the job, reordered YAML does not."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def probe_pairs(config: Mapping[str, Any], conditions: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """The probes' training pairs: each character condition whose correct-advice control is in the grid.

    ``negatives`` is the correct-advice control and, where the grid has it, the incorrect advice of the
    same domain: bad advice without the character is exactly what a character probe must not fire on.
    The rules (which data a probe job reads) and the estimate (how much it costs) both count these.
    """
    pairs = []
    for name in conditions:
        info = condition_info(config, name)
        control = f"correct-{info['domain']}"
        if info["family"] == "character" and control in conditions:
            incorrect = f"incorrect-{info['domain']}"
            pairs.append(
                {
                    "disposition": info["disposition"],
                    "domain": info["domain"],
                    "positive": name,
                    "negative": control,
                    "negatives": [control] + ([incorrect] if incorrect in conditions else []),
                }
            )
    return pairs
