"""Organism: make the refusal model organism from the loaded base model, and measure both.

Both models answer the same held-out splits of every evaluation set (``experiment.eval_sets``,
never trained on): the contrastive pairs, everyday requests and benchmark-style harmful requests.
Per set and over all of them: refusal rates per label and category, the refusal score's AUROC and
IQR gap, and how closely the organism's harmless answers follow the base model's (the mean
per-token KL(base || organism) along the base model's answers, and the share of answers whose
first 20 tokens are identical, a stricter and brittler test).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows, summarize
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.metrics.divergence import mean_token_kl
from refusal_lab.models import load_weights, plan_model
from refusal_lab.organism.build import Organism, folder_for, log_figures, make_organism, organism_source, read_manifest, ship_adapter
from refusal_lab.prompts import LABELS, PromptRecord, load_prompt_set
from refusal_lab.viz.organism import write_organism_dashboard

log = logging.getLogger(__name__)

SAME_PREFIX_TOKENS = 20
ALL = "all"  # the metrics over every evaluation set together
MODELS = ("base", "organism")


def check_organism(cfg: DictConfig) -> None:
    if cfg.model.get("organism"):
        raise ConfigError("experiment=organism trains from a base model; use model=smollm2 (or another base), not an organism")
    if not cfg.experiment.get("eval_sets"):
        raise ConfigError("experiment.eval_sets is empty: name at least one prompt file to measure the organism on")
    if ALL in cfg.experiment.eval_sets:
        raise ConfigError(f"experiment.eval_sets may not name a set {ALL!r}: that name holds the metrics over every set")
    if cfg.experiment.get("ship") and not cfg.experiment.training.get("adapter"):
        raise ConfigError("experiment.ship=true needs experiment.training.adapter: the folder to ship the adapter to")
    _evaluation_sets(cfg.experiment)  # every file readable, with the split asked for


@register_experiment("organism", check=check_organism)
def run_organism(context: ExperimentContext) -> ExperimentResult:
    """Make (or reuse) the organism and compare it with its base model on held-out prompts."""
    cfg = context.cfg
    exp = cfg.experiment
    sets = _evaluation_sets(exp)
    records = [record for prompts in sets.values() for record in prompts]
    set_of = [name for name, prompts in sets.items() for _ in prompts]
    rows = {"base": answer_rows(context, records, exp, "base model")}
    harmless = [i for i, record in enumerate(records) if record.label == "harmless"]

    made = organism_beside_base(context)
    folder, manifest = made.folder, made.manifest
    as_organism = dataclasses.replace(context, model=made.model, clean_runs=None)  # the base model's clean runs are not its own
    try:
        rows["organism"] = answer_rows(as_organism, records, exp, "organism")
        kl = mean_token_kl(
            context.model.model, made.model.model, context.model.tokenizer,
            context.chat_texts([records[i] for i in harmless]), [rows["base"][i]["completion"] for i in harmless],
        )
        organism_model = made.model.describe()
    finally:
        made.model.close()
    for model in MODELS:
        for row, name in zip(rows[model], set_of, strict=True):
            row["set"], row["model"] = name, model

    for i, value in zip(harmless, kl, strict=True):
        rows["organism"][i]["kl_to_base"] = round(value, 5)

    metrics: dict[str, float] = {}
    per_category = []
    for set_name in [*sets, ALL]:
        chosen = [i for i, name in enumerate(set_of) if set_name in (name, ALL)]
        for model in MODELS:
            set_metrics, set_categories = summarize([rows[model][i] for i in chosen])
            metrics.update({f"{model}/{set_name}/{k}": v for k, v in set_metrics.items()})
            if set_name != ALL:
                per_category += [{"model": model, "set": set_name, **row} for row in set_categories]
        metrics.update(_closeness(context, [rows["base"][i] for i in chosen], [rows["organism"][i] for i in chosen], f"organism/{set_name}"))
    metrics["organism/build_seconds"] = float(manifest["build_seconds"])
    _log_summary(metrics, list(sets))
    evaluation = _evaluation_figures(metrics, list(sets), str(exp.eval_split))
    shipped = None
    if exp.get("ship"):
        choices = exp.training.get("choices")
        shipped = ship_adapter(folder, Path(str(exp.training.adapter)), evaluation, list(choices) if choices else None)
    dashboard = write_organism_dashboard(
        rows["base"] + rows["organism"], metrics, list(sets), manifest, str(exp.eval_split),
        context.path("organism", "dashboard.html"),
    )
    return ExperimentResult(
        metrics=metrics,
        details={
            "organism_folder": str(folder), "organism_model": organism_model, "manifest": manifest, "per_category": per_category, "evaluation": evaluation,
            "eval_sets": {name: str(path) for name, path in exp.eval_sets.items()}, "shipped_to": str(shipped) if shipped else None,
        },
        tables={"completions": rows["base"] + rows["organism"]},
        files={"dashboard": dashboard},
    )


def organism_beside_base(context: ExperimentContext) -> Organism:
    """The organism made from the loaded base model (or loaded from the cache), as a model of its own:
    the base model stays loaded and unchanged, the reference for the KL."""
    exp, cfg = context.settings, context.cfg
    folder = folder_for(exp.training, context.model.source.weights_identity, cfg.paths.cache_dir)
    manifest = read_manifest(folder)
    if manifest is None or exp.rebuild:
        return make_organism(context.model, exp.training, cfg.paths.cache_dir, rebuild=bool(exp.rebuild))
    log.info("Reusing the organism at %s (experiment.rebuild=true trains it again)", folder)
    log_figures(manifest)
    name = str(exp.training.name)
    plan = plan_model(OmegaConf.create({"name": name, "path": str(folder)}), cfg.quant, cfg.paths.cache_dir,
                      source=organism_source(folder, "cache"))
    return Organism(folder, manifest, load_weights(OmegaConf.create({"name": name}), plan))


def _evaluation_sets(exp: DictConfig) -> dict[str, tuple[PromptRecord, ...]]:
    """Each named set's held-out split (``eval_limit``: the first N of each label, for quick runs)."""
    sets = {}
    for name, path in exp.eval_sets.items():
        chosen = load_prompt_set(path, str(name)).select(split=exp.eval_split, limit=exp.get("eval_limit"))
        if not chosen.records:
            raise ConfigError(f"experiment.eval_sets.{name} ({path}) has no prompts in split {exp.eval_split!r}")
        sets[str(name)] = chosen.records
    return sets


