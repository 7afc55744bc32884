"""The refusal direction, ``experiment=direction`` (Arditi et al. 2024, "Refusal in Language Models Is
Mediated by a Single Direction").

Candidates are harmful-minus-harmless mean residual streams on the train split, per layer and
post-instruction position; one is chosen on the val split (``direction/selection.py``); on the
test split the model then generates with the direction ablated (harmful prompts) and added
(harmless prompts), judged for refusal, with the side-effect cost beside it: the KL of the next-token
distribution and the change of cross-entropy on the model's own harmless answers. Last, the
weights are orthogonalised and saved as a model folder ``model=local`` loads, and checked against
the hook-ablated model on the test prompts.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from refusal_lab.direction import choose, mean_difference, save_orthogonalised, score_candidates
from refusal_lab.direction.selection import CandidateScores
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.experiments.side_sets import load_side_sets, side_set_rates, side_set_rows
from refusal_lab import metric_keys as K
from refusal_lab.findings import Direction
from refusal_lab.generation import next_token_logits
from refusal_lab.interventions.operations import activation_addition, directional_ablation
from refusal_lab.metrics.divergence import answer_kl, answer_log_probs, mean_token_cross_entropy, next_token_kl
from refusal_lab.models import LoadedModel, load_weights, plan_model
from refusal_lab.models.adapters import adapter_for
from refusal_lab.models.precision import FP32
from refusal_lab.uncertainty import mean_with_interval
from refusal_lab.patching.sweeps import post_instruction_tokens
from refusal_lab.prompts import PromptRecord
from refusal_lab.viz.direction import write_direction_dashboard

log = logging.getLogger(__name__)

STAGES = ("candidates", "selection", "evaluation")  # what each split of experiment.splits is used for


def check_direction(cfg: DictConfig) -> None:
    exp = cfg.experiment
    load_side_sets(exp, str(exp.splits.evaluation))
    if cfg.prompts.get("split") is not None:
        raise ConfigError("experiment=direction uses three splits of the prompt set (experiment.splits); set prompts.split=null")
    splits = {stage: exp.splits.get(stage) for stage in STAGES}
    if None in splits.values() or len(set(splits.values())) != 3:
        raise ConfigError(f"experiment.splits={splits} must name three different splits for {', '.join(STAGES)}")
    if not 0 < float(exp.max_layer_fraction) <= 1:
        raise ConfigError(f"experiment.max_layer_fraction={exp.max_layer_fraction} must be in (0, 1]")
    if exp.get("positions") is not None and int(exp.positions) < 1:
        raise ConfigError(f"experiment.positions={exp.positions} must be at least 1 (or null for the post-instruction tokens)")
    if float(exp.max_kl) <= 0:
        raise ConfigError(f"experiment.max_kl={exp.max_kl} must be positive")
    if exp.get("scores_from") and not Path(str(exp.scores_from)).is_file():
        raise ConfigError(f"experiment.scores_from={exp.scores_from} is not a file; give an earlier run's results/direction.json or null")


@dataclass
class Chosen:
    layer: int
    position: int  # index into the candidate positions; its offset from the end is position - n_positions
    vector: torch.Tensor


@register_experiment("direction", check=check_direction)
def run_direction(context: ExperimentContext) -> ExperimentResult:
    """Find, select, ablate, add and export the refusal direction."""
    exp = context.settings
    prompts = {stage: split_texts(context, str(exp.splits[stage])) for stage in STAGES}
    n_positions = int(exp.positions) if exp.get("positions") is not None else post_instruction_tokens(context.model.tokenizer, context.system_prompt)
    depth = context.model.adapter.n_layers
    if exp.get("scores_from"):
        candidates, scores = earlier_scores(context, Path(str(exp.scores_from)), n_positions)
    else:
        batch = int(exp.batch_size)
        candidates = mean_difference(context.model, *prompts["candidates"]["texts"], positions=n_positions, batch_size=batch)
        layers = range(depth) if exp.score_all_layers else range(int(np.ceil(float(exp.max_layer_fraction) * depth)))
        scores = score_candidates(context.model, candidates, *prompts["selection"]["texts"], context.refusal_ids, batch, layers)
    cell, filtered = choose(scores, depth, float(exp.max_kl), float(exp.min_induce), float(exp.max_layer_fraction))
    selection = {"scores": scores.as_json(), "filtered": filtered, "chosen": None, "positions": list(range(-n_positions, 0))}
    vectors = {"candidates": candidates.contiguous()}
    if cell is None:
        log.warning("No candidate passes the filters (%s); nothing to ablate, add or export. Loosen experiment.max_kl, "
                    "experiment.min_induce or experiment.max_layer_fraction to see more", filtered)
        return write(context, selection, vectors, {}, [], {})
    chosen = Chosen(cell[0], cell[1], candidates[cell])
    selection["chosen"] = describe_choice(chosen, scores, n_positions)
    vectors["direction"] = chosen.vector.clone()
    outcome, rows = intervene_on_test(context, chosen, prompts["evaluation"]["records"])
    exported = export(context, chosen, prompts["evaluation"]["records"]) if exp.export else {}
    return write(context, selection, vectors, outcome, rows, exported)


def earlier_scores(context: ExperimentContext, path: Path, n_positions: int) -> tuple[torch.Tensor, CandidateScores]:
    """The candidates and their scores from an earlier direction run on the same model, precision and prompts
    (to choose again under other thresholds without scoring again); anything else is refused."""
    earlier = json.loads(path.read_text(encoding="utf-8"))
    now = {"model": context.model.name, "precision": context.model.precision.name, "prompts": context.prompts.describe().get("sha256"),
           "splits": dict(context.settings.splits), "limit_per_label": context.settings.get("limit_per_label")}
    then = {"model": earlier["model"]["name"], "precision": earlier["model"]["precision"], "prompts": earlier["prompts"].get("sha256"),
            "splits": earlier["details"]["splits"], "limit_per_label": earlier["config"]["experiment"].get("limit_per_label")}
    if now != then:
        raise ConfigError(f"experiment.scores_from={path} was measured on {then}, not {now}")
    candidates = load_file(str(path.with_name("direction_vectors.safetensors")))["candidates"]
    if candidates.shape[1] != n_positions:
        raise ConfigError(f"experiment.scores_from={path} has {candidates.shape[1]} candidate positions, this run asks for {n_positions}")
    raw = earlier["details"]["selection"]["scores"]
    scores = CandidateScores(*(np.array([[np.nan if v is None else v for v in row] for row in raw[k]], dtype=float) for k in ("bypass", "induce", "kl")))
    log.info("Candidates and their scores from %s (not scored again)", path)
    return candidates, scores


def split_texts(context: ExperimentContext, split: str) -> dict[str, Any]:
    """One split's records, and its harmful and harmless chat texts."""
    limit = context.settings.get("limit_per_label")
    records = list(context.prompts.select(split=split).records)
    by_label = {label: [r for r in records if r.label == label][: limit or None] for label in ("harmful", "harmless")}
    if not by_label["harmful"] or not by_label["harmless"]:
        raise ConfigError(f"the {split} split of {context.prompts.name} needs harmful and harmless prompts")
    return {"records": by_label["harmful"] + by_label["harmless"],
            "texts": (context.chat_texts(by_label["harmful"]), context.chat_texts(by_label["harmless"]))}


