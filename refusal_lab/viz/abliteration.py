"""The optimised ablation's dashboard: every trial on the two objectives with the Pareto front, the chosen trial
and the paper's single direction on the same axes; the chosen ablation's weight per layer; both measured on the
evaluation split beside the unablated model."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from refusal_lab.viz.page import Page


def write_abliteration_dashboard(details: dict[str, Any], header: dict[str, Any], path: Path) -> Path:
    page = Page(header["title"])
    chosen = details["chosen"]
    page.facts([
        ("prompts", f"{header['prompts']}: directions from {details['splits']['directions']}, searched on {details['splits']['search']}, "
                    f"measured on {details['splits']['evaluation']}"),
        ("search", f"{details['search']['n_trials']} trials ({details['search']['sampler']}), {len(details['pareto'])} on the Pareto front"),
        ("chosen", f"trial {chosen['number']}: {chosen['rule']}"),
        ("single direction", "none to compare with" if details["single_direction"] is None else
         f"layer {details['single_direction']['layer']}, position {details['single_direction']['position']} (experiment=direction)"),
    ])
    page.figure(_front(details))
    page.figure(_kernel(chosen["ablation"]))
    page.raw(_measured(details["measured"], details["bootstrap"]["level"]))
    return page.write(path)


def _front(details: dict[str, Any]) -> go.Figure:
    trials = details["trials"]
    front = sorted((t for t in trials if t["pareto"]), key=lambda t: t["kl"])
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[t["kl"] for t in trials], y=[t["refusal"] for t in trials], mode="markers", name="trials",
                                marker={"color": "lightgrey", "size": 7}, text=[f"trial {t['number']} (KL upper bound {t.get('kl_upper') or float('nan'):.3f})" for t in trials],
                                hovertemplate="%{text}: KL %{x:.3f}, refusal %{y:.0%}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[t["kl"] for t in front], y=[t["refusal"] for t in front], mode="lines+markers", name="Pareto front",
                                line={"shape": "hv", "color": "crimson"}, marker={"color": "crimson", "size": 8}))
    optimised = details["points"]["search"]["optimised"]
    figure.add_trace(go.Scatter(x=[optimised["kl"]], y=[optimised["refusal"]], mode="markers", name="chosen trial",
                                marker={"symbol": "star", "size": 16, "color": "black"}))
    single = details["points"]["search"].get("single direction")
    if single is not None:
        figure.add_trace(go.Scatter(x=[single["kl"]], y=[single["refusal"]], mode="markers", name="the paper's single direction",
                                    marker={"symbol": "diamond", "size": 14, "color": "royalblue"}))
    figure.update_xaxes(title_text="harmless next-token KL (nats, first response position)", type="log")
    figure.update_yaxes(title_text="harmful refusal (judge, search split)", tickformat=".0%")
    figure.update_layout(title="Refusal left against damage done, search split", height=500)
    return figure


def _kernel(ablation: dict[str, Any]) -> go.Figure:
    figure = go.Figure()
    for writer, weights in ablation["layer_weights"].items():
        figure.add_trace(go.Bar(x=list(range(len(weights))), y=weights, name=writer))
    figure.update_layout(title=f"The chosen ablation's weight per layer (direction index {ablation['direction_index']:.2f})",
                         barmode="group", height=360, xaxis_title="layer", yaxis_title="weight of the direction removed")
    return figure


def _measured(measured: dict[str, Any], level: float) -> str:
    sides = sorted({name for values in measured.values() for name in values["side_sets"]})
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["", "harmful refused", "harmless refused", *[f"{s} refused" for s in sides],
                                                             "harmless KL (first token)", "harmless KL median",
                                                             "harmless KL where it answered unablated", "harmless KL along the first answer tokens",
                                                             "cross-entropy change"])

    def cell(stat: dict[str, Any] | None, fmt: str) -> str:
        if not stat:
            return "<td>-</td>"
        interval = "" if stat.get("ci_low") is None else f" [{format(stat['ci_low'], fmt)}, {format(stat['ci_high'], fmt)}]"
        return f"<td>{format(stat['mean'], fmt)}{interval}</td>"

    body = ""
    for condition, values in measured.items():
        cost = values.get("cost") or {}
        body += (f"<tr><td>{html.escape(condition)}</td>{cell(values['harmful_refusal'], '.0%')}{cell(values['harmless_refusal'], '.0%')}"
                 + "".join(f"<td>{values['side_sets'][s]['refusal_rate']:.0%}</td>" for s in sides)
                 + cell(cost.get("kl"), ".3f") + (f"<td>{cost['kl_median']:.3f}</td>" if "kl_median" in cost else "<td>-</td>")
                 + cell((cost.get("kl_by_unablated_decision") or {}).get("answered"), ".3f") + cell(cost.get("kl_tokens"), ".3f") + cell((cost.get("cross_entropy") or {}).get("change"), "+.3f") + "</tr>")
    return f"<h3>Measured on the evaluation split ({level:.0%} intervals)</h3><table><tr>{head}</tr>{body}</table>"
