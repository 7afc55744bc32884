"""The refusal-direction dashboard: every candidate's three scores, the chosen one marked, and what
ablating and adding it did to generations on the test split, with the cost beside it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lab.viz.baseline import _examples
from refusal_lab.viz.page import Page

_SCORES = {
    "bypass": "bypass: harmful refusal score, direction ablated (lower: refusal removed)",
    "induce": "induce: harmless refusal score, direction added (higher: refusal induced)",
    "kl": "KL on harmless prompts under ablation (lower: cheaper)",
}


def write_direction_dashboard(details: dict[str, Any], rows: Sequence[dict[str, Any]], header: dict[str, Any], path: Path) -> Path:
    page = Page(header["title"])
    page.facts(_facts(details, header))
    page.figure(_candidates(details["selection"], details["thresholds"]))
    if details["outcome"]:
        page.figure(_rates(details["outcome"]["refusal"], details))
        page.heading("Generations that changed")
        page.raw(_examples("Harmful prompts answered with the direction ablated",
                           [r for r in rows if r["label"] == "harmful" and r["condition"] == "ablation" and not r["refused"]]))
        page.raw(_examples("Harmless prompts refused with the direction added",
                           [r for r in rows if r["label"] == "harmless" and r["condition"] == "addition" and r["refused"]]))
        page.raw(_examples("Harmful prompts still refused with the direction ablated",
                           [r for r in rows if r["label"] == "harmful" and r["condition"] == "ablation" and r["refused"]]))
    return page.write(path)


def _facts(details: dict[str, Any], header: dict[str, Any]) -> list[tuple[str, object]]:
    selection, chosen, thresholds = details["selection"], details["selection"]["chosen"], details["thresholds"]
    splits = details["splits"]
    facts: list[tuple[str, object]] = [
        ("prompts", f"{header['prompts']}: candidates from {splits['candidates']}, chosen on {splits['selection']}, measured on {splits['evaluation']}"),
        ("filters", f"discard KL > {thresholds['max_kl']}, induce < {thresholds['min_induce']}, layer >= {thresholds['max_layer_fraction']:.0%} of the depth"),
        ("candidates", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in selection["filtered"].items())),
    ]
    if chosen is None:
        return [*facts, ("chosen", "none: no candidate passes the filters")]
    facts.append(("chosen", f"layer {chosen['layer']}, position {chosen['position']}: bypass {chosen['bypass']:+.2f}, "
                            f"induce {chosen['induce']:+.2f}, KL {chosen['kl']:.3f}, norm {chosen['norm']:.2f}"))
    cost = details["outcome"]["cost"]
    facts.append(("cost on harmless test prompts", f"next-token KL {_interval(cost['kl'], '.3f')}; cross-entropy of the model's own answers "
                                                   f"{cost['cross_entropy']['before']['mean']:.3f} -> {cost['cross_entropy']['ablated']['mean']:.3f} nats"))
    split = cost.get("kl_by_unablated_decision")
    if split:
        facts.append(("KL by what the unablated model did", "; ".join(
            f"{decision} ({values['n']} prompts): {_interval(values, '.3f')}" for decision, values in split.items() if values["n"])
            + f"; median over all {cost['kl_median']:.3f}"))
    export = details.get("export") or {}
    if export:
        facts.append(("export", f"{export['folder']} ({export['note']}); largest logit difference from hook ablation "
                                f"{export['check']['max_abs_logit_diff']:.1e}. {export['how']}"))
    return facts


def _candidates(selection: dict[str, Any], thresholds: dict[str, float]) -> go.Figure:
    positions = [str(p) for p in selection["positions"]]
    figure = make_subplots(rows=1, cols=3, shared_yaxes=True, subplot_titles=list(_SCORES.values()), horizontal_spacing=0.06)
    for column, name in enumerate(_SCORES, start=1):
        z = np.array(selection["scores"][name], dtype=float)
        figure.add_trace(go.Heatmap(
            z=z, x=positions, y=[str(i) for i in range(z.shape[0])], colorscale="Viridis" if name == "kl" else "RdBu_r",
            zmid=None if name == "kl" else 0, colorbar={"x": 0.31 * column + 0.02 * (column - 1), "len": 0.9},
            hovertemplate=f"layer %{{y}}, position %{{x}}<br>{name} %{{z:.3f}}<extra></extra>",
        ), row=1, col=column)
        chosen = selection["chosen"]
        if chosen is not None:
            figure.add_trace(go.Scatter(
                x=[str(chosen["position"])], y=[str(chosen["layer"])], mode="markers", showlegend=False,
                marker={"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}},
                hovertemplate="chosen<extra></extra>",
            ), row=1, col=column)
    figure.update_layout(title="Candidate directions (layer x position from the end), the chosen one starred", height=max(460, 16 * len(selection["scores"]["bypass"])))
    figure.update_xaxes(title_text="position from the end")
    figure.update_yaxes(title_text="layer", col=1)
    return figure


def _rates(refusal: dict[str, Any], details: dict[str, Any]) -> go.Figure:
    figure = go.Figure()
    for label, condition in (("harmful", "ablation"), ("harmless", "addition")):
        keys = [f"{label}/none", f"{label}/{condition}"]
        values = [refusal[k]["refusal_rate"] for k in keys]
        figure.add_trace(go.Bar(
            x=[f"{label}: as is", f"{label}: {condition}"], y=[v["mean"] for v in values], name=f"{label} prompts",
            error_y={"type": "data", "symmetric": False,
                     "array": [(v["ci_high"] if v["ci_high"] is not None else v["mean"]) - v["mean"] for v in values],
                     "arrayminus": [v["mean"] - (v["ci_low"] if v["ci_low"] is not None else v["mean"]) for v in values]},
            customdata=[v["n"] for v in values], hovertemplate="%{x}: %{y:.0%} refused of %{customdata}<extra></extra>",
        ))
    level = details["bootstrap"]["level"]
    figure.update_layout(title=f"Refusal rate of greedy generations on the test split ({level:.0%} bootstrap interval over prompts)",
                         yaxis={"tickformat": ".0%", "range": [0, 1.05]}, height=420)
    return figure


def _interval(values: dict[str, Any], spec: str) -> str:
    if values["ci_low"] is None:
        return format(values["mean"], spec)
    return f"{format(values['mean'], spec)} [{format(values['ci_low'], spec)}, {format(values['ci_high'], spec)}]"
