"""Tables as pages of ``snakemake --report``.

The report shows HTML inline and offers any other file (a .csv) only as a download, so the tables a
reader needs beside the figures (claims, judge calibration, denominators) are rendered to HTML from
their Markdown file: the same numbers, rounded as the .md rounds them, and the same opening lines, so
the page names the judge that made the table exactly as the table does. Only the Markdown the table
writers produce is understood: headings, paragraphs, pipe tables, ``**bold**`` and ``code``.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

__all__ = ["markdown_page", "write_markdown_pages"]

_STYLE = """
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
p { max-width: 60em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
tr:nth-child(even) td { background: #fafafa; }
"""


def _inline(text: str) -> str:
    escaped = html.escape(text.strip())
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _cells(line: str) -> list[str]:
    return [cell for cell in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    head = "".join(f"<th>{_inline(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def markdown_page(text: str, title: str) -> str:
    """A self-contained HTML page of a table's Markdown file."""
    parts: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if not block:
            return
        if block[0].lstrip().startswith("|") and len(block) >= 2:
            parts.append(_table(block))
        elif block[0].startswith("#"):
            level = min(len(block[0]) - len(block[0].lstrip("#")), 4)
            parts.append(f"<h{level}>{_inline(block[0].lstrip('#'))}</h{level}>")
            if block[1:]:
                parts.append(f"<p>{_inline(' '.join(block[1:]))}</p>")
        else:
            parts.append(f"<p>{_inline(' '.join(block))}</p>")
        block.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            block.append(line)
            flush()
        else:
            block.append(line)
    flush()
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_markdown_pages(pages: dict[str, tuple[str | Path, str | Path]]) -> None:
    """Write each table's page: ``{title: (markdown file, html file)}``."""
    from character_em.files import write_text_atomic

    for title, (markdown, output) in pages.items():
        write_text_atomic(output, markdown_page(Path(markdown).read_text(encoding="utf-8"), title))
