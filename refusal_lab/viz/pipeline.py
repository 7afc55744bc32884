"""The pipeline's dashboard: one page that says what each stage found and links to the stage's own dashboard."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from refusal_lab import metric_keys as K
from refusal_lab.viz.page import Page

DIRECTIONS = ("harmless_to_harmful", "harmful_to_harmless")

# The figures each stage's section shows first (every metric is in the stage's results file).
HEADLINES = {
    "baseline": [K.HARMFUL_REFUSAL, K.HARMLESS_REFUSAL, K.SEPARATION, K.AUROC, K.side_refusal("overrefusal")],
    "patching": [K.patching_pairs("patching"), *(K.patching_top_effect("patching", d) for d in DIRECTIONS)],
    "attribution": [K.patching_pairs("attribution"), *(K.patching_top_effect("attribution", d) for d in DIRECTIONS)],
    "ablation": [K.ABLATION_NONE, K.ABLATION_NECESSARY, K.ABLATION_BEST_GAP],
    "direction": [K.DIRECTION_LAYER, K.DIRECTION_POSITION, K.direction_refusal("harmful", "none"), K.direction_refusal("harmful", "ablation"),
                  K.direction_refusal("harmless", "none"), K.direction_refusal("harmless", "addition"), K.DIRECTION_ABLATION_KL,
                  K.direction_refusal("overrefusal", "ablation")],
    "abliteration": [K.ABLITERATION_TRIALS, K.abliteration("none", "harmful_refusal"), K.abliteration("optimised", "harmful_refusal"),
                     K.abliteration("optimised", "kl"), K.abliteration("optimised", "overrefusal_refusal"),
                     K.abliteration("single direction", "harmful_refusal"), K.abliteration("single direction", "kl")],
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
