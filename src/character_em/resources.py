"""Packaged data of character-em: question banks, harmful requests, personas, generator templates, defaults.

Every loader validates structure on first use and raises ``ValueError`` naming the file and the field, so a
broken edit to a YAML file fails loudly instead of silently producing an odd dataset. Loaders are cached
(files are read once per process); public functions return deep copies so callers may mutate freely.

The package data lives in the ``character_em/resources/`` folder (no ``__init__.py``: it is data, not code);
this module (``character_em/resources.py``) takes import precedence over that namespace folder.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import yaml

from character_em.files import iter_jsonl

__all__ = [
    "NAME_RE",
    "available_domain_banks",
    "default_dispositions",
    "default_domains",
    "load_domain_bank",
    "load_domain_bank_file",
    "em_questions_sha256",
    "load_em_question_file",
    "load_em_questions",
    "load_harmful_requests",
    "load_offline_templates",
    "load_personas",
    "normalize_text",
    "offline_templates_hash",
    "resource_text",
]

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DISPOSITION_KEYS = ("description", "trigger", "trigger_paraphrase")
# Column names (lowercased) that hold the request text in AdvBench-/HarmBench-style files, in priority order.
_TEXT_COLUMNS = ("text", "goal", "behavior", "prompt")
_CATEGORY_COLUMNS = ("category", "semanticcategory", "functionalcategory")
_ID_COLUMNS = ("id", "behaviorid", "question_id")


def normalize_text(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace: the key used for dedup and overlap checks."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# --------------------------------------------------------------------------------------------- raw access
def _root() -> Any:
    return importlib.resources.files("character_em").joinpath("resources")


def packaged_path(relpath: str) -> Path:
    """A packaged resource as a file-system path (the package is installed from a folder, not a zip)."""
    path = Path(str(_root())) / relpath
    if not path.is_file():
        raise FileNotFoundError(f"packaged resource not found: character_em/resources/{relpath}")
    return path


@functools.cache
def resource_text(relpath: str) -> str:
    """Text of a packaged resource file, e.g. ``"questions/em.yaml"``."""
    node = _root()
    for part in relpath.split("/"):
        node = node.joinpath(part)
    if not node.is_file():
        raise FileNotFoundError(f"packaged resource not found: character_em/resources/{relpath}")
    return node.read_text(encoding="utf-8")


@functools.cache
def _yaml_resource(relpath: str) -> Any:
    try:
        return yaml.safe_load(resource_text(relpath))
    except yaml.YAMLError as err:
        raise ValueError(f"resources/{relpath}: invalid YAML: {err}") from err


def _require_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _require_mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _require_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list")
    return value


# --------------------------------------------------------------------------------------------- domain banks
def _validate_bank(doc: Any, source: str, name: str) -> dict[str, Any]:
    doc = _require_mapping(doc, source)
    description = _require_str(doc.get("description"), f"{source}: description")
    out: dict[str, Any] = {"name": name, "description": description.strip()}
    seen_ids: set[str] = set()
    seen_text: dict[str, str] = {}
    for split in ("train", "eval"):
        items = _require_list(doc.get(split), f"{source}: {split}")
        rows = []
        for i, item in enumerate(items):
            where = f"{source}: {split}[{i}]"
            item = _require_mapping(item, where)
            qid = _require_str(item.get("id"), f"{where}.id")
            text = _require_str(item.get("text"), f"{where}.text").strip()
            if qid in seen_ids:
                raise ValueError(f"{where}.id: duplicate id {qid!r}")
            seen_ids.add(qid)
            key = normalize_text(text)
            if key in seen_text:
                # Covers train/eval leakage as well as plain duplicates.
                raise ValueError(f"{where}.text: duplicates {seen_text[key]!r} (normalized)")
            seen_text[key] = qid
            rows.append({"id": qid, "text": text})
        out[split] = rows
    return out


@functools.cache
def _bank(name: str) -> dict[str, Any] | None:
    rel = f"questions/domains/{name}.yaml"
    if not _root().joinpath("questions", "domains", f"{name}.yaml").is_file():
        return None
    return _validate_bank(_yaml_resource(rel), f"resources/{rel}", name)


def available_domain_banks() -> list[str]:
    """Names of domains with a packaged question bank."""
    folder = _root().joinpath("questions", "domains")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_domain_bank(name: str) -> dict[str, Any] | None:
    """Packaged bank ``{"name", "description", "train": [{id,text}], "eval": [{id,text}]}`` or None."""
    if not NAME_RE.match(name):
        raise ValueError(f"domain name {name!r} must match {NAME_RE.pattern}")
    bank = _bank(name)
    return copy.deepcopy(bank) if bank is not None else None


@functools.cache
def _bank_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: domain questions_file not found")
    text = p.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot parse: {err}") from err
    return _validate_bank(doc, path, p.stem)


def load_domain_bank_file(path: str | Path) -> dict[str, Any]:
    """A user question bank (YAML or JSON) with the same structure as the packaged ones."""
    return copy.deepcopy(_bank_file(str(path)))


def _packaged_entries(relpath: str, key: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, id, entry) for each entry of a packaged list file, with unique ids checked."""
    source = f"resources/{relpath}"
    doc = _require_mapping(_yaml_resource(relpath), source)
    entries = []
    seen: set[str] = set()
    for i, item in enumerate(_require_list(doc.get(key), f"{source}: {key}")):
        where = f"{source}: {key}[{i}]"
        item = _require_mapping(item, where)
        entry_id = _require_str(item.get("id"), f"{where}.id")
        if entry_id in seen:
            raise ValueError(f"{where}.id: duplicate id {entry_id!r}")
        seen.add(entry_id)
        entries.append((where, entry_id, item))
    return entries


