"""One self-contained HTML page of plotly figures: plotly.js goes into the file once, so it opens offline."""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}} table.facts th{{background:#f4f4f4}}</style>
</head><body>
{body}
</body></html>
"""


class Page:
    def __init__(self, title: str) -> None:
        self.title = title
        self.parts = [f"<h1>{html.escape(title)}</h1>"]
        self._needs_plotly = True

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def raw(self, markup: str) -> None:
        """Markup the caller has escaped."""
        self.parts.append(markup)

    def facts(self, rows: list[tuple[str, object]]) -> None:
        body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        self.parts.append(f"<table class='facts'>{body}</table>")

    def figure(self, figure: go.Figure) -> None:
        self.parts.append(figure.to_html(full_html=False, include_plotlyjs=self._needs_plotly, config={"displaylogo": False}))
        self._needs_plotly = False

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_PAGE.format(title=html.escape(self.title), body="\n".join(self.parts)), encoding="utf-8")
        return path
