"""Rewrite the documentation's generated blocks from the commands that produce them.

    python scripts/render_docs.py          # rewrite every generated block in place
    python scripts/render_docs.py --check  # exit 1 (and say which blocks) when one is stale
    python scripts/render_docs.py print config-reference   # one block's text (what BLOCKS runs)

A block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in its file; ``BLOCKS``
says which command writes each one: the README's cost headline and docs/cost.md's estimate of
``config.yaml``, docs/demo.md's tables from the demo snapshot (scripts/demo_docs.py), and docs/config.md's
reference of every config key from ``schemas/config.schema.yaml``. tests/test_docs.py runs ``--check``, so
what those blocks say is always what the commands print for the committed files.

The commands run in a copy of the repository's own files (tracked, or new and not ignored by git), never
in the working directory: a user's runs leave ``results/``, ``resources/`` (the demo fetches MMLU to
``resources/tasks/mmlu.jsonl``, which ``config.yaml`` names too) and ``benchmarks/runs/`` behind, and a
block must not change with them. ``CHARACTER_EM_*`` variables of the caller's shell are dropped for the
same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"
# GPUs a lab is assumed to keep busy for the headline's wall-clock figure.
HEADLINE_GPUS = 8


@dataclass(frozen=True)
class Block:
    file: str
    command: tuple[str, ...]
    # Markdown headings in the output move down this many levels, to sit under the page's own.
    heading_shift: int = 0


BLOCKS: dict[str, Block] = {
    "cost": Block("README.md", (sys.executable, "scripts/render_docs.py", "print", "cost")),
    "estimate": Block(
        "docs/cost.md",
        (sys.executable, "-m", "character_em.report.estimate", "--configfile", "config.yaml", "--anchors-only"),
        heading_shift=2,
    ),
    # The demo run's tables, from the snapshot in docs/demo/ (scripts/demo_docs.py).
    "demo": Block("docs/demo.md", (sys.executable, "scripts/demo_docs.py", "render"), heading_shift=2),
    "config-reference": Block(
        "docs/config.md", (sys.executable, "scripts/render_docs.py", "print", "config-reference")
    ),
    "hub-models": Block("docs/cluster.md", (sys.executable, "scripts/render_docs.py", "print", "hub-models")),
}


# --------------------------------------------------------------------------- the cost headline


def cost_headline(configfile: str = "config.yaml") -> str:
    """Total GPU-hours of a config from the estimate's anchors (no earlier runs), the days that takes on
    HEADLINE_GPUS busy GPUs, and the stages that take the most."""
    from character_em import config as cfg
    from character_em.report import estimate

    result = estimate.estimate(cfg.load_config(configfile), None)
    total = result["gpu_hours"]
    by_stage: dict[str, float] = {}
    for model in result["models"].values():
        for stage in model["stages"]:
            by_stage[stage["stage"]] = by_stage.get(stage["stage"], 0.0) + stage["gpu_hours"]
    others = [*result.get("judge_jobs", []), *([result["data_generation"]] if "data_generation" in result else [])]
    for job in others:
        by_stage[job["stage"]] = by_stage.get(job["stage"], 0.0) + job["gpu_hours"]
    shares = sorted(by_stage.items(), key=lambda item: -item[1])[:3]
    parts = [f"{name} {m['gpu_hours']:,.0f}" for name, m in result["models"].items()]
    judging = sum(job["gpu_hours"] for job in result.get("judge_jobs", []))
    if judging:
        parts.append(
            f"judging outside the waves (training data, data filter, second judge, calibration) {judging:,.0f}"
        )
    if "data_generation" in result:
        parts.append(f"model-written training data {result['data_generation']['gpu_hours']:,.0f}")
    upper = all(basis["basis"] == "upper bound" for basis in result["answer_basis"].values())
    return (
        f"**{total:,.0f} GPU-hours**, about **{total / HEADLINE_GPUS / 24:,.1f} days on {HEADLINE_GPUS} GPUs** kept"
        f" busy ({', '.join(parts)})"
        + (", with every answer at `max_new_tokens` (the upper bound)" if upper else "")
        + f". The largest shares: {', '.join(f'{stage} {hours / total:.0%}' for stage, hours in shares)}. This is the"
        " project's estimate before any run of your own, not a measurement: every rate is labelled measured (this"
        " project's H200 anchors), anchored (a published figure) or assumed, scaled by model size;"
        " [docs/cost.md](docs/cost.md) shows every row, what remains to bring it down, and how to rerun it with"
        " your cluster's own throughput.\n"
    )


# --------------------------------------------------------------------------- hub models of a config

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_models(configfile: str = "config.yaml") -> str:
    """`hf download` for every Hugging Face model a config's jobs load from the hub: the trained models,
    and every local-model judge and writer, at the revision the jobs ask for."""
    from character_em import config as cfg

    config = cfg.load_config(configfile)
    wanted: dict[tuple[str, str | None], list[str]] = {}
    for key, spec in config["models"].items():
        if not spec.get("build") and HUB_ID.match(spec["path"]):
            wanted.setdefault((spec["path"], spec.get("revision")), []).append(f"models.{key}")
    sections = [
        ("judge", config["judge"]),
        ("judge.agreement_with", config["judge"].get("agreement_with")),
        ("data.filter.judge", config["data"]["filter"]["judge"] if config["data"]["filter"]["enabled"] else None),
        ("data.generator", config["data"]["generator"]),
    ]
    for key, section in sections:
        if section and section.get("backend") in ("hf", "vllm") and HUB_ID.match(str(section.get("model") or "")):
            wanted.setdefault((section["model"], section.get("revision")), []).append(key)
    lines = ["```bash"]
    width = max(len(f"hf download {model}" + (f" --revision {rev}" if rev else "")) for model, rev in wanted)
    for (model, revision), keys in wanted.items():
        command = f"hf download {model}" + (f" --revision {revision}" if revision else "")
        note = ", ".join(keys) + ("" if revision else " (no pinned revision: the current main)")
        lines.append(f"{command.ljust(width)}  # {note}")
    lines.append("```")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the config reference

# What a key of each mapping of free names stands for in the reference.
NAME_PLACEHOLDERS = {
    "models": "<model>",
    "dispositions": "<disposition>",
    "domains": "<domain>",
    "train_overrides": "<condition>",
    "external": "<condition>",
}


def load_schema(path: Path = SCHEMA) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _target(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _merged(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """A node with its ``allOf`` parts merged in (their properties below the node's own keys)."""
    merged: dict[str, Any] = {}
    for part in node.get("allOf") or []:
        part = _target(schema, part["$ref"]) if "$ref" in part else part
        merged = _merge(merged, _merged(schema, part))
    return _merge(merged, {key: value for key, value in node.items() if key != "allOf"})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if key == "properties":
            props = dict(out.get("properties") or {})
            for name, sub in value.items():
                props[name] = {**props.get(name, {}), **sub}
            out["properties"] = props
        else:
            out[key] = value
    return out


def schema_properties(schema: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dotted key, its schema) for every property a config can set, in schema order. Sections that reuse
    another's keys by ``$ref`` (models.<model>.train, train_overrides.<condition>, a second judge) are listed
    once, as that reference, not expanded again."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: dict[str, Any], prefix: str, parent: str) -> None:
        node = _merged(schema, node)
        required = set(node.get("required") or [])
        for name, sub in (node.get("properties") or {}).items():
            sub = {**_merged(schema, sub), "_required": name in required}
            found.append((prefix + name, sub))
            if "$ref" not in sub:
                walk(sub, f"{prefix}{name}.", name)
        free = node.get("additionalProperties")
        if isinstance(free, dict) and "$ref" not in free and (free.get("properties") or free.get("allOf")):
            walk(free, f"{prefix}{NAME_PLACEHOLDERS.get(parent, '<name>')}.", parent)

    walk(schema, "", "")
    return found


def _type(schema: dict[str, Any], node: dict[str, Any]) -> str:
    if "$ref" in node:
        return f"same keys as `{_ref_name(node['$ref'])}`"
    alternatives = node.get("anyOf") or node.get("oneOf")
    if alternatives:
        return " or ".join(_type(schema, alt) for alt in alternatives)
    if "enum" in node:
        values = [f"`{json.dumps(value)}`" for value in node["enum"]]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
    words = {"object": "mapping", "array": "list", "null": "null", "number": "number", "integer": "integer"}
    text = " or ".join(words.get(kind, kind) for kind in kinds) or "any"
    if "array" in kinds and isinstance(node.get("items"), dict):
        item = _type(schema, node["items"])
        text = text.replace("list", f"list of {item}", 1)
    if "object" in kinds and isinstance(node.get("additionalProperties"), dict):
        text = text.replace("mapping", f"mapping of names to {_type(schema, node['additionalProperties'])}", 1)
    return text


def _ref_name(ref: str) -> str:
    return {"#/$defs/train_params": "train", "#/$defs/sampling_params": "sampling"}.get(ref, ref.rsplit("/", 1)[-1])


def _default(node: dict[str, Any]) -> str:
    if "default" not in node:
        return "required" if node.get("_required") else "-"
    value = node["default"]
    if value in ({}, []):
        return "`{}`" if value == {} else "`[]`"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def config_reference(path: Path = SCHEMA) -> str:
    """Markdown: one table per top-level section of the schema, every key with its type, default and
    description."""
    schema = load_schema(path)
    required = set(schema.get("required") or [])
    rows = schema_properties(schema)
    sections: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, node in rows:
        sections.setdefault(key.split(".", 1)[0], []).append((key, node))
    lines = [
        f"{len(rows)} keys. Every key is checked against `schemas/config.schema.yaml` before any job runs;"
        " defaults are filled in, and an unknown key is an error.",
        "",
    ]
    for section, entries in sections.items():
        head = entries[0][1]
        lines += [f"### `{section}`", ""]
        if head.get("description"):
            lines += [_cell(head["description"]), ""]
        default = "required" if section in required else f"default {_default(head)}"
        lines += [f"Type: {_type(schema, head)}; {default}.", ""]
        if len(entries) > 1:
            lines += ["| key | type | default | description |", "|---|---|---|---|"]
            for key, node in entries[1:]:
                lines.append(
                    f"| `{key}` | {_cell(_type(schema, node))} | {_cell(_default(node))}"
                    f" | {_cell(node.get('description', ''))} |"
                )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- running the blocks


def repository_files(root: Path = ROOT) -> list[str]:
    """The project's own files: tracked ones, and new ones that git does not ignore. What runs write
    (results/, resources/, figures/, logs/, benchmarks/runs/, .snakemake/) is ignored, so it is not here."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    if listed.returncode != 0:
        raise SystemExit(f"{root}: not a git checkout ({listed.stderr.strip()}); the generated blocks need one")
    return sorted({name for name in listed.stdout.split("\0") if name and (root / name).is_file()})


@contextlib.contextmanager
def committed_inputs(root: Path = ROOT) -> Iterator[Path]:
    """A temporary copy of the repository's own files, where the blocks' commands run."""
    with tempfile.TemporaryDirectory(prefix="render-docs-") as tmp:
        copy = Path(tmp)
        for name in repository_files(root):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, copy / name)
        yield copy


def clean_environment(copy: Path) -> dict[str, str]:
    """The caller's environment without the project's own variables, importing the copy's library."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHARACTER_EM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy / "src"), env.get("PYTHONPATH")]))
    return env


def render(name: str, copy: Path) -> str:
    block = BLOCKS[name]
    result = subprocess.run(
        block.command, cwd=copy, env=clean_environment(copy), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(block.command[1:])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    shift = "#" * block.heading_shift
    lines = [shift + line if line.startswith("#") else line for line in result.stdout.strip().splitlines()]
    return "\n".join(lines) + "\n"


def rewrite(root: Path, copy: Path) -> tuple[dict[str, str], list[str]]:
    """The new text of every file with a block, and the names of the blocks that changed."""
    texts: dict[str, str] = {}
    stale = []
    for name, block in BLOCKS.items():
        text = texts.get(block.file) or (root / block.file).read_text(encoding="utf-8")
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(.*?)(<!-- /generated:{name} -->)", re.S)
        match = pattern.search(text)
        if match is None:
            raise SystemExit(f"{block.file} has no <!-- generated:{name} --> block")
        fresh = render(name, copy)
        if match.group(2) != fresh:
            stale.append(name)
            text = text[: match.start(2)] + fresh + text[match.end(2) :]
        texts[block.file] = text
    return texts, stale


PRINTED = {"cost": cost_headline, "config-reference": config_reference, "hub-models": hub_models}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a block is stale; change nothing")
    sub = parser.add_subparsers(dest="command")
    show = sub.add_parser("print", help="print one block that this script computes itself")
    show.add_argument("what", choices=sorted(PRINTED))
    args = parser.parse_args()
    if args.command == "print":
        sys.stdout.write(PRINTED[args.what]())
        return 0
    with committed_inputs() as copy:
        texts, stale = rewrite(ROOT, copy)
    where = {name: BLOCKS[name].file for name in stale}
    if args.check:
        if stale:
            names = ", ".join(f"{name} ({file})" for name, file in where.items())
            print(f"stale generated block(s): {names}; run python scripts/render_docs.py")
            return 1
        return 0
    for file, text in texts.items():
        (ROOT / file).write_text(text, encoding="utf-8")
    print(f"rewrote {', '.join(f'{name} ({file})' for name, file in where.items()) or 'nothing (already current)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
