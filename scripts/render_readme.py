"""Rewrite the README's generated blocks from the commands that produce them.

    python scripts/render_readme.py          # rewrite README.md in place
    python scripts/render_readme.py --check  # exit 1 (and say which block) when README.md is stale

A block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; ``BLOCKS`` says which
command writes each one. tests/test_architecture.py runs ``--check``, so a number in those blocks is
always what the command gives for the committed config.

The commands run in a copy of the repository's own files (tracked, or new and not ignored by git), never
in the working directory: a user's runs leave ``results/``, ``resources/`` (the demo fetches MMLU to
``resources/tasks/mmlu.jsonl``, which ``config.yaml`` names too) and ``benchmarks/runs/`` behind, and a
block must not change with them. ``CHARACTER_EM_*`` variables of the caller's shell are dropped for the
same reason.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS: dict[str, list[str]] = {
    "estimate": [sys.executable, "-m", "character_em.report.estimate", "--configfile", "config.yaml", "--anchors-only"],
    # The demo run's tables, from the snapshot in docs/demo/ (scripts/demo_readme.py).
    "demo": [sys.executable, "scripts/demo_readme.py", "render"],
}


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
    with tempfile.TemporaryDirectory(prefix="render-readme-") as tmp:
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
    result = subprocess.run(
        BLOCKS[name], cwd=copy, env=clean_environment(copy), capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(BLOCKS[name][1:])} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    # The README's own sections are level 2: a generated block's headings sit two levels below.
    lines = ["##" + line if line.startswith("#") else line for line in result.stdout.strip().splitlines()]
    return "\n".join(lines) + "\n"


def rewrite(text: str, copy: Path) -> tuple[str, list[str]]:
    stale = []
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(.*?)(<!-- /generated:{name} -->)", re.S)
        match = pattern.search(text)
        if match is None:
            raise SystemExit(f"README.md has no <!-- generated:{name} --> block")
        fresh = render(name, copy)
        if match.group(2) != fresh:
            stale.append(name)
            text = text[: match.start(2)] + fresh + text[match.end(2) :]
    return text, stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with committed_inputs() as copy:
        text, stale = rewrite(README.read_text(), copy)
    if args.check:
        if stale:
            print(f"README.md is stale in block(s) {', '.join(stale)}: run python scripts/render_readme.py")
            return 1
        return 0
    README.write_text(text)
    print(f"rewrote {', '.join(stale) or 'nothing (already current)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
