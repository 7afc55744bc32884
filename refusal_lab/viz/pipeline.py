"""The pipeline's dashboard: one page that says what each stage found and links to the stage's own dashboard."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from refusal_lab.viz.page import Page

# The figures each stage's section shows first (every metric is in the stage's results file).
HEADLINES = {
    "baseline": ["refusal_rate/harmful", "refusal_rate/harmless", "refusal_score/separation", "refusal_score/auroc"],
    "patching": ["patching/n_pairs", "patching/harmless_to_harmful/top_effect", "patching/harmful_to_harmless/top_effect"],
    "attribution": ["attribution/n_pairs", "attribution/harmless_to_harmful/top_effect", "attribution/harmful_to_harmless/top_effect"],
    "ablation": ["ablation/k0/refusal_rate", "ablation/necessary", "ablation/best_matched_gap"],
    "direction": ["direction/chosen/layer", "direction/chosen/position", "direction/harmful/none/refusal_rate",
                  "direction/harmful/ablation/refusal_rate", "direction/harmless/none/refusal_rate",
                  "direction/harmless/addition/refusal_rate", "direction/harmless/ablation/kl"],
    "abliteration": ["abliteration/n_trials", "abliteration/none/harmful_refusal", "abliteration/optimised/harmful_refusal",
                     "abliteration/optimised/kl", "abliteration/optimised/overrefusal_refusal", "abliteration/single_direction/harmful_refusal",
                     "abliteration/single_direction/kl"],
}


def write_pipeline_dashboard(rows: list[dict[str, Any]], metrics: dict[str, dict[str, float]], path: Path) -> Path:
    page = Page("The refusal study, stage by stage")
    page.facts([("stages", " -> ".join(r["stage"] for r in rows)),
                ("time", f"{sum(r['seconds'] for r in rows):.0f} s on one loaded model")])
    for row in rows:
        page.heading(f"{row['stage']} ({row['seconds']:.0f} s, split {row['split'] or 'several'}, {row['n_prompts']} prompts)")
        links = [f"<a href='{html.escape(_relative(row[key], path))}'>{label}</a>"
                 for key, label in (("dashboard", "dashboard"), ("results", "results file")) if row[key]]
        page.raw("<p>" + " · ".join(links) + "</p>")
        stage_metrics = metrics[row["stage"]]
        shown = [(key, value) for key, value in stage_metrics.items() if key in HEADLINES.get(row["stage"], []) or _is_curve(row["stage"], key)]
        page.facts([(key, _shown(key, value, stage_metrics)) for key, value in shown])
    return page.write(path)


def _shown(key: str, value: Any, stage_metrics: dict[str, Any]) -> str:
    """A value as the page shows it; an ablation arm that broke the model says so beside its number."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if key.startswith("ablation/") and stage_metrics.get(key.rsplit("/", 1)[0] + "/broken"):
        text += " (model broken: not evidence of necessity)"
    return text


def _is_curve(stage: str, key: str) -> bool:
    """Ablation's refusal rate with the top-k and the random k ablated, for every k."""
    return stage == "ablation" and key.endswith("/refusal_rate") and ("/top/" in key or "/random/" in key)


def _relative(target: str, page: Path) -> str:
    """A link from the page (in results/) to a file given relative to the job folder."""
    return Path(target).name if Path(target).parent.name == page.parent.name else f"../{target}"
