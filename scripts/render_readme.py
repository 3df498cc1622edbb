"""Rewrite the README's generated blocks from the commands that produce them.

    python scripts/render_readme.py          # rewrite README.md in place
    python scripts/render_readme.py --check  # exit 1 (and say which block) when README.md is stale

A block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``; ``BLOCKS`` says which
command writes each one. tests/test_architecture.py runs ``--check``, so a number in those blocks is
always what the command gives for the committed config.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS: dict[str, list[str]] = {
    "estimate": [sys.executable, "-m", "character_em.report.estimate", "--configfile", "config.yaml", "--anchors-only"],
    # The demo run's tables, from the snapshot in docs/demo/ (scripts/demo_readme.py).
    "demo": [sys.executable, "scripts/demo_readme.py", "render"],
}


def render(name: str) -> str:
    result = subprocess.run(BLOCKS[name], cwd=ROOT, capture_output=True, text=True, check=True)
    # The README's own sections are level 2: a generated block's headings sit two levels below.
    lines = ["##" + line if line.startswith("#") else line for line in result.stdout.strip().splitlines()]
    return "\n".join(lines) + "\n"


def rewrite(text: str) -> tuple[str, list[str]]:
    stale = []
    for name in BLOCKS:
        pattern = re.compile(rf"(<!-- generated:{name} -->\n)(.*?)(<!-- /generated:{name} -->)", re.S)
        match = pattern.search(text)
        if match is None:
            raise SystemExit(f"README.md has no <!-- generated:{name} --> block")
        fresh = render(name)
        if match.group(2) != fresh:
            stale.append(name)
            text = text[: match.start(2)] + fresh + text[match.end(2) :]
    return text, stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text, stale = rewrite(README.read_text())
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
