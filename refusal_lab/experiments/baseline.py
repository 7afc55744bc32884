"""Baseline: how often, and how strongly, the model refuses harmful and harmless prompts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig
from scipy.stats import mannwhitneyu

from refusal_lab import metric_keys as K
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.prompts import LABELS, PromptRecord
from refusal_lab.viz.baseline import write_baseline_dashboard

log = logging.getLogger(__name__)


def check_baseline(cfg: DictConfig) -> None:
    from refusal_lab.experiments.side_sets import load_side_sets

    load_side_sets(cfg.experiment, cfg.prompts.get("split"))


@register_experiment("baseline", check=check_baseline)
def run_baseline(context: ExperimentContext) -> ExperimentResult:
    """Greedy completions judged for refusal, and the refusal score, per label and category; the side sets' refusal rates."""
    from refusal_lab.experiments.side_sets import load_side_sets, side_set_rates, side_set_rows

    cfg = context.cfg
    rows = answer_rows(context, context.prompts.records, cfg.experiment, "baseline")
    metrics, per_category = summarize(rows)
    side_rows = side_set_rows(context, load_side_sets(cfg.experiment, cfg.prompts.get("split")), "none")
    side = side_set_rates(side_rows).get("none", {})
    metrics.update({K.side_refusal(name): values["refusal_rate"] for name, values in side.items()})
    _log_summary(metrics, per_category)
    for name, values in side.items():
        log.info("%s (side set, %d prompts): refusal rate %.0f%%", name, values["n"], 100 * values["refusal_rate"])
    facts = [
        ("title", f"Baseline: {context.model.name} at {context.model.precision.name}"),
        ("prompts", f"{context.prompts.name}, split {cfg.prompts.get('split') or 'all'}, {len(rows)} prompts"),
        ("judge", context.judge.name),
        ("completions", f"greedy, up to {cfg.experiment.max_new_tokens} new tokens"),
    ]
    dashboard = write_baseline_dashboard(rows, metrics, per_category, facts, context.path("baseline", "dashboard.html"))
    return ExperimentResult(
        metrics=metrics,
        details={"per_category": per_category, "side_sets": side},
        tables={"completions": rows, **({"side_sets": side_rows} if side_rows else {})},
        files={"dashboard": dashboard},
    )


def answer_rows(context: ExperimentContext, records: Sequence[PromptRecord], exp: DictConfig, description: str,
                hooks: Any = None) -> list[dict[str, Any]]:
    """One row per prompt: its greedy completion, the judge's verdict and the refusal score (under ``hooks``, if any)."""
    generations = context.generate(records, int(exp.max_new_tokens), int(exp.batch_size), description, hooks=hooks)
    return [
        {
            "index": i,
            "pair_id": record.pair_id,
            "label": record.label,
            "category": record.category,
            "kind": record.kind,
            "split": record.split,
            "prompt": record.prompt,
            "completion": generation.completion,
            "refused": context.judge.is_refusal(generation.completion),
            "refusal_score": round(float(generation.readout), 5),
            "n_new_tokens": generation.n_new_tokens,
        }
        for i, (record, generation) in enumerate(zip(records, generations))
    ]


def summarize(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Refusal rates and score statistics per label and per (label, category), and refusal rates per
    kind where prompts name one (``kind/<kind>/refusal_rate``).

    ``refusal_score/auroc`` is the chance that a random harmful prompt outscores a random harmless
    one; ``refusal_score/iqr_gap`` is harmful Q1 minus harmless Q3 (positive: the IQRs do not overlap).
    """
    metrics: dict[str, float] = {}
    scores: dict[str, np.ndarray] = {}
    for label in LABELS:
        subset = [r for r in rows if r["label"] == label]
        if not subset:
            continue
        values = np.array([r["refusal_score"] for r in subset], dtype=np.float64)
        scores[label] = values
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        metrics[f"n_prompts/{label}"] = len(subset)
        metrics[f"refusal_rate/{label}"] = float(np.mean([r["refused"] for r in subset]))
        metrics[f"refusal_score/{label}/mean"] = float(values.mean())
        metrics[f"refusal_score/{label}/median"] = float(median)
        metrics[f"refusal_score/{label}/q25"] = float(q25)
        metrics[f"refusal_score/{label}/q75"] = float(q75)
    if len(scores) == 2:
        harmful, harmless = scores["harmful"], scores["harmless"]
        metrics["refusal_score/separation"] = float(harmful.mean() - harmless.mean())
        # the Mann-Whitney U of harmful over harmless, per pair of prompts: ties count half
        metrics["refusal_score/auroc"] = float(mannwhitneyu(harmful, harmless).statistic / (harmful.size * harmless.size))
        metrics["refusal_score/iqr_gap"] = metrics["refusal_score/harmful/q25"] - metrics["refusal_score/harmless/q75"]

    for kind in sorted({r["kind"] for r in rows if r.get("kind")}):
        subset = [r for r in rows if r.get("kind") == kind]
        metrics[f"kind/{kind}/n_prompts"] = len(subset)
        metrics[f"kind/{kind}/refusal_rate"] = float(np.mean([r["refused"] for r in subset]))

    per_category = []
    for category in sorted({r["category"] for r in rows}):
        for label in LABELS:
            subset = [r for r in rows if r["category"] == category and r["label"] == label]
            if not subset:
                continue
            rate = float(np.mean([r["refused"] for r in subset]))
            mean_score = float(np.mean([r["refusal_score"] for r in subset]))
            metrics[f"refusal_rate/{label}/{category}"] = rate
            metrics[f"refusal_score/{label}/{category}/mean"] = mean_score
            per_category.append(
                {"category": category, "label": label, "n": len(subset), "refusal_rate": rate, "refusal_score_mean": mean_score}
            )
    return metrics, per_category


def _log_summary(metrics: dict[str, float], per_category: list[dict[str, Any]]) -> None:
    log.info("%-16s %-9s %5s %13s %11s", "category", "label", "n", "refusal rate", "mean score")
    for row in per_category:
        log.info(
            "%-16s %-9s %5d %12.0f%% %11.2f",
            row["category"], row["label"], row["n"], 100 * row["refusal_rate"], row["refusal_score_mean"],
        )
    for label in LABELS:
        if f"refusal_rate/{label}" in metrics:
            log.info(
                "%s: refusal rate %.0f%% of %d, mean refusal score %.2f",
                label,
                100 * metrics[f"refusal_rate/{label}"],
                metrics[f"n_prompts/{label}"],
                metrics[f"refusal_score/{label}/mean"],
            )
    if "refusal_score/separation" in metrics:
        log.info(
            "refusal score separation (harmful - harmless): %.2f, AUROC %.3f",
            metrics["refusal_score/separation"],
            metrics["refusal_score/auroc"],
        )
