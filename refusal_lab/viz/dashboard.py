"""The patching dashboard: one self-contained HTML file (plotly.js embedded, so it opens offline).

Per direction: the layer x head and layer x position heatmaps (hover: mean effect, interval,
pairs), the attention and MLP effects per layer with their intervals, the per-position head
effects, the ranked components, a category menu that swaps every heatmap to one category's
pairs, and, where attribution patching ran beside exact patching, their scatter.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from refusal_lab.patching.sweeps import SWEEPS, Sweep
from refusal_lab.viz.page import Page

_SHOWN = 25  # ranked components listed per direction (all of them are in the results file)
_SCALE = "RdBu_r"  # red: the patch moves the score toward the source run, blue: away from it; white: 0


def write_dashboard(details: dict[str, Any], header: dict[str, Any], path: Path) -> Path:
    """Write the dashboard for a patching run's ``details`` (its results file) to ``path``."""
    page = Page(header.get("title", "Activation patching"))
    page.facts(_facts(details, header))
    for direction, effects in details["effects"].items():
        page.heading(_direction_title(direction, details))
        for figure in _direction_figures(direction, effects, details):
            page.figure(figure)
        page.raw(_ranked_table(details["ranked"].get(direction, []), _SHOWN, details["bootstrap"]["level"]))
    if details.get("agreement"):
        page.heading("Attribution patching against exact patching")
        for figure in _agreement_figures(details["agreement"]):
            page.figure(figure)
    return page.write(path)


def _direction_title(direction: str, details: dict[str, Any]) -> str:
    roles = details["directions"][direction]
    meaning = "removes refusal" if roles["target"] == "harmful" else "induces refusal"
    return f"{roles['source']} into {roles['target']} ({meaning} where the effect is near 1)"


def _direction_figures(direction: str, effects: dict[str, Any], details: dict[str, Any]) -> list[go.Figure]:
    """One figure per sweep, drawn as its ``Sweep.figure`` says; the per-layer blocks share one chart."""
    categories = details.get("per_category", {}).get(direction, {})
    figures = []
    blocks = [SWEEPS[name] for name in effects if SWEEPS[name].figure == "blocks"]
    for name, summary in effects.items():
        sweep = SWEEPS[name]
        if sweep.figure != "blocks":
            figures.append(_FIGURES[sweep.figure](sweep, summary, categories.get(name, {}), details))
    if blocks:
        figures.append(_blocks(effects, blocks, categories, details["bootstrap"]["level"]))
    return figures


def _layer_by_head(sweep: Sweep, summary: dict[str, Any], categories: dict[str, Any], details: dict[str, Any]) -> go.Figure:
    heads = np.array(summary["mean"], dtype=float).shape[1]
    return _heatmap(summary, categories, sweep.title, x=[f"H{h}" for h in range(heads)], x_title="head")


def _layer_by_position(sweep: Sweep, summary: dict[str, Any], categories: dict[str, Any], details: dict[str, Any]) -> go.Figure:
    positions = details["positions"][sweep.name]
    return _heatmap(summary, categories, sweep.title, x=[str(p) for p in positions],
                    x_title="position from the end (-1: where the refusal score is read)")


def _head_by_position(sweep: Sweep, summary: dict[str, Any], categories: dict[str, Any], details: dict[str, Any]) -> go.Figure:
    return _head_positions(summary, details["positions"][sweep.name], details["positions"]["post_instruction_tokens"])


def _heatmap(summary: dict[str, Any], by_category: dict[str, Any], title: str, x: Sequence[str], x_title: str) -> go.Figure:
    mean = np.array(summary["mean"], dtype=float)
    low = np.array(summary["ci_low"], dtype=float)
    high = np.array(summary["ci_high"], dtype=float)
    n = np.array(summary["n_pairs"], dtype=float)
    text = np.vectorize(
        lambda m, lo, hi, k: "" if np.isnan(m) else f"{m:+.3f} " + ("" if np.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}], ") + f"{int(k)} pairs"
    )(mean, low, high, n)
    layers = [str(i) for i in range(mean.shape[0])]
    limit = _limit(mean)
    figure = go.Figure(go.Heatmap(
        z=mean, x=list(x), y=layers, text=text, zmid=0, zmin=-limit, zmax=limit, colorscale=_SCALE,
        hovertemplate="layer %{y}, %{x}<br>effect %{text}<extra></extra>", colorbar={"title": "effect"},
    ))
    buttons = [{"label": "all categories", "method": "restyle", "args": [{"z": [mean], "text": [text]}]}]
    for category, values in sorted(by_category.items()):
        z = np.array(values, dtype=float)
        label = np.vectorize(lambda m: "" if np.isnan(m) else f"{m:+.3f} (mean over this category's pairs)")(z)
        buttons.append({"label": category, "method": "restyle", "args": [{"z": [z], "text": [label]}]})
    figure.update_layout(
        title=title, xaxis_title=x_title, yaxis_title="layer", height=max(420, 18 * len(layers)),
        updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.12, "xanchor": "right"}] if len(buttons) > 1 else [],
    )
    return figure


