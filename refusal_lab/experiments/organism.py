"""Organism: build the refusal model organism from the loaded base model, and measure both.

Both models answer the same held-out contrastive split (never trained on): refusal rates and the
refusal score per label and category, and how closely the organism's harmless answers follow the
base model's: the mean per-token KL(base || organism) along the base model's answers, and the share
of answers whose first 20 tokens are identical (a stricter, brittler test).
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows, summarize
from refusal_lab.experiments.registry import ExperimentResult, register_experiment
from refusal_lab.metrics.divergence import mean_token_kl
from refusal_lab.models import load_weights, plan_model
from refusal_lab.organism.build import build_organism, folder_for, organism_source, read_manifest

log = logging.getLogger(__name__)

SAME_PREFIX_TOKENS = 20


@register_experiment("organism")
def run_organism(runner: Any, cfg: DictConfig) -> ExperimentResult:
    """Build (or reuse) the organism and compare it with its base model on held-out prompts."""
    exp = cfg.experiment
    if cfg.model.get("organism"):
        raise ConfigError("experiment=organism trains from a base model; use model=smollm2 (or another base), not an organism")
    records = runner.prompts.select(split=exp.eval_split).records
    base_rows = answer_rows(runner, records, exp, "base model")

    name = str(exp.training.name)
    folder = folder_for(exp.training, runner.model.source.weights_identity, cfg.paths.cache_dir)
    manifest = read_manifest(folder)
    if manifest is None or exp.rebuild:
        reference = copy.deepcopy(runner.model.model)  # the build changes the base model's weights in place
        folder, manifest = build_organism(runner.model, exp.training, cfg.paths.cache_dir)  # runner.model is now the organism
    else:
        log.info("Reusing the organism at %s (experiment.rebuild=true trains it again)", folder)
        reference = runner.model.model
        plan = plan_model(OmegaConf.create({"name": name, "path": str(folder)}), cfg.quant, cfg.paths.cache_dir)
        runner.model = load_weights(OmegaConf.create({"name": name}), plan)
        runner.model.source = organism_source(folder)
    organism_rows = answer_rows(runner, records, exp, "organism")

    metrics: dict[str, float] = {}
    per_category = []
    for model, rows in (("base", base_rows), ("organism", organism_rows)):
        model_metrics, model_categories = summarize(rows)
        metrics.update({f"{model}/{k}": v for k, v in model_metrics.items()})
        per_category += [{"model": model, **row} for row in model_categories]
    metrics[f"organism/harmless_same_first_{SAME_PREFIX_TOKENS}_tokens"] = _same_prefix_share(runner, base_rows, organism_rows)
    harmless = [(record, row) for record, row in zip(records, base_rows, strict=True) if row["label"] == "harmless"]
    kl = mean_token_kl(
        reference, runner.model.model, runner.model.tokenizer, runner.chat_texts([r for r, _ in harmless]), [row["completion"] for _, row in harmless]
    )
    del reference
    for (_, row), value in zip(harmless, kl, strict=True):
        row["kl_to_base"] = round(value, 5)
    finite = [v for v in kl if not math.isnan(v)]
    metrics["organism/harmless_kl_to_base"] = sum(finite) / len(finite) if finite else float("nan")
    metrics["organism/build_seconds"] = float(manifest["build_seconds"])
    _log_summary(metrics)
    for rows, model in ((base_rows, "base"), (organism_rows, "organism")):
        for row in rows:
            row["model"] = model
    return ExperimentResult(
        metrics=metrics,
        details={"organism_folder": str(folder), "manifest": manifest, "per_category": per_category},
        tables={"completions": base_rows + organism_rows},
    )


def _same_prefix_share(runner: Any, base_rows: list[dict[str, Any]], organism_rows: list[dict[str, Any]]) -> float:
    tokenize = runner.model.tokenizer
    same = [
        tokenize(b["completion"], add_special_tokens=False)["input_ids"][:SAME_PREFIX_TOKENS]
        == tokenize(o["completion"], add_special_tokens=False)["input_ids"][:SAME_PREFIX_TOKENS]
        for b, o in zip(base_rows, organism_rows)
        if b["label"] == "harmless"
    ]
    return sum(same) / len(same) if same else float("nan")


def _log_summary(metrics: dict[str, float]) -> None:
    for model in ("base", "organism"):
        log.info(
            "%-8s refusal rate harmful %5.1f%%  harmless %5.1f%%  refusal score harmful %.2f [%.2f, %.2f]  harmless %.2f [%.2f, %.2f]",
            model,
            100 * metrics[f"{model}/refusal_rate/harmful"],
            100 * metrics[f"{model}/refusal_rate/harmless"],
            metrics[f"{model}/refusal_score/harmful/mean"],
            metrics[f"{model}/refusal_score/harmful/q25"],
            metrics[f"{model}/refusal_score/harmful/q75"],
            metrics[f"{model}/refusal_score/harmless/mean"],
            metrics[f"{model}/refusal_score/harmless/q25"],
            metrics[f"{model}/refusal_score/harmless/q75"],
        )
    log.info(
        "organism: mean per-token KL(base || organism) along the base model's harmless answers %.3f nats; "
        "%.0f%% of harmless answers share the base model's first %d tokens",
        metrics["organism/harmless_kl_to_base"],
        100 * metrics[f"organism/harmless_same_first_{SAME_PREFIX_TOKENS}_tokens"],
        SAME_PREFIX_TOKENS,
    )
