"""The offline HTML of the reports: one inline stylesheet, tables, figures and whole pages (no scripts, no
external resources). Used by the participant report (:mod:`.report`, :mod:`.subject_report`) and the group
report (:mod:`bssfp2dt.pipeline.group`).
"""
from __future__ import annotations

import html
from typing import Sequence

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #4c72b0;padding-bottom:.2em}h2{margin-top:2em;color:#2d4d80}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#eef2f8}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em 1em}.ref{color:#7a4b00}h3{color:#2d4d80}a{color:#2d4d80}
.text td,.text th{text-align:left}.text table{max-width:100%}
"""  # noqa: E501 - the stylesheet's lines are part of every report's bytes


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; cells are escaped."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>\n"
                   for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def html_figure(source: str, caption: str) -> str:
    """A figure with a relative image path and an escaped caption."""
    return (f'<figure><img src="{html.escape(source, quote=True)}" alt="{html.escape(caption, quote=True)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_page(title: str, body: str) -> str:
    """A complete offline HTML page: inline CSS, no scripts, no external resources."""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
