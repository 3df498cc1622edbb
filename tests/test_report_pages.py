"""Tables as pages of `snakemake --report` (report.pages): the table's Markdown, rendered."""

from __future__ import annotations

from pathlib import Path

from character_em.report.pages import markdown_page, write_markdown_pages

TABLE = """# Judge calibration

Judge: rubric · rubric-1 (TEST INSTRUMENT: never report these numbers). Rows with `n < 10` are
**not** shown.

| claim | a | estimate |
|---|---|---|
| 1 | evil-medical | 0.250 |
| 2 | <script>x</script> | -0.125 |
"""


def test_a_tables_markdown_becomes_a_page_with_its_stamp_and_every_row(tmp_path: Path) -> None:
    page = markdown_page(TABLE, "judge_calibration")
    assert "<h1>Judge calibration</h1>" in page
    assert (
        "<p>Judge: rubric · rubric-1 (TEST INSTRUMENT: never report these numbers). Rows with <code>n &lt; 10</code>"
        in page
    )
    assert "<strong>not</strong> shown.</p>" in page
    assert page.count("<tr>") == 3 and "<th>estimate</th>" in page and "<td>-0.125</td>" in page
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page  # cells are text, never markup
    (tmp_path / "t.md").write_text(TABLE)
    write_markdown_pages({"judge_calibration": (tmp_path / "t.md", tmp_path / "out" / "t.html")})
    assert (tmp_path / "out" / "t.html").read_text() == page
