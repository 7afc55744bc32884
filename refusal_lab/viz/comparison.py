"""The comparison report: one self-contained page, a row per job of the sweep, figures per question."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from refusal_lab import metric_keys as K
from refusal_lab.tracking.wandb_tracker import table_columns
from refusal_lab.viz.page import Page

# (question, [(metric key, legend name)], axis format)
FIGURES = [
    ("Refusal rates", [(K.HARMFUL_REFUSAL, "harmful"), (K.HARMLESS_REFUSAL, "harmless")], ".0%"),
    ("Patching effects against the fp32 job: Spearman rank correlation and top-10 overlap",
     [(K.compared_patching("harmless_to_harmful", "spearman"), "Spearman, harmless->harmful"),
      (K.compared_patching("harmful_to_harmless", "spearman"), "Spearman, harmful->harmless"),
      (K.compared_patching("harmless_to_harmful", "top_k_overlap"), "top-10 overlap, harmless->harmful"),
      (K.compared_patching("harmful_to_harmless", "top_k_overlap"), "top-10 overlap, harmful->harmless")], ".2f"),
    ("The refusal direction against the fp32 job's: cosine similarity",
     [(K.DIRECTION_COSINE, "chosen direction"), (K.DIRECTION_COSINE_AT_CELL, "candidate at fp32's layer and position")], ".3f"),
    ("Interventions: harmful refusal rate with the direction or the top-k components ablated; harmless with the direction added",
     [(K.direction_refusal("harmful", "none"), "harmful, nothing done"), (K.direction_refusal("harmful", "ablation"), "harmful, direction ablated"),
      (K.compared_ablation("top", "refusal_rate"), "harmful, top-k components ablated"),
      (K.compared_ablation("random", "refusal_rate"), "harmful, k random components ablated"),
      (K.direction_refusal("harmless", "addition"), "harmless, direction added")], ".0%"),
]


def write_comparison_page(document: dict[str, Any], path: Path) -> Path:
    rows = document["jobs"]
    page = Page(f"Comparison of {len(rows)} jobs: {path.parent.name}")
    page.facts([
        ("jobs", f"{len(rows)}, {sum(r['status'] == 'finished' for r in rows)} finished"),
        ("what varies", ", ".join(document["varying"]) or "nothing"),
        ("reference", f"each job's {document['reference_precision']} job with the same other overrides"),
    ])
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        page.heading("Failed jobs")
        page.raw(_table(["job", "status", "why"], [[r["job"], r["status"], "; ".join(f"{k}: {v}" for k, v in r["failures"].items())] for r in failed]))
    labels = [r["job"] for r in rows]
    for title, series, form in FIGURES:
        present = [(key, name) for key, name in series if any(r.get(key) is not None for r in rows)]
        if not present:
            continue
        figure = go.Figure([go.Bar(x=labels, y=[r.get(key) for r in rows], name=name) for key, name in present])
        figure.update_layout(title=title, barmode="group", yaxis={"tickformat": form}, height=420)
        page.figure(figure)
    page.heading("Every job")
    columns = [c for c in table_columns(rows) if c not in ("failures", "setting", "experiments")]
    page.raw(_table(columns, [[_show(r.get(c)) for c in columns] for r in rows]))
    return page.write(path)


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
