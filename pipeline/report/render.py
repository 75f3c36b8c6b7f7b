"""The report as Markdown and as one self-contained HTML page (figures embedded as data URIs),
both from the same ``Page``: the claims with their verdicts, every paper table beside its
measured twin (measured ± spread, the paper's number, the difference), the figures. No Ray,
MLflow or file reading here beyond the figures' PNG bytes handed in."""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

from pipeline.report.claims import PENDING, Claim, Verdict
from pipeline.report.tables import Row, Stat, Table, fmt, header, is_percent

RunLink = Callable[[str], str]  # MLflow run id -> its URL in the MLflow UI


@dataclass(frozen=True)
class ReportFigure:
    """A figure: its file under the report's files directory, or None while pending (``how``
    says what produces it)."""

    anchor: str
    title: str
    caption: str
    file: str | None
    how: str = ""


@dataclass(frozen=True)
class Page:
    title: str
    intro: tuple[str, ...]
    claims: Sequence[tuple[Claim, Verdict]]
    tables: Sequence[Table]
    figures: Sequence[ReportFigure]


def _contents(page: Page) -> list[tuple[str, str]]:
    """(anchor, short name) of every section: the claims, each table, each figure."""
    return [("claims", "Claims"), *((t.anchor, t.title.split(":")[0]) for t in page.tables),
            *((f.anchor, f.title.split(":")[0]) for f in page.figures)]


def _measured(stat: Stat | None, metric: str) -> str:
    if stat is None:
        return "-"
    return fmt(metric, stat.mean) + (f" ± {fmt(metric, stat.std)}" if stat.n > 1 else "")


def _paper(row: Row, metric: str) -> tuple[str, str] | None:
    """(the paper's number, the difference measured - paper or "") for a cell, or None."""
    if metric not in row.paper:
        return None
    stat = row.result.metrics.get(metric) if row.result else None
    diff = f"{stat.mean - row.paper[metric]:+.1f}" if stat is not None and is_percent(metric) else ""
    return fmt(metric, row.paper[metric]), diff


def _seeds(row: Row) -> str:
    if row.result is None or row.result.error:
        return ""
    return str(max((s.n for s in row.result.metrics.values()), default=0))


# ---- Markdown -----------------------------------------------------------------------------------


def markdown(page: Page, link: RunLink) -> str:
    lines = [f"# {page.title}", "", *page.intro, "", "Contents: " + " · ".join(f"[{name}](#{a})" for a, name in _contents(page)),
             "", '<a id="claims"></a>', "", "## Claims", "",
             "| claim | verdict | this run | paper | tables |", "|---|---|---|---|---|"]
    for claim, verdict in page.claims:
        tables = ", ".join(f"[{t}](#{t})" for t in claim.tables)
        lines.append(f"| {claim.text} | **{verdict.status}** | {verdict.evidence} | {claim.paper} | {tables} |")
    for table in page.tables:
        lines += ["", f'<a id="{table.anchor}"></a>', "", f"## {table.title}", "", *(f"{c}  " for c in table.conditions)]
        if table.pending:
            lines.append(f"{table.pending} of {len(table.rows)} rows pending: `{table.how}` measures them.  ")
        lines += ["", "Each cell: measured (± std over seeds) / paper / difference in points.", "",
                  "| | " + " | ".join(header(c) for c in table.columns) + " | seeds | MLflow run |",
                  "|---" * (len(table.columns) + 3) + "|"]
        lines += [_markdown_row(row, table.columns, link) for row in table.rows]
        lines += ["", *table.notes]
    lines += ["", "## Figures", ""]
    for figure in page.figures:
        lines += [f'<a id="{figure.anchor}"></a>', "", f"### {figure.title}", ""]
        lines.append(f"![{figure.title}]({figure.file})" if figure.file else f"*pending: {figure.how}*")
        lines += ["", figure.caption, ""]
    return "\n".join(lines) + "\n"


def _markdown_row(row: Row, columns: Sequence[str], link: RunLink) -> str:
    cells = []
    for i, metric in enumerate(columns):
        cell = _unmeasured(row, i) if row.result is None or row.result.error else \
            _measured(row.result.metrics.get(metric), metric)
        reference = _paper(row, metric)
        if reference:
            cell += f" / {reference[0]}" + (f" / {reference[1]}" if reference[1] else "")
        cells.append(cell)
    run = row.result.run_id if row.result else None
    run_cell = f"[{run[:8]}]({link(run)})" if run else ""
    return f"| {row.label} | " + " | ".join(cells) + f" | {_seeds(row)} | {run_cell} |"


def _unmeasured(row: Row, column: int) -> str:
    """The first cell of a row without numbers says why (pending, or the failure); the rest "-"."""
    if column:
        return "-"
    return "pending" if row.result is None else f"failed: {row.result.error}"


