"""The ablation dashboard: refusal rate, refusal score and harmless KL against the number of ablated
components, the top-ranked ones beside random ones of the same kinds."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lab.viz.page import Page

_PANELS = {
    "refusal_rate": "harmful refusal rate (judge, greedy)",
    "refusal_score": "harmful refusal score",
    "harmless_kl": "KL on harmless prompts (next token)",
}


def write_ablation_dashboard(details: dict[str, Any], header: dict[str, Any], path: Path) -> Path:
    page = Page(header["title"])
    ranking = details["ranking"]
    page.facts([
        ("prompts", f"{header['prompts']}: components chosen on {details['splits']['selection']}, measured on {details['splits']['evaluation']}"),
        ("ablation", f"{details['mode']} ablation at {details['positions'].replace('_', '-')} positions"),
        ("ranking", f"{ranking['from']}, direction {ranking['direction']}"),
        ("intervals", f"{details['bootstrap']['level']:.0%} bootstrap over prompts ({details['bootstrap']['resamples']} resamples)"),
    ])
    page.figure(_curves(details["curve"], details["bootstrap"]["level"]))
    page.raw(_components(ranking["top"]))
    page.raw(_categories(details["curve"]))
    return page.write(path)


def _curves(curve: list[dict[str, Any]], level: float) -> go.Figure:
    figure = make_subplots(rows=1, cols=3, subplot_titles=list(_PANELS.values()))
    none = next(p for p in curve if p["condition"] == "none")
    for column, key in enumerate(_PANELS, start=1):
        for condition, colour in (("top", "crimson"), ("random", "grey")):
            points = [none, *[p for p in curve if p["condition"] == condition]]
            figure.add_trace(go.Scatter(
                x=[p["k"] for p in points], y=[p[key]["mean"] for p in points],
                mode="markers" if condition == "random" else "lines+markers", name=f"{condition} components",
                legendgroup=condition, showlegend=column == 1, marker={"color": colour},
                error_y={"type": "data", "symmetric": False,
                         "array": [(p[key]["ci_high"] or p[key]["mean"]) - p[key]["mean"] for p in points],
                         "arrayminus": [p[key]["mean"] - (p[key]["ci_low"] or p[key]["mean"]) for p in points]},
                text=[", ".join(p["components"]) or "nothing ablated" for p in points],
                hovertemplate="k=%{x}: %{y:.3f}<br>%{text}<extra>" + condition + "</extra>",
            ), row=1, col=column)
        figure.update_xaxes(title_text="components ablated (k)", type="log", row=1, col=column)
    figure.update_layout(title=f"Ablating the top-ranked components against random ones of the same kinds ({level:.0%} intervals)", height=460)
    return figure


def _components(rows: list[dict[str, Any]]) -> str:
    body = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(r['component'])}</td><td>{r['effect']:+.3f}</td></tr>" for i, r in enumerate(rows))
    return f"<h3>The ranked components, in order (patching effect)</h3><table><tr><th>#</th><th>component</th><th>effect</th></tr>{body}</table>"


def _categories(curve: list[dict[str, Any]]) -> str:
    shown = [p for p in curve if p["condition"] in ("none", "top")]
    categories = sorted(shown[0]["per_category"])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    body = "".join(
        f"<tr><td>{'nothing' if p['k'] == 0 else 'top ' + str(p['k'])}</td>" + "".join(f"<td>{p['per_category'][c]:.0%}</td>" for c in categories) + "</tr>"
        for p in shown
    )
    return f"<h3>Harmful refusal rate per category</h3><table><tr><th>ablated</th>{head}</tr>{body}</table>"