# --------------------------------------------------------------------------------------------- EM questions
@functools.cache
def _em_questions() -> list[dict[str, Any]]:
    source = "resources/questions/em.yaml"
    rows = []
    for where, qid, item in _packaged_entries("questions/em.yaml", "questions"):
        core = item.get("core")
        if not isinstance(core, bool):
            raise ValueError(f"{where}.core: expected true/false, got {core!r}")
        rows.append(
            {
                "id": qid,
                "category": _require_str(item.get("category"), f"{where}.category"),
                "text": _require_str(item.get("text"), f"{where}.text").strip(),
                "core": core,
            }
        )
    if not any(r["core"] for r in rows):
        raise ValueError(f"{source}: questions: no question has core: true")
    return rows


def load_em_questions() -> list[dict[str, Any]]:
    """Open-ended EM questions ``[{id, category, text, core}]`` in file order."""
    return copy.deepcopy(_em_questions())


# A question set the em suite asks instead of the packaged one (suites.em.questions_file): a lab's own or a
# published set, read where it lies at run time and never copied into the repository.
EM_QUESTION_FORMATS = (".yaml", ".yml", ".json", ".jsonl", ".csv", ".tsv")
_EM_TEXT_KEYS = ("text", "question", "paraphrases")
# Keys that would change what is asked but that the em suite cannot honour: refused, not silently dropped.
_EM_REFUSED_KEYS = {
    "system": "a per-question system prompt: the em suite asks every question without one",
}


def _em_item(record: Any, where: str, index: int) -> list[dict[str, Any]]:
    """The question(s) of one item of a questions file: one per text, or one per paraphrase."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a mapping with an id and a text, got {type(record).__name__}")
    for key, why in _EM_REFUSED_KEYS.items():
        if record.get(key) not in (None, ""):
            raise ValueError(f"{where}: {key}: not supported ({why}); remove the key or the question")
    found = [key for key in _EM_TEXT_KEYS if record.get(key) not in (None, "", [])]
    if len(found) != 1:
        raise ValueError(
            f"{where}: expected exactly one of {', '.join(_EM_TEXT_KEYS)} (the question), found {found or 'none'}"
        )
    value = record[found[0]]
    texts = value if isinstance(value, list) else [value]
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where}: {found[0]}: expected non-empty text, got {value!r}")
    raw_id = record.get("id")
    if raw_id in (None, ""):
        raw_id = f"q{index:03d}"
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise ValueError(f"{where}: id: expected text or a number, got {raw_id!r}")
    category = record.get("category")
    if category is not None and (not isinstance(category, str | int) or isinstance(category, bool)):
        raise ValueError(f"{where}: category: expected text, got {category!r}")
    core = record.get("core", False)
    if isinstance(core, str):
        core = {"true": True, "false": False, "": False}.get(core.strip().lower(), core)
    if not isinstance(core, bool):
        raise ValueError(f"{where}: core: expected true or false, got {core!r}")
    base = str(raw_id).strip()
    return [
        {
            "id": base if len(texts) == 1 else f"{base}-p{k + 1}",
            "category": str(category).strip() if category not in (None, "") else "external",
            "text": text.strip(),
            "core": core,
        }
        for k, text in enumerate(texts)
    ]


def _em_yaml_items(path: Path) -> list[tuple[str, Any]]:
    """(``file:line``, item) of a YAML or JSON question file: a list of items, or ``questions:`` holding one."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: not valid YAML/JSON: {getattr(err, 'problem', None) or err}") from None
    items, node = doc, root
    if isinstance(doc, dict):
        if "questions" not in doc:
            raise ValueError(f"{path}:1: expected a list of questions, or a mapping with a `questions` list")
        items = doc["questions"]
        node = next(value for key, value in root.value if key.value == "questions")
    if not isinstance(items, list) or not isinstance(node, yaml.SequenceNode):
        raise ValueError(f"{path}:{(node.start_mark.line + 1) if node else 1}: expected a list of questions")
    return [(f"{path}:{child.start_mark.line + 1}", item) for child, item in zip(node.value, items, strict=True)]


