"""The baseline dashboard: refusal rates per category, the refusal score's distributions, and the misses."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from refusal_lab.prompts import LABELS
from refusal_lab.viz.page import Page

_SHOWN = 10  # example completions listed per kind of miss


def write_baseline_dashboard(rows: Sequence[dict[str, Any]], metrics: dict[str, float], per_category: Sequence[dict[str, Any]],
                             facts: list[tuple[str, object]], path: Path) -> Path:
    page = Page(str(dict(facts).get("title", "Baseline")))
    page.facts([(k, v) for k, v in facts if k != "title"] + [
        (f"refusal rate, {label}", f"{metrics[f'refusal_rate/{label}']:.1%} of {int(metrics[f'n_prompts/{label}'])}")
        for label in LABELS if f"refusal_rate/{label}" in metrics
    ] + ([("refusal score AUROC", f"{metrics['refusal_score/auroc']:.3f}")] if "refusal_score/auroc" in metrics else []))
    page.figure(_rates(per_category))
    page.figure(_scores(rows))
    page.heading("Where the judge and the labels disagree")
    page.raw(_examples("Harmless prompts refused", [r for r in rows if r["label"] == "harmless" and r["refused"]]))
    page.raw(_examples("Harmful prompts answered", [r for r in rows if r["label"] == "harmful" and not r["refused"]]))
    return page.write(path)


def _rates(per_category: Sequence[dict[str, Any]]) -> go.Figure:
    figure = go.Figure()
    for label in LABELS:
        subset = [r for r in per_category if r["label"] == label]
        figure.add_trace(go.Bar(
            x=[r["category"] for r in subset], y=[r["refusal_rate"] for r in subset], name=label,
            customdata=[[r["n"], r["refusal_score_mean"]] for r in subset],
            hovertemplate="%{x}: %{y:.0%} refused of %{customdata[0]}<br>mean refusal score %{customdata[1]:.2f}<extra>" + label + "</extra>",
        ))
    figure.update_layout(title="Refusal rate per category (the judge's verdict on greedy completions)", barmode="group",
                         yaxis={"tickformat": ".0%", "range": [0, 1]}, height=420)
    return figure


def _scores(rows: Sequence[dict[str, Any]]) -> go.Figure:
    figure = go.Figure()
    for label in LABELS:
        subset = [r for r in rows if r["label"] == label]
        figure.add_trace(go.Box(
            x=[r["category"] for r in subset], y=[r["refusal_score"] for r in subset], name=label, boxpoints="all", jitter=0.4,
            text=[r["prompt"] for r in subset], hovertemplate="%{text}<br>score %{y:.2f}<extra>" + label + "</extra>",
        ))
    figure.update_layout(title="Refusal score (log-odds of the refusal-start tokens at the first response position)",
                         boxmode="group", yaxis_title="refusal score", height=460)
    return figure


def _examples(title: str, rows: Sequence[dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['category'])}</td><td>{html.escape(r['prompt'])}</td><td>{html.escape(r['completion'])}</td></tr>"
        for r in rows[:_SHOWN]
    )
    shown = f"{min(_SHOWN, len(rows))} of {len(rows)}"
    return f"<h3>{html.escape(title)} ({shown})</h3><table><tr><th>category</th><th>prompt</th><th>completion</th></tr>{body}</table>"
