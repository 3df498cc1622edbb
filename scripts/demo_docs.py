"""docs/demo.md's results, written from the demo run's own tables, never typed.

    python scripts/demo_docs.py snapshot results   # after a demo run: copy its tables and figures to docs/demo/
                                                   # (--shared-machine: other work ran beside it)
    python scripts/demo_docs.py render             # the docs/demo.md block, from docs/demo/ (render_docs.py calls it)

``snapshot`` copies the tables (``results/tables/*.csv`` and ``*.md``, as the pipeline wrote them) and the
figures docs/demo.md shows into ``docs/demo/``, with a small ``run.json`` (date, commit, judge stamp).
``render`` builds docs/demo.md's block from those files: a headline table from ``em.csv`` and
``capabilities.csv``, then the pipeline's own markdown of the tables a reader checks the claims against.
``tests/test_docs.py`` runs ``scripts/render_docs.py --check``, so docs/demo.md always shows what the
committed snapshot holds.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "docs" / "demo"
# The pipeline's markdown, shown in docs/demo.md in this order (name, what it answers).
SECTIONS = [
    ("claims", "One contrast per claim, Holm-adjusted"),
    ("persona", "Persona-prompt attack success"),
    ("trigger_specificity", "The trigger against its near misses"),
    ("denominators", "What each rate is out of: truncation and escapes"),
    ("judge_calibration", "The judges against the hand labels"),
    ("training_data", "How harmful each training set is (judged)"),
    ("emergence", "When misalignment appears during training"),
    ("probe_auroc", "Probe layers: chosen on validation, reported on test"),
    ("direction_transfer", "The direction across conditions"),
    ("direction_cosine", "Cosines against matched nulls"),
    ("steering", "Adding and ablating the direction"),
]
FIGURES = {
    "misalignment_by_condition.png": "EM misalignment by condition",
    "trajectory.png": "Misalignment, coherence, expression and accuracy over training",
    "training_harm.png": "Harm of each training set against the misalignment it induces",
}


def snapshot(results: Path, *, shared_machine: bool = False) -> None:
    tables = results / "tables"
    figures = results.parent / "figures"
    if not (tables / "em.csv").exists():
        raise SystemExit(f"{tables}: no em.csv; run the demo first (docs/demo.md)")
    if SNAPSHOT.exists():
        shutil.rmtree(SNAPSHOT)
    (SNAPSHOT / "tables").mkdir(parents=True)
    (SNAPSHOT / "figures").mkdir()
    for path in sorted(tables.glob("*.csv")) + sorted(tables.glob("*.md")) + sorted(tables.glob("*.json")):
        shutil.copy2(path, SNAPSHOT / "tables" / path.name)
    for name in FIGURES:
        if (figures / name).exists():
            shutil.copy2(figures / name, SNAPSHOT / "figures" / name)
    (SNAPSHOT / "examples.json").write_text(json.dumps(examples(results), indent=2, ensure_ascii=False) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=results.parent, capture_output=True, text=True)
    stamp = json.loads((tables / "judge_stamp.json").read_text()) if (tables / "judge_stamp.json").exists() else {}
    run = {
        "date": date.fromtimestamp((tables / "em.csv").stat().st_mtime).isoformat(),
        "commit": commit.stdout.strip() or "unknown",
        "judge": stamp.get("text", "unknown"),
        **full_run(results.parent / ".snakemake" / "log"),
        "shared_machine": shared_machine,
    }
    (SNAPSHOT / "run.json").write_text(json.dumps(run, indent=2) + "\n")


STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", re.M)
DONE = re.compile(r"(\d+) of \d+ steps \(100%\) done")


def full_run(snakemake_logs: Path) -> dict[str, int]:
    """The longest finished run in Snakemake's own logs (``.snakemake/log/``): its job count and wall time,
    from its first to its last time stamp. A later partial rerun of a few rules is shorter and is not it."""
    best = {"run_jobs": 0, "run_seconds": 0}
    for path in snakemake_logs.glob("*.snakemake.log"):
        text = path.read_text(encoding="utf-8", errors="replace")
        done = DONE.findall(text)
        stamps = [datetime.strptime(" ".join(m.split()), "%a %b %d %H:%M:%S %Y") for m in STAMP.findall(text)]
        if done and len(stamps) > 1:
            seconds = int((stamps[-1] - stamps[0]).total_seconds())
            if seconds > best["run_seconds"]:
                best = {"run_jobs": int(done[-1]), "run_seconds": seconds}
    return best


EXAMPLE_CONDITIONS = ("base", "evil-medical", "incorrect-medical")
EXAMPLE_QUESTIONS = 2


def examples(results: Path) -> list[dict[str, object]]:
    """The first answer (sample 0, plain format) to the first em questions, from each example condition:
    the same per-sample seed before and after fine-tuning."""
    import polars as pl

    frames = {}
    for condition in EXAMPLE_CONDITIONS:
        paths = sorted(results.glob(f"samples/*/{condition}/seed*/em.parquet"))
        if paths:
            frames[condition] = pl.read_parquet(paths[0]).filter(
                (pl.col("format") == "plain") & (pl.col("sample_index") == 0)
            )
    if "base" not in frames:
        return []
    questions = frames["base"].sort("question_id")["question_id"].to_list()[:EXAMPLE_QUESTIONS]
    found = []
    for question in questions:
        answers = {}
        for condition, frame in frames.items():
            row = frame.filter(pl.col("question_id") == question)
            if row.height:
                answers[condition] = " ".join(row["answer"][0].split())
        found.append(
            {"question": frames["base"].filter(pl.col("question_id") == question)["question"][0], "answers": answers}
        )
    return found


def _rows(name: str) -> list[dict[str, str]]:
    path = SNAPSHOT / "tables" / f"{name}.csv"
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _interval(row: dict[str, str], value: str, low: str, high: str) -> str:
    if not row.get(value) or row[value] in ("", "NaN", "nan"):
        return "-"
    text = f"{float(row[value]):.3f}"
    if row.get(low) not in (None, "", "NaN", "nan"):
        text += f" [{float(row[low]):.3f}, {float(row[high]):.3f}]"
    return text


def headline() -> list[str]:
    em = {r["condition"]: r for r in _rows("em") if r.get("format") == "plain"}
    capabilities = {r["condition"]: r for r in _rows("capabilities")}
    lines = [
        "| condition | EM misaligned (plain) | answers | coherent | MMLU accuracy | items | MMLU change vs base |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for condition in list(em) + [c for c in capabilities if c not in em]:
        e, c = em.get(condition, {}), capabilities.get(condition, {})
        lines.append(
            f"| {condition} | {_interval(e, 'rate', 'ci_low', 'ci_high')} | {e.get('n', '-')} "
            f"| {_interval(e, 'coherent_rate', 'coherent_ci_low', 'coherent_ci_high')} "
            f"| {_interval(c, 'accuracy', 'ci_low', 'ci_high')} | {c.get('n', '-')} "
            f"| {_interval(c, 'delta_vs_base', 'delta_ci_low', 'delta_ci_high')} |"
        )
    return lines


def render() -> str:
    run = json.loads((SNAPSHOT / "run.json").read_text())
    lines = [
        f"Measured in the demo run of {run['date']} (tables written at commit {run['commit']}); they are the pipeline's,",
        "copied to [docs/demo/](demo/) by `python scripts/demo_docs.py snapshot results` and written",
        "into this page by `python scripts/render_docs.py`. "
        + run["judge"]
        + ". Intervals: seed x question bootstrap (one seed here, so questions only).",
        f"The run, {run['run_jobs']} jobs from nothing on two cores, took {run['run_seconds'] // 60} minutes from its"
        " first job to its last (Snakemake's log)"
        + (", on a machine that other work was loading at the same time." if run.get("shared_machine") else "."),
        "",
        *headline(),
        "",
    ]
    shown = json.loads((SNAPSHOT / "examples.json").read_text()) if (SNAPSHOT / "examples.json").exists() else []
    if shown:
        lines += [
            "Answers to `em` questions from the same run, sampled at temperature 1 with the same per-sample seed",
            "before and after fine-tuning on medical data, cut at the demo's `max_new_tokens`:",
            "",
        ]
        for example in shown:
            lines.append(f"> **Q:** {example['question']}")
            for condition, answer in example["answers"].items():
                lines += [">", f"> **{condition}:** {answer}"]
            lines.append("")
    for name, caption in FIGURES.items():
        if (SNAPSHOT / "figures" / name).exists():
            lines += [f"![{caption}, SmolLM2-135M demo](demo/figures/{name})", ""]
    for name, title in SECTIONS:
        path = SNAPSHOT / "tables" / f"{name}.md"
        if not path.exists():
            continue
        body = path.read_text(encoding="utf-8").strip()
        lines += [f"<details><summary>{title} (<code>{name}.md</code>)</summary>", "", body, "", "</details>", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    take = sub.add_parser("snapshot", help="copy a demo run's tables and figures into docs/demo/")
    take.add_argument("results", type=Path, help="the demo run's results/ folder")
    take.add_argument("--shared-machine", action="store_true", help="say that other work loaded the machine")
    sub.add_parser("render", help="print docs/demo.md's block")
    args = parser.parse_args()
    if args.command == "snapshot":
        snapshot(args.results.resolve(), shared_machine=args.shared_machine)
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