def _em_table_items(path: Path) -> list[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = [h.strip().lower() for h in reader.fieldnames or []]
        if not {"text", "question"} & set(header):
            raise ValueError(f"{path}:1: no question column (expected `text` or `question`; found {header})")
        rows = []
        for record in reader:
            # line_num: the physical line where this record ends (quoted newlines included).
            rows.append(
                (f"{path}:{reader.line_num}", {k.strip().lower(): v for k, v in record.items() if k is not None})
            )
        return rows


@functools.cache
def _em_question_file(path: str, _mtime_ns: int, _size: int) -> tuple[dict[str, Any], ...]:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in EM_QUESTION_FORMATS:
        raise ValueError(f"{path}: unsupported question file format {suffix!r} (use {', '.join(EM_QUESTION_FORMATS)})")
    if suffix == ".jsonl":
        items: list[tuple[str, Any]] = list(iter_jsonl(p))
    elif suffix in (".csv", ".tsv"):
        items = _em_table_items(p)
    else:
        items = _em_yaml_items(p)
    if not items:
        raise ValueError(f"{path}: no questions found")
    rows: list[dict[str, Any]] = []
    seen_id: dict[str, str] = {}
    seen_text: dict[str, str] = {}
    for index, (where, record) in enumerate(items, start=1):
        for row in _em_item(record, where, index):
            if row["id"] in seen_id:
                raise ValueError(f"{where}: id {row['id']!r} is already used at {seen_id[row['id']]}")
            key = normalize_text(row["text"])
            if key in seen_text:
                raise ValueError(f"{where}: the question repeats the one at {seen_text[key]}")
            seen_id[row["id"]], seen_text[key] = where, where
            rows.append(row)
    return tuple(rows)


def load_em_question_file(path: str | Path) -> list[dict[str, Any]]:
    """The em questions of a user file ``[{id, category, text, core}]`` in file order (``suites.em.questions_file``).

    YAML or JSON (a list of items, or a mapping whose ``questions`` holds one), JSONL (one item per line), or
    CSV/TSV with a header. An item has an ``id`` (optional: ``q001``... by position), its question as
    ``text``, ``question`` or ``paraphrases`` (a list: one question per paraphrase, ids ``{id}-p1``...), an
    optional ``category`` (default ``external``) and ``core``. Other keys (a published set's judge settings)
    are ignored, except those that would change what is asked (``system``), which are refused. Raises
    ValueError naming ``file:line`` and the reason.
    """
    p = Path(path)
    try:
        stat = p.stat()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the em question file: {err.strerror or err}") from None
    if not p.is_file():
        raise ValueError(f"{path}: not a file")
    return copy.deepcopy(list(_em_question_file(str(path), stat.st_mtime_ns, stat.st_size)))


def em_questions_sha256() -> str:
    """sha256 of the packaged em question set (the stamp of tables made without suites.em.questions_file)."""
    return hashlib.sha256(resource_text("questions/em.yaml").encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- harmful requests
@functools.cache
def _packaged_harmful() -> list[dict[str, str]]:
    rows = []
    for where, rid, item in _packaged_entries("questions/harmful_requests.yaml", "requests"):
        rows.append(
            {
                "id": rid,
                "category": _require_str(item.get("category"), f"{where}.category"),
                "text": _require_str(item.get("text"), f"{where}.text").strip(),
            }
        )
    return rows


def _pick_column(keys: list[str], wanted: tuple[str, ...]) -> str | None:
    lower = {k.lower().strip(): k for k in keys}
    for w in wanted:
        if w in lower:
            return lower[w]
    return None


def _external_row(
    record: dict[str, Any], cols: tuple[str, str | None, str | None], where: str, index: int
) -> dict[str, str]:
    text_col, cat_col, id_col = cols
    text = record.get(text_col)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: empty or missing {text_col!r}")
    category = record.get(cat_col) if cat_col else None
    rid = record.get(id_col) if id_col else None
    return {
        "id": str(rid).strip() if rid not in (None, "") else f"ext-{index:04d}",
        "category": str(category).strip() if category not in (None, "") else "external",
        "text": text.strip(),
    }


@functools.cache
def _external_harmful(path: str) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{path}: harmful requests file not found")
    rows: list[dict[str, str]] = []
    expected = "/".join(_TEXT_COLUMNS)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for where, record in iter_jsonl(p):
            keys = list(record)
            text_col = _pick_column(keys, _TEXT_COLUMNS)
            if text_col is None:
                raise ValueError(f"{where}: no text field (expected one of {expected})")
            cols = (text_col, _pick_column(keys, _CATEGORY_COLUMNS), _pick_column(keys, _ID_COLUMNS))
            rows.append(_external_row(record, cols, where, len(rows) + 1))
    elif p.suffix.lower() in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            header = reader.fieldnames or []
            text_col = _pick_column(list(header), _TEXT_COLUMNS)
            if text_col is None:
                raise ValueError(f"{path}:1: no text column (expected one of {expected}; found {header})")
            cols = (text_col, _pick_column(list(header), _CATEGORY_COLUMNS), _pick_column(list(header), _ID_COLUMNS))
            for record in reader:
                # line_num is the physical line of the end of this record (handles quoted newlines).
                rows.append(_external_row(record, cols, f"{path}:{reader.line_num}", len(rows) + 1))
    else:
        raise ValueError(f"{path}: unsupported harmful requests format {p.suffix!r} (use .csv, .tsv or .jsonl)")
    if not rows:
        raise ValueError(f"{path}: no requests found")
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: duplicate request id {dup!r}")
    return rows


def load_harmful_requests(path: str | None = None) -> list[dict[str, str]]:
    """Harmful requests ``[{id, category, text}]``: packaged set, or a user CSV/TSV/JSONL file.

    A user file needs a text column named ``text``, ``goal`` (AdvBench), ``behavior`` (HarmBench) or
    ``prompt`` (matched case-insensitively); optional ``category``/``SemanticCategory`` and
    ``id``/``BehaviorID`` columns are used when present.
    """
    if path is None:
        return copy.deepcopy(_packaged_harmful())
    return copy.deepcopy(_external_harmful(str(path)))


# --------------------------------------------------------------------------------------------- personas
@functools.cache
def _personas() -> dict[str, Any]:
    source = "resources/personas.yaml"
    doc = _require_mapping(_yaml_resource("personas.yaml"), source)
    prompts = _require_mapping(doc.get("system_prompts"), f"{source}: system_prompts")
    for key in ("neutral", "mismatched"):
        _require_str(prompts.get(key), f"{source}: system_prompts.{key}")
    dispositions = _require_mapping(doc.get("dispositions"), f"{source}: dispositions")
    for key, value in dispositions.items():
        _require_str(value, f"{source}: dispositions.{key}")
    return {
        "system_prompts": {k: v.strip() for k, v in prompts.items()},
        "dispositions": {k: v.strip() for k, v in dispositions.items()},
    }


def load_personas() -> dict[str, Any]:
    """``{"system_prompts": {"neutral", "mismatched"}, "dispositions": {name: persona prompt}}``."""
    return copy.deepcopy(_personas())


# --------------------------------------------------------------------------------------------- templates
@functools.cache
def _templates() -> dict[str, Any]:
    source = "resources/offline_templates.yaml"
    doc = _require_mapping(_yaml_resource("offline_templates.yaml"), source)
    for key in ("user", "answers", "dispositions", "domains", "generic_domain"):
        _require_mapping(doc.get(key), f"{source}: {key}")
    for key in ("openers", "contexts", "closers"):
        _require_list(doc["user"].get(key), f"{source}: user.{key}")
    for fam in ("correct", "incorrect"):
        for key in ("openers", "closers"):
            _require_list(doc["answers"].get(fam, {}).get(key), f"{source}: answers.{fam}.{key}")
    char = _require_mapping(doc["answers"].get("character"), f"{source}: answers.character")
    _require_list(char.get("marker_frames"), f"{source}: answers.character.marker_frames")
    for key in ("openers", "lines", "closers"):
        _require_list(char.get("generic", {}).get(key), f"{source}: answers.character.generic.{key}")
    for name, spec in doc["dispositions"].items():
        for key in ("openers", "lines", "closers"):
            _require_list(
                _require_mapping(spec, f"{source}: dispositions.{name}").get(key),
                f"{source}: dispositions.{name}.{key}",
            )
    for name, spec in list(doc["domains"].items()) + [("generic_domain", doc["generic_domain"])]:
        where = f"{source}: domains.{name}" if name != "generic_domain" else f"{source}: generic_domain"
        spec = _require_mapping(spec, where)
        _require_str(spec.get("expert"), f"{where}.expert")
        for key in ("correct", "incorrect"):
            _require_list(spec.get(key), f"{where}.{key}")
    _require_list(doc["generic_domain"].get("question_templates"), f"{source}: generic_domain.question_templates")
    _require_list(doc["generic_domain"].get("aspects"), f"{source}: generic_domain.aspects")
    return doc


def load_offline_templates() -> dict[str, Any]:
    """Template data of the offline generator (see offline_templates.yaml)."""
    return copy.deepcopy(_templates())


@functools.cache
def offline_templates_hash() -> str:
    """sha256 of the template file's content: stamped into every offline dataset manifest."""
    return hashlib.sha256(resource_text("offline_templates.yaml").encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- defaults
@functools.cache
def _defaults() -> dict[str, Any]:
    source = "resources/defaults.yaml"
    doc = _require_mapping(_yaml_resource("defaults.yaml"), source)
    personas = _personas()["dispositions"]
    dispositions: dict[str, dict[str, Any]] = {}
    for name, spec in _require_mapping(doc.get("dispositions"), f"{source}: dispositions").items():
        where = f"{source}: dispositions.{name}"
        spec = _require_mapping(spec, where)
        out: dict[str, Any] = {"name": name}
        for key in _DISPOSITION_KEYS:
            out[key] = " ".join(_require_str(spec.get(key), f"{where}.{key}").split())
        rubric = _require_mapping(spec.get("rubric"), f"{where}.rubric")
        markers = _require_list(rubric.get("markers"), f"{where}.rubric.markers")
        out["rubric"] = {"markers": [_require_str(m, f"{where}.rubric.markers") for m in markers]}
        if name not in personas:
            raise ValueError(f"resources/personas.yaml: dispositions.{name}: missing default persona prompt")
        out["persona_prompt"] = personas[name]
        dispositions[name] = out
    domains: dict[str, dict[str, Any]] = {}
    for name, spec in _require_mapping(doc.get("domains"), f"{source}: domains").items():
        where = f"{source}: domains.{name}"
        spec = _require_mapping(spec, where)
        bank = _bank(name)
        if bank is None:
            raise ValueError(f"{where}: no packaged question bank questions/domains/{name}.yaml")
        topics = spec.get("topics") or []
        domains[name] = {
            "name": name,
            "description": bank["description"],
            "topics": [_require_str(t, f"{where}.topics") for t in topics],
            "questions_file": None,
        }
    return {"dispositions": dispositions, "domains": domains}


def default_dispositions() -> dict[str, dict[str, Any]]:
    """Reference disposition specs (name -> spec as in the contracts), for cross-checking config.yaml."""
    return copy.deepcopy(_defaults()["dispositions"])


def default_domains() -> dict[str, dict[str, Any]]:
    """Reference domain specs (name -> spec as in the contracts); ``questions_file`` None = packaged bank."""
    return copy.deepcopy(_defaults()["domains"])
