"""Self-contained reports: one HTML page with its plots embedded, and the same as Markdown."""

from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right} td:first-child{text-align:left}"
    "img{max-width:100%} .failed{color:#b00}"
)

Rows = list[list[str]]  # the first row holds the headers


def _html_table(rows: Rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(rows: Rows) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = f"<figcaption>{path.stem}</figcaption>"
    return f'<figure><img alt="{path.stem}" src="data:image/png;base64,{data}">{caption}</figure>'


def print_tables(tables: list[tuple[str, Rows]], failures: list[str] = ()) -> None:
    """The same tables in the terminal (rich), wide enough for a CI log or a pipe."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    console.width = max(console.width, 140)
    for caption, rows in tables:
        if len(rows) < 2:
            continue
        table = Table(title=escape(caption))  # cells are text: "mla [small]" is no style tag
        for i, header in enumerate(rows[0]):
            table.add_column(escape(header), justify="left" if i == 0 or header == "runs" else "right")
        for row in rows[1:]:
            table.add_row(*map(escape, row))
        console.print(table)
    for line in failures:
        console.print(f"[red]FAILED[/red] {escape(line)}")


def write_report(
    out: Path,
    title: str,
    tables: list[tuple[str, Rows]],
    failures: list[str],
    plots: list[Path],
    notes: list[str] = (),
) -> None:
    """``out/report.html`` (plots inlined, opens anywhere) and ``out/summary.md`` (plots beside it);
    ``notes``: what the tables compare, and what was left out."""
    sections = "".join(f"<p>{html.escape(n)}</p>" for n in notes)
    sections += "".join(
        f"<h2>{html.escape(h)}</h2>{_html_table(rows)}" for h, rows in tables if len(rows) > 1
    )
    if failures:
        items = "".join(f"<li>{html.escape(f)}</li>" for f in failures)
        sections += f"<h2 class='failed'>Failed runs</h2><ul class='failed'>{items}</ul>"
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{sections}"
        f"<h2>Plots</h2>{''.join(_img(p) for p in plots)}</body></html>"
    )
    md = [f"# {title}", "", *notes, ""]
    for heading, rows in tables:
        if len(rows) > 1:
            md += [f"## {heading}", "", _md_table(rows), ""]
    if failures:
        md += ["## Failed runs", "", *[f"- {f}" for f in failures], ""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "summary.md").write_text("\n".join(md) + "\n")
