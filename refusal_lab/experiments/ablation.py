"""Component ablation, ``experiment=ablation``: are the components patching ranks first necessary?

The top-k components of a patching ranking (heads, attention blocks, MLPs; from a results file, from
an earlier stage of the same process, or patched here on the selection split) are ablated together
(zero, mean or resample; at every position or at the post-instruction positions only), for
k = 1, 2, 4, ... On the evaluation split, kept apart from what chose them, each k is measured on
greedy generations of the harmful prompts (refusal rate, from the judge) and their refusal score,
with the KL of the next-token distribution on harmless prompts as the side-effect cost; each number
with a bootstrap interval over prompts. The same number of random components of the same kinds is
ablated beside every k: the control. By default components are ranked and ablated at the
post-instruction positions, where the decision is read; components whose patching effect comes from
carrying the request's content are reported apart. An arm whose harmless KL exceeds
``max_damage_kl`` broke the model and is flagged, never read as necessity; the top and random arms
are compared at matched damage (``ablation/necessity.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from refusal_lab.ablation import MODES, Component, ablation_hooks, random_like, reference_activations
from refusal_lab.ablation.components import KINDS
from refusal_lab.ablation.necessity import BROKEN, Arm, matched_damage, needs_larger_control, verdict
from refusal_lab.ablation.values import POSITIONS
from refusal_lab.config import layer_range
from refusal_lab.metrics.divergence import next_token_kl
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.experiments.side_sets import load_side_sets, side_set_rates, side_set_rows
from refusal_lab import metric_keys as K
from refusal_lab.findings import POST_INSTRUCTION, SPAN, Ranking
from refusal_lab.generation import next_token_logits
from refusal_lab.uncertainty import mean_with_interval
from refusal_lab.patching.sweeps import post_instruction_tokens
from refusal_lab.tracking.results import write_results
from refusal_lab.viz.ablation import write_ablation_dashboard

log = logging.getLogger(__name__)

_AT = {"post_instruction": POST_INSTRUCTION, "all": SPAN}  # ablated where, ranked by the patching effect there


def check_ablation(cfg: DictConfig) -> None:
    exp = cfg.experiment
    if cfg.prompts.get("split") is not None:
        raise ConfigError("experiment=ablation uses two splits of the prompt set (experiment.splits); set prompts.split=null")
    if exp.splits.selection == exp.splits.evaluation:
        raise ConfigError("experiment.splits.selection and .evaluation must differ: components are measured on prompts kept apart from what chose them")
    if str(exp.mode) not in MODES or str(exp.positions) not in POSITIONS:
        raise ConfigError(f"experiment.mode={exp.mode} / experiment.positions={exp.positions}: use one of {', '.join(MODES)} / {', '.join(POSITIONS)}")
    if not exp.ks or any(int(k) < 1 for k in exp.ks):
        raise ConfigError(f"experiment.ks={list(exp.ks or [])} must list component counts of at least 1")
    if set(exp.kinds) - set(KINDS) or not exp.kinds:
        raise ConfigError(f"experiment.kinds={list(exp.kinds or [])} must name some of: {', '.join(KINDS)}")
    load_side_sets(exp, str(exp.splits.evaluation))
    if float(exp.max_damage_kl) <= 0:
        raise ConfigError(f"experiment.max_damage_kl={exp.max_damage_kl} must be above 0 (nats of harmless next-token KL)")
    source = exp.get("components_from")
    if source and not Path(str(source)).is_file():
        raise ConfigError(f"experiment.components_from={source} is not a file; give a patching results file (results/patching.json) or null")


@register_experiment("ablation", check=check_ablation)
def run_ablation(context: ExperimentContext) -> ExperimentResult:
    """Rank, then ablate the top-k components and as many random ones, and measure both on held-out prompts."""
    exp = context.settings
    band = layer_range(exp.get("layers"), context.model.adapter.n_layers, "experiment.layers")
    ranked, ranking = ranked_components(context, band)
    ks = sorted({min(int(k), len(ranked)) for k in exp.ks})
    records = {label: [r for r in context.prompts.select(split=str(exp.splits.evaluation)).records if r.label == label][: exp.get("limit_per_label") or None]
               for label in ("harmful", "harmless")}
    n_post = post_instruction_tokens(context.model.tokenizer, context.system_prompt)
    reference = None
    if exp.mode != "zero":
        harmless = [r for r in context.prompts.select(split=str(exp.splits.selection)).records if r.label == "harmless"]
        reference = reference_activations(context.model, context.chat_texts(harmless))
    measure = Measurer(context, records, n_post, reference, load_side_sets(exp, str(exp.splits.evaluation)))
    rng = random.Random(int(context.cfg.seed))
    curve = [{"k": 0, "condition": "none", "components": [], **measure([], "none")}]
    ranking["skipped_ks"] = {}
    for k in ks:
        top = ranked[:k]
        try:  # the controls first: a narrow band of layers may hold too few other components of the same kinds
            controls = [random_like(top, band, context.model.adapter.n_heads, rng, exclude=top) for _ in range(int(exp.random_draws))]
        except ConfigError as error:
            log.warning("k=%d skipped: no random control of the same kinds in layers %d-%d (%s)", k, band[0], band[-1], error)
            ranking["skipped_ks"][k] = str(error)
            continue
        curve.append({"k": k, "condition": "top", "components": [c.label for c in top], **measure(top, f"top {k}")})
        for draw, control in enumerate(controls):
            curve.append({"k": k, "condition": "random", "draw": draw, "components": [c.label for c in control],
                          **measure(control, f"random {k}, draw {draw}")})
    if len(curve) == 1:
        raise ConfigError(f"no k of experiment.ks={list(exp.ks)} has a random control of the same kinds in layers {band[0]}-{band[-1]}; use smaller ks")
    curve += grown_controls(context, curve, ranked, band, measure, rng)
    return write(context, ranking, curve, measure.rows)


def grown_controls(context: ExperimentContext, curve: list[dict[str, Any]], ranked: list[Component], band: list[int],
                   measure: Measurer, rng: random.Random) -> list[dict[str, Any]]:
    """For each unbroken top arm that hurts the model more than every random control: random controls of 2, 4, ...
    times its size (``experiment.matched_controls.max_scale`` at most), grown until one is as damaging, so the top
    components are compared with random ones at their own damage and not only at their count."""
    exp = context.settings
    bound, most = float(exp.max_damage_kl), int(exp.matched_controls.max_scale)
    grown: list[dict[str, Any]] = []
    for point in [p for p in curve if p["condition"] == "top"]:
        top, scale = ranked[: point["k"]], 2
        while scale <= most and needs_larger_control(Arm.of(point), [Arm.of(p) for p in curve + grown], bound):
            try:
                control = random_like(top, band, context.model.adapter.n_heads, rng, exclude=top, scale=scale)
            except ConfigError as error:
                log.info("Top %d: no random control %d times as large in layers %d-%d (%s)", point["k"], scale, band[0], band[-1], error)
                break
            grown.append({"k": len(control), "condition": "matched", "for_k": point["k"], "scale": scale,
                          "components": [c.label for c in control], **measure(control, f"random x{scale} for top {point['k']}")})
            log.info("Top %d (KL %.3f): %d random components (x%d) refuse %.0f%% at KL %.3f", point["k"], point["harmless_kl"]["mean"],
                     len(control), scale, 100 * grown[-1]["refusal_rate"]["mean"], grown[-1]["harmless_kl"]["mean"])
            if grown[-1]["harmless_kl"]["mean"] > bound:
                break
            scale *= 2
    return grown


class Measurer:
    """Ablates a set of components and measures the evaluation prompts under it."""

    def __init__(self, context: ExperimentContext, records: dict[str, list[Any]], n_post: int, reference: Any,
                 side: dict[str, list[Any]]) -> None:
        self.context, self.records, self.n_post, self.reference, self.side = context, records, n_post, reference, side
        exp = context.settings
        self.args = (int(exp.bootstrap.resamples), float(exp.bootstrap.level), int(context.cfg.seed))
        self.harmless_chats = context.chat_texts(records["harmless"])
        self.plain, _ = next_token_logits(context.model, self.harmless_chats, int(exp.batch_size))
        self.rows: list[dict[str, Any]] = []

    def __call__(self, components: list[Component], condition: str) -> dict[str, Any]:
        exp, model = self.context.settings, self.context.model
        hooks = ablation_hooks(components, str(exp.mode), str(exp.positions), self.n_post, model.adapter.d_head,
                               self.reference, int(self.context.cfg.seed)) if components else None
        rows = answer_rows(self.context, self.records["harmful"], exp, f"harmful, {condition}", hooks=hooks)
        self.rows += [{**row, "condition": condition} for row in rows]
        ablated, _ = next_token_logits(model, self.harmless_chats, int(exp.batch_size), hooks=hooks)
        side_rows = side_set_rows(self.context, self.side, condition, hooks=hooks)
        self.rows += side_rows
        return {
            "side_sets": side_set_rates(side_rows).get(condition, {}),
            "refusal_rate": mean_with_interval(np.array([r["refused"] for r in rows]), *self.args),
            "refusal_score": mean_with_interval(np.array([r["refusal_score"] for r in rows]), *self.args),
            "harmless_kl": mean_with_interval(next_token_kl(self.plain, ablated).numpy(), *self.args),
            "per_category": {c: round(float(np.mean([r["refused"] for r in rows if r["category"] == c])), 5)
                             for c in sorted({r["category"] for r in rows})},
        }


def ranked_components(context: ExperimentContext, band: list[int]) -> tuple[list[Component], dict[str, Any]]:
    """The ranking to ablate from (a results file, this run's patching stage, or exact patching on the selection
    split now), and its top components in the layer band, patched where they are ablated: at the post-instruction
    positions, or over the span (then without the components that carry the request's content)."""
    exp = context.settings
    direction, source, at = str(exp.direction), exp.get("components_from"), _AT[str(exp.positions)]
    if source:
        ranking = Ranking.from_results_file(Path(str(source)), direction)
        if ranking.model not in ("None", context.model.name):
            log.warning("The ranking in %s was measured on %s, not on %s", source, ranking.model, context.model.name)
    else:
        ranking = context.handoff(Ranking, direction=direction, method="exact", split=str(exp.splits.selection))
        if ranking is None or not ranking.ranked(list(exp.kinds), at):
            ranking = patch_selection_split(context)
    carriers = ranking.content_carriers(float(exp.content_carriers.min_effect), float(exp.content_carriers.ratio))
    ranked = ranking.ranked(list(exp.kinds), at, band, exclude=[r.component for r in carriers] if at == SPAN else ())
    components = [r.component for r in ranked][: max(int(k) for k in exp.ks)]
    if not components:
        sweeps = "head_post, attn_post, mlp_post" if at == POST_INSTRUCTION else "head, attn, mlp"
        raise ConfigError(f"the ranking from {ranking.where} has no {list(exp.kinds)} components patched at {at.replace('_', '-')} positions "
                          f"in direction {direction} in layers {band[0]}-{band[-1]}; patch with the sweeps {sweeps}, or set experiment.positions")
    log.info("Ablating from %s: %s", ranking.where, ", ".join(c.label for c in components))
    if carriers:
        log.info("Carrying the request's content rather than the decision (span effect >= %.2f and >= %.1fx the post-instruction "
                 "effect), reported apart: %s", float(exp.content_carriers.min_effect), float(exp.content_carriers.ratio),
                 ", ".join(r.component.label for r in carriers))
    return components, {"from": ranking.where, "direction": direction, "at": at, "layers": [band[0], band[-1] + 1],
                        "top": ranking.rows(ranked[: len(components)]), "content_carriers": ranking.rows(carriers),
                        "content_rule": {"min_effect": float(exp.content_carriers.min_effect), "ratio": float(exp.content_carriers.ratio)}}


def patch_selection_split(context: ExperimentContext) -> Ranking:
    """Exact patching with ``experiment.ranking`` (patching's settings, composed by Hydra) on the selection split;
    its results are written as ``results/ablation_ranking.json`` beside the ablation's own."""
    from refusal_lab.experiments.patching import run_patching

    exp = context.settings
    split = str(exp.splits.selection)
    derived = context.cfg.copy()
    with open_dict(derived):
        settings = OmegaConf.create(OmegaConf.to_container(exp.ranking, resolve=True))  # open: the name is added
        derived.experiment = OmegaConf.merge(settings, {"name": "ablation_ranking", "directions": [str(exp.direction)]})
        derived.prompts.split = split
    stage = dataclasses.replace(context, cfg=derived, prompts=context.prompts.select(split=split))
    log.info("No patching of the %s split in this run ranks the components; patching it now", split)
    result = run_patching(stage)
    write_results(context.output_dir, "ablation_ranking", result, {"model": context.model.describe(), "split": split})
    ranking = next(found for found in result.handoffs if isinstance(found, Ranking))
    return dataclasses.replace(ranking, where=f"exact patching of the {split} split in this run")


def write(context: ExperimentContext, ranking: dict[str, Any], curve: list[dict[str, Any]], rows: list[dict[str, Any]]) -> ExperimentResult:
    exp = context.settings
    bound = float(exp.max_damage_kl)
    for point in curve:
        point["broken"] = point["condition"] != "none" and point["harmless_kl"]["mean"] > bound
    arms = [Arm.of(p) for p in curve]
    matched = matched_damage(arms, bound)
    finding = verdict(matched, float(exp.necessity.min_gap), int(exp.necessity.max_k))
    summary = summarize_curve(curve, bound)
    metrics: dict[str, float] = {}
    for point in summary:
        for condition in ("top", "random"):
            if point.get(condition):
                for key in ("refusal_rate", "refusal_score", "harmless_kl", "broken"):
                    metrics[K.ablation_arm(point["k"], condition, key)] = float(point[condition][key])
    for m in matched:
        if m["gap"] is not None:
            metrics[K.ablation_gap(m["k"])] = m["gap"]
    none = next(p for p in curve if p["condition"] == "none")
    metrics[K.ABLATION_NONE] = none["refusal_rate"]["mean"]
    for point in curve:
        where = {"none": "k0", "top": f"k{point['k']}/top", "random": f"k{point['k']}/random/draw{point.get('draw')}",
                 "matched": f"k{point.get('for_k')}/matched_x{point.get('scale')}"}[point["condition"]]
        for name, values in point["side_sets"].items():
            metrics[f"ablation/{where}/{name}_refusal"] = values["refusal_rate"]
    metrics[K.ABLATION_NECESSARY] = float(finding["necessary"])
    if finding["best_gap"] is not None:
        metrics[K.ABLATION_BEST_GAP] = finding["best_gap"]
    details = {
        "precision": context.model.precision.name, "mode": str(exp.mode), "positions": str(exp.positions),
        "splits": dict(exp.splits), "ranking": ranking, "curve": curve, "summary": summary,
        "damage": {"max_kl": bound, "rule": f"an arm with harmless next-token KL above {bound:g} nats: {BROKEN}"},
        "matched_damage": matched, "necessity": finding,
        "bootstrap": {"resamples": int(exp.bootstrap.resamples), "level": float(exp.bootstrap.level), "over": "prompts"},
    }
    _log_summary(summary, none, matched, finding, bound)
    header = {"title": f"Component ablation: {context.model.name} at {context.model.precision.name}", "prompts": context.prompts.name}
    return ExperimentResult(metrics=metrics, details=details, tables={"completions": rows},
                            files={"dashboard": write_ablation_dashboard(details, header, context.path("ablation", "dashboard.html"))})


def summarize_curve(curve: list[dict[str, Any]], max_damage_kl: float) -> list[dict[str, Any]]:
    """Per k: the top components' means, and the random control's means over its draws; each flagged broken when its
    harmless KL exceeds the bound."""
    out = []
    for k in sorted({p["k"] for p in curve if p["condition"] == "top"}):  # grown controls are compared at matched damage only
        top = next(p for p in curve if p["k"] == k and p["condition"] == "top")
        draws = [p for p in curve if p["k"] == k and p["condition"] == "random"]
        mean = (lambda key: round(float(np.mean([d[key]["mean"] for d in draws])), 5)) if draws else None
        top_means = {key: top[key]["mean"] for key in ("refusal_rate", "refusal_score", "harmless_kl")}
        random_means = {key: mean(key) for key in ("refusal_rate", "refusal_score", "harmless_kl")} if mean else None
        out.append({
            "k": k,
            "top": {**top_means, "broken": top_means["harmless_kl"] > max_damage_kl},
            "random": None if random_means is None else {**random_means, "broken": random_means["harmless_kl"] > max_damage_kl},
        })
    return out


def _log_summary(summary: list[dict[str, Any]], none: dict[str, Any], matched: list[dict[str, Any]], finding: dict[str, Any],
                 bound: float) -> None:
    log.info("Harmful refusal rate with nothing ablated: %.0f%%", 100 * none["refusal_rate"]["mean"])
    gaps = {m["k"]: m for m in matched}
    for point in summary:
        flag = lambda arm: f" [{BROKEN}]" if arm["broken"] else ""  # noqa: E731
        random_part = "" if point["random"] is None else (
            f"; random: {100 * point['random']['refusal_rate']:.0f}%, KL {point['random']['harmless_kl']:.3f}{flag(point['random'])}")
        gap = gaps.get(point["k"], {}).get("gap")
        matched_part = "" if gap is None else f"; at matched damage random refuses {100 * gaps[point['k']]['random_refusal']:.0f}% (gap {100 * gap:+.0f} points)"
        log.info("k=%d top: refusal %.0f%%, score %.2f, harmless KL %.3f%s%s%s", point["k"], 100 * point["top"]["refusal_rate"],
                 point["top"]["refusal_score"], point["top"]["harmless_kl"], flag(point["top"]), random_part, matched_part)
    if any(p["top"]["broken"] or (p["random"] or {}).get("broken") for p in summary):
        log.warning("Arms with harmless KL above %g nats broke the model: their refusal rates are not evidence of necessity", bound)
    if finding["necessary"]:
        log.info("Necessity: the top %d components lower refusal %.0f points more than random ones at comparable damage",
                 finding["best_k"], 100 * finding["best_gap"])
    else:
        best = "no top arm had a comparable random arm" if finding["best_gap"] is None else \
            f"the best gap is {100 * finding['best_gap']:+.0f} points at k={finding['best_k']}"
        log.warning("No evidence of necessity: no unbroken top arm of at most %d components lowers refusal %.0f points more than "
                    "random components at comparable damage (%s)", finding["max_k"], 100 * finding["min_gap"], best)