def _head_positions(summary: dict[str, Any], positions: Sequence[int], post_instruction: int) -> go.Figure:
    mean = np.array(summary["mean"], dtype=float)  # [layers, heads, positions]
    limit = _limit(mean)
    figure = make_subplots(rows=1, cols=len(positions), shared_yaxes=True, subplot_titles=[f"position {p}" for p in positions])
    for i in range(len(positions)):
        figure.add_trace(
            go.Heatmap(
                z=mean[:, :, i], x=[f"H{h}" for h in range(mean.shape[1])], y=[str(layer) for layer in range(mean.shape[0])],
                zmid=0, zmin=-limit, zmax=limit, colorscale=_SCALE, showscale=i == len(positions) - 1,
                hovertemplate=f"layer %{{y}}, %{{x}}, position {positions[i]}<br>effect %{{z:+.3f}}<extra></extra>",
            ),
            row=1, col=i + 1,
        )
    which = "post-instruction position" if len(positions) == post_instruction else "position"
    figure.update_layout(title=f"Attention heads at each {which} (from the end)", height=max(420, 18 * mean.shape[0]))
    return figure


def _blocks(effects: dict[str, Any], blocks: Sequence[Sweep], categories: dict[str, Any], level: float) -> go.Figure:
    figure = go.Figure()
    names = {sweep.name: sweep.title or sweep.name for sweep in blocks}
    for block in names:
        mean = np.array(effects[block]["mean"], dtype=float)
        low = np.array(effects[block]["ci_low"], dtype=float)
        high = np.array(effects[block]["ci_high"], dtype=float)
        layers = np.arange(mean.shape[0])
        figure.add_trace(go.Scatter(
            x=layers, y=mean, mode="lines+markers", name=f"{names[block]} (all categories)",
            error_y={"type": "data", "symmetric": False, "array": high - mean, "arrayminus": mean - low},
            hovertemplate="layer %{x}: %{y:+.3f}<extra>" + names[block] + "</extra>",
        ))
        for category, values in sorted(categories.get(block, {}).items()):
            figure.add_trace(go.Scatter(
                x=layers, y=np.array(values, dtype=float), mode="lines", name=f"{names[block]}: {category}",
                visible="legendonly", line={"dash": "dot"},
            ))
    figure.update_layout(
        title="Attention blocks and MLPs (output over the span); click a category in the legend",
        xaxis_title="layer", yaxis_title=f"effect (mean, {level:.0%} interval)", height=460,
    )
    return figure


def _agreement_figures(agreement: dict[str, Any]) -> list[go.Figure]:
    figures = []
    for direction, sweeps in agreement.items():
        figure = go.Figure()
        for sweep, points in sweeps.items():
            exact = np.array(points["exact"], dtype=float)
            approx = np.array(points["attribution"], dtype=float)
            figure.add_trace(go.Scatter(
                x=exact, y=approx, mode="markers",
                name=f"{sweep} (Spearman {points['spearman']:+.2f}, top-{points['k']} overlap {points['top_k_overlap']:.0%})",
                text=points["labels"], hovertemplate="%{text}<br>exact %{x:+.3f}<br>attribution %{y:+.3f}<extra></extra>",
            ))
        figure.update_layout(title=f"{direction}: attribution against exact effect", xaxis_title="exact patching effect",
                             yaxis_title="attribution patching estimate", height=480)
        figures.append(figure)
    return figures


def _ranked_table(rows: list[dict[str, Any]], shown: int, level: float) -> str:
    def interval(ci: Sequence[float | None]) -> str:
        return "fewer than 3 pairs" if ci[0] is None or ci[1] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"

    body = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(r['component'])}</td><td>{r['effect']:+.3f}</td><td>{interval(r['ci'])}</td></tr>"
        for i, r in enumerate(rows[:shown])
    )
    return (
        f"<h3>Top {min(shown, len(rows))} components (heads, attention blocks, MLPs) by mean effect</h3>"
        f"<table><tr><th>#</th><th>component</th><th>effect</th><th>{level:.0%} interval</th></tr>{body}</table>"
    )


def _facts(details: dict[str, Any], header: dict[str, Any]) -> list[tuple[str, object]]:
    exactness = details.get("exactness") or {}
    return [
        ("model", header.get("model", "")),
        ("precision", details.get("precision", "")),
        ("prompts", header.get("prompts", "")),
        ("pairs patched", header.get("pairs", "")),
        ("method", details.get("method", "exact") + (f", {details['engine']} engine" if details.get("engine") else "")),
        ("exactness", f"fast engine against one forward pass per patch on {exactness['variants_checked']} variants: "
                      f"max difference {exactness['max_abs_diff']:.1e}" if exactness else "not checked in this run"),
        ("effect", "(patched - target) / (source - target) of the refusal score; 0: no change, 1: all the way to the source run"),
        ("intervals", f"{details['bootstrap']['level']:.0%} bootstrap over pairs, {details['bootstrap']['resamples']} resamples"),
    ]


# Sweep.figure -> how one sweep's mean effects are drawn (the per-layer "blocks" share one chart).
_FIGURES = {"layer_by_head": _layer_by_head, "layer_by_position": _layer_by_position, "head_by_position": _head_by_position}


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(max(finite.max(), 1e-6)) if finite.size else 1.0
