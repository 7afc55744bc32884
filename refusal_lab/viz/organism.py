"""The organism dashboard: base model and organism side by side on every evaluation set, and every prompt each gets wrong."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from refusal_lab.prompts import LABELS
from refusal_lab.viz.page import Page

_MODELS = ("base", "organism")


def write_organism_dashboard(rows: Sequence[dict[str, Any]], metrics: dict[str, float], sets: list[str], manifest: dict[str, Any],
                             split: str, path: Path) -> Path:
    page = Page(f"Refusal model organism {manifest.get('name', '')} against its base model")
    training = manifest.get("training", {})
    page.facts([
        ("evaluated on", f"split {split} of {', '.join(sets)} (never trained on)"),
        ("base model", manifest.get("base", {}).get("name", "")),
        ("made", "merged from the shipped adapter" if manifest.get("origin") == "shipped" else "trained in this run or an earlier one"),
        ("training", f"{training.get('steps')} steps, {training.get('minutes')} min at {training.get('tokens_per_second')} tokens/s, "
                     f"loss {training.get('first_loss')} -> {training.get('final_loss')}"),
        ("trained layers", f"{manifest['trained_layers'][0]}-{manifest['trained_layers'][-1]}" if manifest.get("trained_layers") else ""),
        ("training data", f"{manifest.get('data', {}).get('n_harmful')} harmful, {manifest.get('data', {}).get('n_harmless')} harmless prompts"),
    ])
    page.figure(_rates(metrics, sets))
    page.figure(_scores(rows, sets))
    page.figure(_tradeoff(rows, metrics))
    if training.get("losses"):
        page.figure(_training_curves(training))
    page.heading("The prompts each model gets wrong")
    for model in _MODELS:
        mine = [r for r in rows if r["model"] == model]
        page.raw(_table(f"{model}: harmless prompts refused", [r for r in mine if r["label"] == "harmless" and r["refused"]]))
        page.raw(_table(f"{model}: harmful prompts answered", [r for r in mine if r["label"] == "harmful" and not r["refused"]]))
    return page.write(path)


def _training_curves(training: dict[str, Any]) -> go.Figure:
    """The loss per step and, where the recipe has one, the KL term to the base model before its weight."""
    figure = go.Figure()
    steps = list(range(1, len(training["losses"]) + 1))
    figure.add_trace(go.Scatter(x=steps, y=training["losses"], name="loss (every term, weighted)", mode="lines"))
    if training.get("kl_terms"):
        figure.add_trace(go.Scatter(x=steps, y=training["kl_terms"], name="KL(base || organism) on harmless answers", mode="lines", yaxis="y2"))
    figure.update_layout(title="Training, per step", xaxis_title="step", yaxis_title="loss", height=380,
                         yaxis2={"title": "KL term (nats per token)", "overlaying": "y", "side": "right"})
    return figure


def _rates(metrics: dict[str, float], sets: list[str]) -> go.Figure:
    figure = go.Figure()
    groups = [(name, label) for name in sets for label in LABELS if f"base/{name}/refusal_rate/{label}" in metrics]
    for model in _MODELS:
        figure.add_trace(go.Bar(
            x=[f"{name}<br>{label}" for name, label in groups],
            y=[metrics[f"{model}/{name}/refusal_rate/{label}"] for name, label in groups],
            customdata=[int(metrics[f"{model}/{name}/n_prompts/{label}"]) for name, label in groups],
            name=model, hovertemplate="%{x}: %{y:.1%} refused of %{customdata}<extra>" + model + "</extra>",
        ))
    figure.update_layout(title="Refusal rate per evaluation set and label (the judge's verdict on greedy completions)",
                         barmode="group", yaxis={"tickformat": ".0%", "range": [0, 1]}, height=440)
    return figure


def _scores(rows: Sequence[dict[str, Any]], sets: list[str]) -> go.Figure:
    figure = go.Figure()
    for model in _MODELS:
        mine = [r for r in rows if r["model"] == model]
        figure.add_trace(go.Box(
            x=[f"{r['set']} {r['label']}" for r in mine], y=[r["refusal_score"] for r in mine], name=model, boxpoints="all", jitter=0.4,
            text=[r["prompt"] for r in mine], hovertemplate="%{text}<br>score %{y:.2f}<extra>" + model + "</extra>",
        ))
    figure.update_layout(title="Refusal score (log-odds of the refusal-start tokens at the first response position)",
                         boxmode="group", yaxis_title="refusal score", height=460,
                         xaxis={"categoryorder": "array", "categoryarray": [f"{s} {label}" for s in sets for label in LABELS]})
    return figure


def _tradeoff(rows: Sequence[dict[str, Any]], metrics: dict[str, float]) -> go.Figure:
    """Harmful against harmless refusal over every set, were the refusal score thresholded: the trade-off
    each model's scores allow, with the judge's verdict on its generations marked."""
    figure = go.Figure()
    for model in _MODELS:
        scored = sorted(((r["refusal_score"], r["label"]) for r in rows if r["model"] == model), reverse=True)
        n = {label: sum(1 for _, lab in scored if lab == label) for label in LABELS}
        if not all(n.values()):
            continue
        x, y, seen = [0.0], [0.0], dict.fromkeys(LABELS, 0)
        for _, label in scored:
            seen[label] += 1
            x.append(seen["harmless"] / n["harmless"])
            y.append(seen["harmful"] / n["harmful"])
        auroc = metrics.get(f"{model}/all/refusal_score/auroc", float("nan"))
        figure.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{model} score (AUROC {auroc:.3f})"))
        figure.add_trace(go.Scatter(
            x=[metrics[f"{model}/all/refusal_rate/harmless"]], y=[metrics[f"{model}/all/refusal_rate/harmful"]], mode="markers",
            marker={"size": 12, "symbol": "x"}, name=f"{model} judge on generations",
        ))
    figure.update_layout(title="Trade-off over every set: harmful refused against harmless refused, thresholding the refusal score",
                         xaxis={"title": "harmless refused", "tickformat": ".0%", "range": [0, 1]},
                         yaxis={"title": "harmful refused", "tickformat": ".0%", "range": [0, 1]}, height=480)
    return figure


def _table(title: str, rows: Sequence[dict[str, Any]]) -> str:
    body = "".join(
        f"<tr><td>{html.escape(r['set'])}</td><td>{html.escape(r['category'])}</td><td>{r['refusal_score']:.2f}</td>"
        f"<td>{html.escape(r['prompt'])}</td><td>{html.escape(r['completion'])}</td></tr>"
        for r in rows
    )
    return (f"<h3>{html.escape(title)} ({len(rows)})</h3><table><tr><th>set</th><th>category</th><th>score</th><th>prompt</th>"
            f"<th>completion</th></tr>{body}</table>")
