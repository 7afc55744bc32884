"""The ablation dashboard: the verdict on necessity first; harmful refusal against harmless KL (top and random arms
at matched damage); refusal rate, refusal score and harmless KL against the number of ablated components,
the top-ranked ones beside random ones of the same kinds; arms that broke the model marked as such."""

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
    page.raw(_verdict(details))
    page.figure(_matched(details["curve"], details["damage"]["max_kl"]))
    page.figure(_curves(details["curve"], details["bootstrap"]["level"]))
    page.raw(_components(ranking["top"], "The ranked components, in order (patching effect where they are ablated)"))
    if ranking.get("content_carriers"):
        rule = ranking["content_rule"]
        page.raw(_components(ranking["content_carriers"], f"Carrying the request's content, reported apart (effect over the span at least "
                                                          f"{rule['min_effect']:g} and {rule['ratio']:g}x the post-instruction effect)"))
    page.raw(_categories(details["curve"]))
    return page.write(path)


def _verdict(details: dict[str, Any]) -> str:
    finding, bound = details["necessity"], details["damage"]["max_kl"]
    broken = [p for p in details["curve"] if p.get("broken")]
    lines = []
    if finding["necessary"]:
        lines.append(f"<b>Evidence of necessity:</b> the top {finding['best_k']} components lower harmful refusal "
                     f"{100 * finding['best_gap']:.0f} points more than random components at comparable damage.")
    else:
        best = "no top arm had a random arm of comparable damage" if finding["best_gap"] is None else \
            f"the best gap is {100 * finding['best_gap']:+.0f} points (k={finding['best_k']})"
        lines.append(f"<b>No evidence of necessity:</b> no unbroken top arm of at most {finding['max_k']} components lowers refusal "
                     f"{100 * finding['min_gap']:.0f} points more than random components at comparable damage; {best}.")
    if broken:
        names = ", ".join(f"{p['condition']} k={p['k']}" for p in broken)
        lines.append(f"<b>Model broken</b> (harmless KL above {bound:g} nats) in {len(broken)} arm(s): {html.escape(names)}. "
                     "Their refusal rates are not evidence of necessity: the model stopped working, not only refusing.")
    return "".join(f"<p>{line}</p>" for line in lines)


def _matched(curve: list[dict[str, Any]], bound: float) -> go.Figure:
    """Harmful refusal against harmless KL: at equal damage, do the top components lower refusal more than random ones?"""
    figure = go.Figure()
    names = {"none": "nothing ablated", "top": "top components", "random": "random components",
             "matched": "random components, grown to a top arm's damage"}
    for condition, colour in (("none", "black"), ("top", "crimson"), ("random", "grey"), ("matched", "darkgrey")):
        points = [p for p in curve if p["condition"] == condition]
        if not points:
            continue
        figure.add_trace(go.Scatter(
            x=[p["harmless_kl"]["mean"] for p in points], y=[p["refusal_rate"]["mean"] for p in points], mode="markers+text",
            name=names[condition],
            marker={"color": colour, "size": 11, "symbol": ["x" if p.get("broken") else "diamond" if condition == "matched" else "circle" for p in points]},
            text=[f"k={p['k']}" + (f" (for top {p['for_k']})" if condition == "matched" else "") for p in points], textposition="top center",
            hovertemplate="%{text}: KL %{x:.3f}, refusal %{y:.0%}<extra>" + condition + "</extra>",
        ))
    figure.add_vline(x=bound, line_dash="dash", line_color="grey", annotation_text=f"model broken beyond {bound:g} nats")
    figure.update_xaxes(title_text="harmless next-token KL (nats; damage)", type="log")
    figure.update_yaxes(title_text="harmful refusal rate", tickformat=".0%")
    figure.update_layout(title="Refusal against damage: top and random components compared at matched damage (x: broken arms)", height=460)
    return figure


def _curves(curve: list[dict[str, Any]], level: float) -> go.Figure:
    figure = make_subplots(rows=1, cols=3, subplot_titles=list(_PANELS.values()))
    none = next(p for p in curve if p["condition"] == "none")
    for column, key in enumerate(_PANELS, start=1):
        for condition, colour in (("top", "crimson"), ("random", "grey")):
            points = [none, *[p for p in curve if p["condition"] == condition]]
            figure.add_trace(go.Scatter(
                x=[p["k"] for p in points], y=[p[key]["mean"] for p in points],
                mode="markers" if condition == "random" else "lines+markers", name=f"{condition} components",
                legendgroup=condition, showlegend=column == 1,
                marker={"color": colour, "symbol": ["x" if p.get("broken") else "circle" for p in points], "size": 9},
                error_y={"type": "data", "symmetric": False,
                         "array": [(p[key]["ci_high"] or p[key]["mean"]) - p[key]["mean"] for p in points],
                         "arrayminus": [p[key]["mean"] - (p[key]["ci_low"] or p[key]["mean"]) for p in points]},
                text=[", ".join(p["components"]) or "nothing ablated" for p in points],
                hovertemplate="k=%{x}: %{y:.3f}<br>%{text}<extra>" + condition + "</extra>",
            ), row=1, col=column)
        figure.update_xaxes(title_text="components ablated (k)", type="log", row=1, col=column)
    figure.update_layout(title=f"Ablating the top-ranked components against random ones of the same kinds ({level:.0%} intervals; x: model broken)",
                         height=460)
    return figure


def _components(rows: list[dict[str, Any]], title: str) -> str:
    body = "".join(f"<tr><td>{i + 1}</td><td>{html.escape(r['component'])}</td><td>{r['effect']:+.3f}</td></tr>" for i, r in enumerate(rows))
    return f"<h3>{html.escape(title)}</h3><table><tr><th>#</th><th>component</th><th>effect</th></tr>{body}</table>"


def _categories(curve: list[dict[str, Any]]) -> str:
    shown = [p for p in curve if p["condition"] in ("none", "top")]
    categories = sorted(shown[0]["per_category"])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in categories)
    body = "".join(
        f"<tr><td>{'nothing' if p['k'] == 0 else 'top ' + str(p['k'])}{' (broken)' if p.get('broken') else ''}</td>" + "".join(f"<td>{p['per_category'][c]:.0%}</td>" for c in categories) + "</tr>"
        for p in shown
    )
    return f"<h3>Harmful refusal rate per category</h3><table><tr><th>ablated</th>{head}</tr>{body}</table>"