def _closeness(context: ExperimentContext, base_rows: list[dict[str, Any]], organism_rows: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    """How far the organism's harmless answers moved from the base model's: KL and the same first tokens."""
    pairs = [(b, o) for b, o in zip(base_rows, organism_rows, strict=True) if b["label"] == "harmless"]
    if not pairs:
        return {}
    tokenize = context.model.tokenizer
    same = [
        tokenize(b["completion"], add_special_tokens=False)["input_ids"][:SAME_PREFIX_TOKENS]
        == tokenize(o["completion"], add_special_tokens=False)["input_ids"][:SAME_PREFIX_TOKENS]
        for b, o in pairs
    ]
    finite = [o["kl_to_base"] for _, o in pairs if not math.isnan(o["kl_to_base"])]
    return {
        f"{prefix}/harmless_same_first_{SAME_PREFIX_TOKENS}_tokens": sum(same) / len(same),
        f"{prefix}/harmless_kl_to_base": sum(finite) / len(finite) if finite else float("nan"),
    }


_FIGURES = {
    "refused harmful": "refusal_rate/harmful",
    "refused harmless": "refusal_rate/harmless",
    "AUROC": "refusal_score/auroc",
    "IQR gap": "refusal_score/iqr_gap",
}


def _kinds(metrics: dict[str, float], model: str, set_name: str) -> list[str]:
    """The prompt kinds whose refusal rate ``summarize`` reported for this model and set."""
    prefix = f"{model}/{set_name}/kind/"
    return sorted(k[len(prefix) :].split("/")[0] for k in metrics if k.startswith(prefix) and k.endswith("/refusal_rate"))


def _evaluation_figures(metrics: dict[str, float], sets: list[str], split: str) -> dict[str, Any]:
    """The headline figures per set for both models, as a manifest records them."""
    figures: dict[str, Any] = {"split": split, "sets": {}, "base": {}}
    for name in [*sets, ALL]:
        for model, target in (("organism", figures["sets"]), ("base", figures["base"])):
            row = {label: round(metrics[f"{model}/{name}/{key}"], 4) for label, key in _FIGURES.items() if f"{model}/{name}/{key}" in metrics}
            kinds = [kind for kind in _kinds(metrics, model, name) if kind not in LABELS]  # "refused harmful" is the label's rate over every prompt
            row.update({f"refused {kind}": round(metrics[f"{model}/{name}/kind/{kind}/refusal_rate"], 4) for kind in kinds})
            kl = metrics.get(f"organism/{name}/harmless_kl_to_base")
            if model == "organism" and kl is not None:
                row["KL to base"] = round(kl, 4)
            target[name] = row
    return figures


def _log_summary(metrics: dict[str, float], sets: list[str]) -> None:
    log.info("%-12s %-8s %9s %9s %7s %8s %8s", "set", "model", "harmful", "harmless", "AUROC", "IQR gap", "KL")
    for name in [*sets, ALL]:
        for model in MODELS:
            def value(key: str, percent: bool = False) -> str:
                v = metrics.get(f"{model}/{name}/{key}")
                return "-" if v is None else (f"{100 * v:.1f}%" if percent else f"{v:.3f}")

            kl = metrics.get(f"organism/{name}/harmless_kl_to_base") if model == "organism" else None
            log.info(
                "%-12s %-8s %9s %9s %7s %8s %8s", name, model, value("refusal_rate/harmful", True), value("refusal_rate/harmless", True),
                value("refusal_score/auroc"), value("refusal_score/iqr_gap"), "-" if kl is None else f"{kl:.3f}",
            )
            kinds = _kinds(metrics, model, name)
            if kinds:
                log.info("%-12s %-8s refused per kind: %s", "", "", ", ".join(f"{kind} {value(f'kind/{kind}/refusal_rate', True)}" for kind in kinds))