# ---- HTML ---------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: right; }
th { background: #f3f3f3; } td.label, td.text, th.text { text-align: left; }
code { background: #f3f3f3; padding: 0 3px; border-radius: 3px; }
.paper { color: #666; font-size: 12px; } .pos { color: #17803d; } .neg { color: #b42318; }
.pending { color: #999; font-style: italic; } .sd { color: #555; font-size: 12px; }
.badge { padding: 2px 6px; border-radius: 4px; font-weight: 600; white-space: nowrap; }
.reproduced { background: #d1fadf; } .not-reproduced { background: #fee4e2; } .pending-badge { background: #eee; }
.conditions { color: #444; font-size: 13px; margin: 0.2em 0; } figure { margin: 1em 0; }
img { max-width: 100%; border: 1px solid #ddd; } figcaption { color: #444; font-size: 13px; }
"""


def html(page: Page, link: RunLink, images: Mapping[str, bytes]) -> str:
    """The page; ``images``: figure file -> its PNG bytes (embedded, so the page is one file)."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{escape(page.title)}</title><style>{STYLE}</style></head><body>", f"<h1>{escape(page.title)}</h1>"]
    out += [f"<p>{_inline(line)}</p>" for line in page.intro]
    out.append("<p>Contents: " + " · ".join(f'<a href="#{a}">{escape(name)}</a>' for a, name in _contents(page)) + "</p>")
    out += ['<h2 id="claims">Claims</h2>', "<table><tr>" + "".join(f'<th class="text">{h}</th>' for h in
                                                                    ("claim", "verdict", "this run", "paper", "tables")) + "</tr>"]
    for claim, verdict in page.claims:
        badge = "pending-badge" if verdict.status == PENDING else verdict.status.replace(" ", "-")
        tables = ", ".join(f'<a href="#{t}">{t}</a>' for t in claim.tables)
        out.append(f'<tr><td class="text">{escape(claim.text)}</td><td class="text"><span class="badge {badge}">'
                   f"{escape(verdict.status)}</span></td><td class=\"text\">{escape(verdict.evidence)}</td>"
                   f'<td class="text">{escape(claim.paper)}</td><td class="text">{tables}</td></tr>')
    out.append("</table>")
    for table in page.tables:
        out += [f'<h2 id="{table.anchor}">{escape(table.title)}</h2>',
                *(f'<p class="conditions">{_inline(c)}</p>' for c in table.conditions)]
        if table.pending:
            out.append(f'<p class="conditions pending">{table.pending} of {len(table.rows)} rows pending: '
                       f"<code>{escape(table.how)}</code> measures them.</p>")
        out.append("<table><tr><th></th>" + "".join(f"<th>{escape(header(c))}</th>" for c in table.columns)
                   + "<th>seeds</th><th>MLflow run</th></tr>")
        out += [_html_row(row, table.columns, link) for row in table.rows]
        out.append("</table>")
        out += [f'<p class="conditions">{_inline(n)}</p>' for n in table.notes]
    out.append('<h2 id="figures">Figures</h2>')
    for figure in page.figures:
        if figure.file:
            data = base64.b64encode(images[figure.file]).decode()
            body = f'<img alt="{escape(figure.title)}" src="data:image/png;base64,{data}">'
        else:
            body = f'<p class="pending">pending: {escape(figure.how)}</p>'
        out.append(f'<figure id="{figure.anchor}"><h3>{escape(figure.title)}</h3>{body}'
                   f"<figcaption>{escape(figure.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>."""
    parts = escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_row(row: Row, columns: Sequence[str], link: RunLink) -> str:
    cells = []
    for metric in columns:
        if row.result is None or row.result.error:
            cell = f'<span class="pending">{escape(_unmeasured(row, columns.index(metric)))}</span>'
        else:
            stat = row.result.metrics.get(metric)
            cell = f"<b>{fmt(metric, stat.mean)}</b>" if stat else "-"
            if stat is not None and stat.n > 1:
                cell += f'<span class="sd"> ± {fmt(metric, stat.std)}</span>'
        reference = _paper(row, metric)
        if reference:
            sign = "pos" if reference[1].startswith("+") else "neg"
            diff = f' <span class="{sign}">{reference[1]}</span>' if reference[1] else ""
            cell += f'<div class="paper">paper {reference[0]}{diff}</div>'
        cells.append(f"<td>{cell}</td>")
    run = row.result.run_id if row.result else None
    run_cell = f'<a href="{escape(link(run))}">{run[:8]}</a>' if run else ""
    return (f'<tr><td class="label">{escape(row.label)}</td>' + "".join(cells)
            + f"<td>{_seeds(row)}</td><td>{run_cell}</td></tr>")