def describe_choice(chosen: Chosen, scores: Any, n_positions: int) -> dict[str, Any]:
    cell = (chosen.layer, chosen.position)
    return {
        "layer": chosen.layer, "position": chosen.position - n_positions,
        "bypass": round(float(scores.bypass[cell]), 5), "induce": round(float(scores.induce[cell]), 5),
        "kl": round(float(scores.kl[cell]), 5), "norm": round(float(chosen.vector.norm()), 5),
    }


def intervene_on_test(context: ExperimentContext, chosen: Chosen, records: list[PromptRecord]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generations before and after: ablation on harmful prompts, addition on harmless ones; the cost on harmless ones."""
    exp = context.settings
    harmful = [r for r in records if r.label == "harmful"]
    harmless = [r for r in records if r.label == "harmless"]
    ablation = directional_ablation(context.model.adapter, chosen.vector)
    addition = activation_addition(chosen.vector, chosen.layer, float(exp.addition_scale))
    conditions = {
        ("harmful", "none"): (harmful, None), ("harmful", "ablation"): (harmful, ablation),
        ("harmless", "none"): (harmless, None), ("harmless", "addition"): (harmless, addition),
    }
    rows = []
    for (label, condition), (chosen_records, hooks) in conditions.items():
        for row in answer_rows(context, chosen_records, exp, f"{label}, {condition}", hooks=hooks):
            rows.append({**row, "condition": condition})
    before = [r for r in rows if r["label"] == "harmless" and r["condition"] == "none"]
    side = load_side_sets(exp, str(exp.splits.evaluation))
    side_rows = side_set_rows(context, side, "none") + side_set_rows(context, side, "ablation", hooks=ablation)
    outcome = {
        "refusal": rates(rows, exp.bootstrap, int(context.cfg.seed)),
        "cost": harmless_cost(context, harmless, before, ablation),
        "side_sets": side_set_rates(side_rows),
    }
    return outcome, rows + side_rows


def rates(rows: list[dict[str, Any]], bootstrap: DictConfig, seed: int) -> dict[str, Any]:
    """Refusal rate and mean refusal score per label and condition, overall and per category, with intervals."""
    out: dict[str, Any] = {}
    for label, condition in sorted({(r["label"], r["condition"]) for r in rows}):
        chosen = [r for r in rows if r["label"] == label and r["condition"] == condition]
        key = f"{label}/{condition}"
        out[key] = {
            "refusal_rate": mean_with_interval(np.array([r["refused"] for r in chosen]), int(bootstrap.resamples), float(bootstrap.level), seed),
            "refusal_score": mean_with_interval(np.array([r["refusal_score"] for r in chosen]), int(bootstrap.resamples), float(bootstrap.level), seed),
            "per_category": {
                c: round(float(np.mean([r["refused"] for r in chosen if r["category"] == c])), 5) for c in sorted({r["category"] for r in chosen})
            },
        }
    return out


def harmless_cost(context: ExperimentContext, harmless: list[PromptRecord], before: list[dict[str, Any]], ablation: Any) -> dict[str, Any]:
    """What ablation costs on harmless prompts: next-token KL at the first response position and along the first
    ``kl_tokens`` tokens of the model's own answers, and the cross-entropy of the model's own (unablated) answers with and without the ablation.

    The KL is also split by what the unablated model did: where it refused a harmless prompt, removing the
    refusal is the intended effect and moves the distribution a lot; the prompts it answered show the side
    effect alone. Each harmless row of ``before`` gets its prompt's KL (``kl_under_ablation``)."""
    exp, chats = context.settings, context.chat_texts(harmless)
    reference, _ = next_token_logits(context.model, chats, int(exp.batch_size))
    ablated, _ = next_token_logits(context.model, chats, int(exp.batch_size), hooks=ablation)
    kl = next_token_kl(reference, ablated).numpy()
    for row, value in zip(before, kl, strict=True):
        row["kl_under_ablation"] = round(float(value), 5)
    answers = [r["completion"] for r in before]
    tokens = int(exp.kl_tokens)
    along = answer_kl(answer_log_probs(context.model.model, context.model.tokenizer, chats, answers, tokens, batch_size=int(exp.batch_size)),
                      answer_log_probs(context.model.model, context.model.tokenizer, chats, answers, tokens, ablation, int(exp.batch_size))).numpy()
    plain = np.array(mean_token_cross_entropy(context.model.model, context.model.tokenizer, chats, answers))
    under = np.array(mean_token_cross_entropy(context.model.model, context.model.tokenizer, chats, answers, hooks=ablation))
    answered = ~np.isnan(plain)  # an empty answer has no tokens to predict
    plain, under = plain[answered], under[answered]
    args = (int(exp.bootstrap.resamples), float(exp.bootstrap.level), int(context.cfg.seed))
    refused = np.array([bool(r["refused"]) for r in before])
    return {
        "kl": mean_with_interval(kl, *args),
        "kl_median": round(float(np.median(kl)), 5),
        "kl_tokens": {"tokens": tokens, **mean_with_interval(along[~np.isnan(along)], *args)},
        "kl_by_unablated_decision": {"answered": mean_with_interval(kl[~refused], *args), "refused": mean_with_interval(kl[refused], *args)},
        "cross_entropy": {"before": mean_with_interval(plain, *args), "ablated": mean_with_interval(under, *args),
                          "change": mean_with_interval(under - plain, *args)},
        "text": "the model's own greedy answers to the harmless test prompts, teacher-forced",
    }


def editable_copy(loaded: LoadedModel, cache_dir: Any) -> LoadedModel:
    """A copy of the run's model whose weights an export may edit: the same weights reloaded at fp32 when the run's
    are quantized (bitsandbytes weights cannot be edited), else a deep copy; the loaded model is never touched."""
    if loaded.precision.bits is not None:
        plan = plan_model(OmegaConf.create({"name": loaded.name, "path": loaded.source.location}), OmegaConf.create(FP32), cache_dir)
        return load_weights(OmegaConf.create({"name": loaded.name}), plan)
    model = copy.deepcopy(loaded.model)
    return type(loaded)(model, loaded.tokenizer, adapter_for(model), loaded.source, loaded.precision, loaded.name)


def export(context: ExperimentContext, chosen: Chosen, records: list[PromptRecord]) -> dict[str, Any]:
    """Orthogonalise a full-precision copy of the model and save it; compare it with hook ablation on the test prompts."""
    loaded, exp = context.model, context.settings
    full = editable_copy(loaded, context.cfg.paths.cache_dir)
    if loaded.precision.bits is not None:
        how = (f"this run's model is {loaded.precision.name} (bitsandbytes); the export reloads its weights at fp32 from "
               f"{loaded.source.location} and orthogonalises those, with the direction found at {loaded.precision.name}")
    else:
        how = f"the run's own weights at {loaded.precision.name}, orthogonalised"
    chats = context.chat_texts(records)
    hooked, _ = next_token_logits(loaded, chats, int(exp.batch_size), hooks=directional_ablation(loaded.adapter, chosen.vector))
    folder = context.path("direction", "model")
    provenance = {"model": loaded.name, "source": loaded.source.description, "precision": loaded.precision.name,
                  "layer": chosen.layer, "how": how}
    report = save_orthogonalised(full.adapter, loaded.tokenizer, chosen.vector, folder, provenance)
    exported, _ = next_token_logits(full, chats, int(exp.batch_size))
    full.close()
    report["check"] = {
        "max_abs_logit_diff": float((exported - hooked).abs().max()),
        "prompts": len(chats),
        "against": f"directional ablation through hooks on this run's {loaded.precision.name} model, first response position",
    }
    report["folder"] = str(folder)
    report["load_with"] = f"python -m refusal_lab model=local model.path={folder}"
    log.info("Exported the orthogonalised model to %s (%s edit; largest logit difference from %s: %.2e)",
             folder, "exact" if report["exact"] else "approximate", report["check"]["against"], report["check"]["max_abs_logit_diff"])
    return report


def write(context: ExperimentContext, selection: dict[str, Any], vectors: dict[str, torch.Tensor], outcome: dict[str, Any],
          rows: list[dict[str, Any]], exported: dict[str, Any]) -> ExperimentResult:
    """The vectors file, the metrics, the dashboard and the completions table."""
    vectors_path = context.path("direction", "vectors.safetensors")
    save_file({k: v.float().cpu() for k, v in vectors.items()}, str(vectors_path),
              metadata={"candidates": "[layers, positions, d_model]: harmful minus harmless mean resid_pre on the candidates split"})
    metrics = direction_metrics(selection, outcome, exported)
    details = {"precision": context.model.precision.name, "splits": dict(context.settings.splits),
               "selection": selection, "outcome": outcome, "export": exported,
               "thresholds": {k: float(context.settings[k]) for k in ("max_kl", "min_induce", "max_layer_fraction")},
               "bootstrap": {"resamples": int(context.settings.bootstrap.resamples), "level": float(context.settings.bootstrap.level), "over": "prompts"}}
    _log_summary(selection, outcome)
    header = {"title": f"Refusal direction: {context.model.name} at {context.model.precision.name}", "prompts": context.prompts.name}
    main_rows = [r for r in rows if "set" not in r]  # the side sets' rows are in the table, not in the dashboard's figures
    files = {"vectors": vectors_path, "dashboard": write_direction_dashboard(details, main_rows, header, context.path("direction", "dashboard.html"))}
    if exported:
        files["model"] = context.path("direction", "model") / "refusal_direction.json"
    chosen = selection.get("chosen")
    handoffs = [] if chosen is None else [Direction(
        vectors["direction"], int(chosen["layer"]), int(chosen["position"]), context.model.name, str(context.settings.splits.selection),
        float(chosen["bypass"]), float(chosen["induce"]), float(chosen["kl"]),
    )]
    return ExperimentResult(metrics=metrics, details=details, tables={"completions": rows} if rows else {}, files=files, handoffs=handoffs)


# Every run logs these keys, NaN where nothing was chosen (or exported), so a sweep's W&B runs line up.
OUTCOME_KEYS = [f"direction/{key}/{measure}" for key in ("harmful/none", "harmful/ablation", "harmless/none", "harmless/addition")
                for measure in ("refusal_rate", "refusal_score")]
COST_KEYS = [f"direction/harmless/ablation/{k}" for k in ("kl", "kl_median", "kl_where_answered", "kl_where_refused", "kl_tokens",
                                                               "cross_entropy_change")]
CHOICE_KEYS = [f"direction/chosen/{k}" for k in ("layer", "position", "bypass", "induce", "kl", "norm")]


def direction_metrics(selection: dict[str, Any], outcome: dict[str, Any], exported: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {f"direction/candidates/{k}": float(v) for k, v in selection["filtered"].items()}
    metrics.update(dict.fromkeys([*CHOICE_KEYS, *OUTCOME_KEYS, *COST_KEYS, "direction/export/max_abs_logit_diff"], float("nan")))
    chosen = selection["chosen"]
    if chosen is None:
        return metrics
    metrics.update({f"direction/chosen/{k}": float(v) for k, v in chosen.items()})
    for key, values in outcome["refusal"].items():
        metrics[K.direction_refusal(*key.split("/"))] = values["refusal_rate"]["mean"]
        metrics[f"direction/{key}/refusal_score"] = values["refusal_score"]["mean"]
    cost = outcome["cost"]
    metrics[K.DIRECTION_ABLATION_KL] = cost["kl"]["mean"]
    metrics["direction/harmless/ablation/kl_median"] = cost["kl_median"]
    for decision, values in cost["kl_by_unablated_decision"].items():
        if values["n"]:
            metrics[f"direction/harmless/ablation/kl_where_{decision}"] = values["mean"]
    metrics["direction/harmless/ablation/kl_tokens"] = cost["kl_tokens"]["mean"]
    metrics["direction/harmless/ablation/cross_entropy_change"] = cost["cross_entropy"]["change"]["mean"]
    for condition, sets in outcome.get("side_sets", {}).items():
        for name, values in sets.items():
            metrics[K.direction_refusal(name, condition)] = values["refusal_rate"]
    if exported:
        metrics["direction/export/max_abs_logit_diff"] = exported["check"]["max_abs_logit_diff"]
    return metrics


def _log_summary(selection: dict[str, Any], outcome: dict[str, Any]) -> None:
    log.info("Candidates: %s", selection["filtered"])
    chosen = selection["chosen"]
    if chosen is None:
        return
    log.info("Chosen: layer %d, position %d (bypass %.2f, induce %.2f, KL %.3f on the selection split)",
             chosen["layer"], chosen["position"], chosen["bypass"], chosen["induce"], chosen["kl"])
    refusal = outcome["refusal"]
    for label, condition in (("harmful", "ablation"), ("harmless", "addition")):
        before, after = refusal[f"{label}/none"]["refusal_rate"], refusal[f"{label}/{condition}"]["refusal_rate"]
        log.info("%s prompts, %s: refusal rate %.0f%% -> %.0f%% [%s]", label, condition, 100 * before["mean"], 100 * after["mean"],
                 "interval n/a" if after["ci_low"] is None else f"{100 * after['ci_low']:.0f}-{100 * after['ci_high']:.0f}%")
    cost = outcome["cost"]
    split = cost["kl_by_unablated_decision"]
    log.info("Cost on harmless prompts under ablation: KL %.3f (median %.3f; %.3f on the %d it answered, %s on the %d it refused), "
             "%.3f along the first %d answer tokens, cross-entropy change %+.3f nats", cost["kl"]["mean"], cost["kl_median"], split["answered"]["mean"],
             split["answered"]["n"], f"{split['refused']['mean']:.3f}" if split["refused"]["n"] else "n/a", split["refused"]["n"],
             cost["kl_tokens"]["mean"], cost["kl_tokens"]["tokens"], cost["cross_entropy"]["change"]["mean"])
