"""Activation patching over contrastive pairs: which components carry the refusal decision.

For every pair the model separates (harmful score above harmless by at least ``min_gap``), and in
each direction, every sweep's variants are measured by the chosen method and scored; the effect
is the normalised change of the refusal score (DESIGN.md). Means over pairs come with bootstrap
intervals, the per-pair effects go to a safetensors file beside the results, and a few variants
of the first pair are checked against the plain forward pass on every run.

What a sweep is lives in ``patching/sweeps.py`` (``SWEEPS``) and how a variant is measured in
``patching/methods.py`` (``METHODS``); this module only gathers, measures, aggregates and writes.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from refusal_lab.config import layer_range
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.findings import Ranking
from refusal_lab.uncertainty import to_json
from refusal_lab.interventions import SITE_KINDS
from refusal_lab.interventions.activation_cache import ActivationCache, model_key
from refusal_lab.uncertainty import spearman, top_k_overlap
from refusal_lab.patching.engine import Variant, patch_fast, patch_naive, run_cached
from refusal_lab.patching.methods import METHODS, PairRuns, get_method
from refusal_lab.patching.stats import normalised_effect
from refusal_lab.uncertainty import bootstrap_ci, nan_mean
from refusal_lab.patching.sweeps import SWEEPS, Sweep, post_instruction_tokens, shared_span
from refusal_lab.viz import draw_circuit, write_dashboard

log = logging.getLogger(__name__)

DIRECTIONS = {
    # name: (target label, source label)
    "harmless_to_harmful": ("harmful", "harmless"),
    "harmful_to_harmless": ("harmless", "harmful"),
}


@dataclass(frozen=True)
class Settings:
    """The experiment's settings, checked before the model loads; ``plan`` maps each method to its sweeps."""

    name: str
    sweeps: list[str]
    directions: list[str]
    method: str
    other: str | None
    compared: list[str]
    engine: str

    @property
    def plan(self) -> dict[str, list[str]]:
        return {self.method: self.sweeps, **({self.other: self.compared} if self.other else {})}


@dataclass
class Measured:
    """What the loop over pairs gathers: effects[method][direction][sweep] is a list of per-pair arrays."""

    effects: dict[str, dict[str, dict[str, list[np.ndarray]]]]
    pairs: list[dict[str, Any]] = field(default_factory=list)
    exactness: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    elapsed: float = 0.0
    cache: Any = "memory, this run only"  # where clean runs were kept, and how often they were reused

    @property
    def kept(self) -> list[dict[str, Any]]:
        return [row for row in self.pairs if row["kept"]]


def check_settings(cfg: DictConfig) -> Settings:
    """Every experiment setting that can be wrong without the model, checked before it loads."""
    exp = cfg.experiment
    method = names([exp.method], METHODS, "experiment.method")[0]
    other = exp.get("compare_with")
    if other is not None and (other not in METHODS or other == method):
        raise ConfigError(f"experiment.compare_with={other!r}; use another method ({', '.join(m for m in METHODS if m != method)}) or null")
    sweeps = names(exp.sweeps, SWEEPS, "experiment.sweeps")
    compared = (names(exp.compare_sweeps, SWEEPS, "experiment.compare_sweeps") if exp.get("compare_sweeps") else sweeps) if other else []
    if set(compared) - set(sweeps):
        raise ConfigError(f"experiment.compare_sweeps={compared} must be among experiment.sweeps={sweeps}")
    if int(exp.resid_positions) < 1 or (exp.get("head_positions") is not None and int(exp.head_positions) < 1):
        raise ConfigError("experiment.resid_positions and experiment.head_positions must be at least 1")
    if str(exp.engine) not in ("fast", "naive"):
        raise ConfigError(f"experiment.engine={exp.engine!r}; use fast (exact, batched) or naive (one forward pass per patch)")
    if float(exp.min_gap) <= 0:
        raise ConfigError(
            f"experiment.min_gap={exp.min_gap} must be positive: effects divide by the pair's score gap, "
            "and a pair the model does not separate has no decision to patch"
        )
    if exp.get("max_pairs") is not None and int(exp.max_pairs) < 1:
        raise ConfigError(f"experiment.max_pairs={exp.max_pairs} must be at least 1 (or null for every pair)")
    return Settings(str(exp.name), sweeps, names(exp.directions, DIRECTIONS, "experiment.directions"), method, other, compared, str(exp.engine))


@register_experiment("patching", needs_pairs=True, check=check_settings)
@register_experiment("attribution", needs_pairs=True, check=check_settings)
def run_patching(context: ExperimentContext) -> ExperimentResult:
    """``experiment=patching`` (exact effects, attribution beside them) and ``experiment=attribution`` (the reverse)."""
    settings = check_settings(context.cfg)
    scope = Scope.of(context)
    measured = measure_pairs(context, settings, scope)
    if not measured.kept:
        raise ConfigError(
            f"no pair has a harmful score above its harmless one by experiment.min_gap={context.settings.min_gap}: "
            "this model does not separate the prompts, so there is no decision to patch (is it the refusal organism?)"
        )
    return report(context, settings, scope, measured)


@dataclass(frozen=True)
class Scope:
    """Where patching looks: the layers, how many positions each per-position sweep covers, the template's tail."""

    layers: list[int]
    positions: dict[str, int]
    post_instruction: int

    @classmethod
    def of(cls, context: ExperimentContext) -> Scope:
        exp, adapter = context.settings, context.model.adapter
        n_post = post_instruction_tokens(context.model.tokenizer, context.system_prompt)
        positions = {
            "resid_positions": int(exp.resid_positions),
            "head_positions": int(exp.head_positions) if exp.get("head_positions") is not None else n_post,
        }
        return cls(layer_range(exp.get("layers"), adapter.n_layers, "experiment.layers"), positions, n_post)

    def width(self, sweep: Sweep) -> int:
        """Positions per variant: a per-position sweep's setting, the post-instruction tokens, or 0 (the whole span)."""
        if sweep.positions:
            return self.positions[sweep.positions]
        return self.post_instruction if sweep.post_instruction else 0

    def shape(self, sweep: Sweep, n_layers: int, n_heads: int) -> tuple[int, ...]:
        return sweep.shape(n_layers, n_heads, self.width(sweep))


def measure_pairs(context: ExperimentContext, settings: Settings, scope: Scope) -> Measured:
    """Clean runs of each pair, then every method's sweeps in every direction, until ``max_pairs`` are kept."""
    exp, model, adapter = context.settings, context.model.model, context.model.adapter
    cache = context.clean_runs  # an earlier stage's clean runs, in a pipeline
    if exp.get("activation_cache"):
        cache_dir = Path(context.cfg.paths.cache_dir)
        cache = ActivationCache(model_key(context.model, cache_dir), cache_dir / "activations")
    counts = (cache.hits, cache.misses) if cache is not None else (0, 0)
    pairs = balanced_order(context.prompts.pairs())
    texts = context.chat_texts([r for pair in pairs for r in pair])
    encoded = [context.model.tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]
    plan = settings.plan
    measured = Measured({m: {d: {s: [] for s in plan[m]} for d in settings.directions} for m in plan}, seconds=dict.fromkeys(plan, 0.0))
    limit = len(pairs) if exp.get("max_pairs") is None else min(len(pairs), int(exp.max_pairs))
    started = time.perf_counter()
    with tqdm(total=limit, desc=f"{settings.name} pairs", unit="pair") as progress:
        for index, (harmful, harmless) in enumerate(pairs):
            if len(measured.kept) >= limit:
                break
            runs = {label: run_cached(model, adapter, encoded[2 * index + i], context.refusal_ids, cache=cache) for i, label in enumerate(("harmful", "harmless"))}
            row = pair_row(harmful, runs, scope.post_instruction, float(exp.min_gap))
            measured.pairs.append(row)
            if row["kept"]:
                pair = PairRuns(model, adapter, context.refusal_ids, runs, settings.engine, int(exp.max_batch_tokens))
                measure_pair(pair, row["span"], settings, scope, measured)
                if "exact" in plan and settings.engine == "fast" and not measured.exactness and int(exp.verify_variants) > 0:
                    target, source = DIRECTIONS[settings.directions[0]]
                    measured.exactness = verify(pair, target, source, scope, row["span"], exp, context.model.precision.name)
                    measured.exactness.update(direction=settings.directions[0], pair_id=row["pair_id"])
                progress.update(1)
    measured.elapsed = time.perf_counter() - started
    if cache is not None:  # this stage's reuse, not the shared cache's running totals
        measured.cache = {**cache.describe(), "hits": cache.hits - counts[0], "misses": cache.misses - counts[1]}
    return measured


def pair_row(harmful: Any, runs: dict[str, Any], post_instruction: int, min_gap: float) -> dict[str, Any]:
    """What the pairs table says about one pair: its scores, gap, span, lengths and whether it is patched."""
    gap = runs["harmful"].score - runs["harmless"].score
    return {
        "pair_id": harmful.pair_id, "category": harmful.category, "split": harmful.split,
        "harmful_score": round(runs["harmful"].score, 5), "harmless_score": round(runs["harmless"].score, 5),
        "gap": round(gap, 5), "span": shared_span(runs["harmful"].ids, runs["harmless"].ids, post_instruction),
        "harmful_tokens": runs["harmful"].length, "harmless_tokens": runs["harmless"].length,
        "kept": gap >= min_gap,
    }


def measure_pair(pair: PairRuns, span: int, settings: Settings, scope: Scope, measured: Measured) -> None:
    """Every method's sweeps on one pair, in every direction, as normalised effects."""
    adapter = pair.adapter
    for direction in settings.directions:
        target, source = DIRECTIONS[direction]
        for method, sweeps in settings.plan.items():
            clock = time.perf_counter()
            for name in sweeps:
                sweep = SWEEPS[name]
                variants = sweep.variants(scope.layers, adapter.n_heads, span, scope.width(sweep))
                scores = get_method(method)(pair, target, source, variants)
                effect = normalised_effect(scores, pair.runs[target].score, pair.runs[source].score)
                measured.effects[method][direction][name].append(sweep.place(variants, effect, scope.shape(sweep, adapter.n_layers, adapter.n_heads)))
            measured.seconds[method] += time.perf_counter() - clock


def report(context: ExperimentContext, settings: Settings, scope: Scope, measured: Measured) -> ExperimentResult:
    """Aggregate over pairs, rank, compare the methods, and write the effects file, dashboard and circuit."""
    exp, name = context.settings, settings.name
    kept = measured.kept
    categories = np.array([row["category"] for row in kept])
    summaries, per_category, arrays = aggregate(measured.effects, settings.method, categories, exp.bootstrap, int(context.cfg.seed))
    ranked = {d: rank(summaries[settings.method][d], settings.sweeps) for d in settings.directions}
    agreement = compare_methods(summaries, settings, int(exp.agreement_top_k)) if settings.other else {}
    effects_path = context.path(name, "effects.safetensors")
    save_file(
        {**arrays, "pair_index": np.array([i for i, r in enumerate(measured.pairs) if r["kept"]], dtype=np.int64)},
        str(effects_path),
        metadata={"pair_ids": ",".join(str(row["pair_id"]) for row in kept), "layout": "[pairs, *sweep shape]; NaN: not patched"},
    )
    metrics = summary_metrics(name, measured, ranked, agreement)
    _log_summary(name, ranked, agreement, len(kept), len(measured.pairs), measured.elapsed)
    details = describe(context, settings, scope, measured, summaries, per_category, ranked, agreement)
    header = {
        "title": f"{'Activation' if settings.method == 'exact' else 'Attribution'} patching: {context.model.name} at {context.model.precision.name}",
        "model": context.model.name,
        "prompts": f"{context.prompts.name}, split {context.cfg.prompts.get('split') or 'all'}",
        "pairs": f"{len(kept)} of the {len(measured.pairs)} examined (harmful score above harmless by at least {exp.min_gap})",
    }
    files = {
        "effects": effects_path,
        "dashboard": write_dashboard(details, header, context.path(name, "dashboard.html")),
        "circuit": draw_circuit(ranked, details, context.model.adapter.n_layers, context.path(name, "circuit.png"), method=settings.method),
    }
    split = context.cfg.prompts.get("split")
    rankings = [Ranking.from_rows(rows, direction, settings.method, split, context.model.name, f"the {name} stage of this run ({split or 'every'} split)")
                for direction, rows in ranked.items()]
    return ExperimentResult(metrics=metrics, details=details, tables={"pairs": measured.pairs}, files=files, handoffs=rankings)


def summary_metrics(name: str, measured: Measured, ranked: dict[str, list[dict[str, Any]]], agreement: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {
        f"{name}/n_pairs": float(len(measured.kept)),
        f"{name}/n_pairs_below_gap": float(len(measured.pairs) - len(measured.kept)),
        f"{name}/seconds": round(measured.elapsed, 2),
        **{f"{name}/seconds_{m}": round(t, 2) for m, t in measured.seconds.items()},
    }
    if measured.exactness:
        metrics[f"{name}/exactness_max_abs_diff"] = float(measured.exactness["max_abs_diff"])
    for direction, rows in ranked.items():
        if rows:
            metrics[f"{name}/{direction}/top_effect"] = float(rows[0]["effect"])
        for sweep, values in agreement.get(direction, {}).items():
            metrics[f"{name}/agreement/{direction}/{sweep}/spearman"] = values["spearman"]
            metrics[f"{name}/agreement/{direction}/{sweep}/top_k_overlap"] = values["top_k_overlap"]
    return metrics


def describe(context: ExperimentContext, settings: Settings, scope: Scope, measured: Measured, summaries: dict[str, Any],
             per_category: dict[str, Any], ranked: dict[str, Any], agreement: dict[str, Any]) -> dict[str, Any]:
    """The results file's details: every number the dashboard and the circuit show, and how they were made."""
    exp, exact_needed = context.settings, "exact" in settings.plan
    positions = {key: list(range(-width, 0)) for key, width in scope.positions.items()}
    return {
        "method": settings.method,
        "split": context.cfg.prompts.get("split"),
        "engine": settings.engine if exact_needed else None,
        "precision": context.model.precision.name,
        "layers": [scope.layers[0], scope.layers[-1] + 1],
        "positions": {
            "counted_from": "end (-1 is the last prompt token, the position the refusal score reads)",
            "post_instruction_tokens": scope.post_instruction,
            **{SWEEPS[s].name: positions[SWEEPS[s].positions] for s in settings.sweeps if SWEEPS[s].positions},
            "span": "per pair: the positions after the pair's common token prefix, aligned from the end "
                    f"(at least the {scope.post_instruction} post-instruction tokens); see the pairs table",
        },
        "sweeps": {s: SWEEPS[s].description for s in settings.sweeps},
        "directions": {d: {"target": DIRECTIONS[d][0], "source": DIRECTIONS[d][1]} for d in settings.directions},
        "min_gap": float(exp.min_gap),
        "bootstrap": {"resamples": int(exp.bootstrap.resamples), "level": float(exp.bootstrap.level), "over": "pairs"},
        "effects": summaries[settings.method],
        "ranked": ranked,
        "per_category": per_category,
        "comparison": {"method": settings.other, "sweeps": settings.compared, "effects": summaries[settings.other]} if settings.other else None,
        "agreement": agreement,
        "exactness": measured.exactness,
        "activation_cache": measured.cache,
    }


def aggregate(effects: dict[str, Any], method: str, categories: np.ndarray, bootstrap: DictConfig,
              seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Per method, direction and sweep: mean, interval and pair count (JSON-ready), per-category means
    of the main method, and the per-pair arrays for the effects file."""
    summaries: dict[str, Any] = {}
    per_category: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for current, by_direction in effects.items():
        for direction, by_sweep in by_direction.items():
            for sweep, pairs in by_sweep.items():
                values = np.stack(pairs)
                arrays[f"{current}/{direction}/{sweep}"] = values.astype(np.float32)
                low, high = bootstrap_ci(values, int(bootstrap.resamples), float(bootstrap.level), seed, min_pairs=3)
                summaries.setdefault(current, {}).setdefault(direction, {})[sweep] = {
                    "mean": to_json(nan_mean(values)), "ci_low": to_json(low), "ci_high": to_json(high),
                    "n_pairs": to_json(np.sum(~np.isnan(values), axis=0)),
                }
                if current == method and SWEEPS[sweep].figure != "head_by_position":
                    per_category.setdefault(direction, {})[sweep] = {
                        c: to_json(nan_mean(values[categories == c])) for c in sorted(set(categories))
                    }
    return summaries, per_category, arrays


def compare_methods(summaries: dict[str, Any], settings: Settings, k: int) -> dict[str, Any]:
    """Spearman correlation and top-k overlap of the mean effects, the main method against the other, per sweep."""
    out: dict[str, Any] = {}
    for direction in settings.directions:
        out[direction] = {}
        for sweep in settings.compared:
            main = np.array(summaries[settings.method][direction][sweep]["mean"], dtype=float)
            other = np.array(summaries[settings.other][direction][sweep]["mean"], dtype=float)
            exact, approx = (main, other) if settings.method == "exact" else (other, main)
            present = ~np.isnan(exact) & ~np.isnan(approx)
            out[direction][sweep] = {
                "spearman": spearman(exact[present], approx[present]),
                "top_k_overlap": top_k_overlap(exact[present], approx[present], k),
                "k": k,
                "n_components": int(present.sum()),
                "exact": [round(float(x), 5) for x in exact[present]],
                "attribution": [round(float(x), 5) for x in approx[present]],
                "labels": [SWEEPS[sweep].label(index, exact.shape) for index in zip(*np.nonzero(present))],
            }
    return out


def rank(summary: dict[str, Any], sweeps: Sequence[str]) -> list[dict[str, Any]]:
    """The ranked sweeps' components (heads, attention blocks, MLPs) by mean effect, largest first, each with its interval."""
    rows = []
    for sweep in (SWEEPS[s] for s in sweeps if SWEEPS[s].ranked):
        mean, low, high = (np.array(summary[sweep.name][key], dtype=float) for key in ("mean", "ci_low", "ci_high"))
        for index in np.ndindex(mean.shape):
            if np.isnan(mean[index]):
                continue
            rows.append({
                "component": sweep.label(index, mean.shape), "kind": sweep.component, "at": sweep.at, "sweep": sweep.name, "layer": int(index[0]),
                "head": int(index[1]) if sweep.per_head else None,
                "effect": round(float(mean[index]), 5), "ci": [to_json(low[index]), to_json(high[index])],
            })
    return sorted(rows, key=lambda r: r["effect"], reverse=True)


def verify(pair: PairRuns, target: str, source: str, scope: Scope, span: int, exp: DictConfig, precision: str) -> dict[str, Any]:
    """Patch a few random variants of every sweep, fast and naive; a disagreement stops the run.

    Beside them, one patch of each site kind over every position of the shorter prompt: where the
    pair aligns and shares a prefix, the engine starts it after the prefix, and this checks that too.
    """
    candidates = [v for sweep in SWEEPS.values() for v in sweep.variants(scope.layers, pair.adapter.n_heads, span, scope.width(sweep))]
    draw = random.Random(0)
    chosen = draw.sample(candidates, min(int(exp.verify_variants), len(candidates)))
    runs = pair.runs
    every = tuple(range(-min(runs[target].length, runs[source].length), 0))
    chosen += [Variant(kind, draw.choice(list(scope.layers)), every, 0 if kind == "head_z" else None) for kind in SITE_KINDS]
    fast = patch_fast(pair.adapter, runs[target], runs[source], chosen, pair.refusal_ids, int(exp.max_batch_tokens))
    naive = patch_naive(pair.model, pair.adapter, runs[target], runs[source], chosen, pair.refusal_ids)
    diff = float((fast - naive).abs().max())
    tolerance = verify_tolerance(exp.verify_tolerance, precision)
    if diff > tolerance:
        raise RuntimeError(
            f"fast patching differs from the plain forward pass by {diff:.2e} (tolerance {tolerance:g} at {precision}) "
            f"on {len(chosen)} variants; run with experiment.engine=naive and report this model"
        )
    return {"variants_checked": len(chosen), "max_abs_diff": diff, "tolerance": tolerance, "precision": precision}


def verify_tolerance(setting: Any, precision: str) -> float:
    """Refusal-score difference allowed between the fast engine and the plain forward pass.

    In fp32 the two differ by rounding alone. In half precision and with bitsandbytes, kernels
    chosen by batch shape round differently, so the bound is looser; 8-bit (LLM.int8) computes the
    columns where any row of the batch has an outlier in fp16 for every row, so a row's result depends
    on its batchmates, and looser still. ``{<precision>: ..., other: ...}`` in the config, or one number.
    """
    if isinstance(setting, (int, float)):
        return float(setting)
    return float(setting.get(precision, setting["other"]))


def balanced_order(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Categories in turn (first pair of each, then the second...), so ``max_pairs`` keeps the categories balanced."""
    by_category: dict[str, list[tuple[Any, Any]]] = {}
    for pair in pairs:
        by_category.setdefault(pair[0].category, []).append(pair)
    return [pair for group in zip_longest(*by_category.values()) for pair in group if pair is not None]


def names(setting: Any, known: Any, key: str) -> list[str]:
    """``setting`` as a non-empty list of names, each one of ``known``; else a one-line error that lists them."""
    chosen = [str(x) for x in (setting or [])]
    unknown = [n for n in chosen if n not in known]
    if unknown or not chosen:
        raise ConfigError(f"{key}={chosen} must name some of: {', '.join(known)}")
    return chosen


def _log_summary(name: str, ranked: dict[str, list[dict[str, Any]]], agreement: dict[str, Any], kept: int, total: int, elapsed: float) -> None:
    log.info("%s: %d of %d pairs in %.1f s (the others' harmful score is not above their harmless one by min_gap)", name, kept, total, elapsed)
    for direction, rows in ranked.items():
        top = ", ".join(f"{r['component']} {r['effect']:+.2f}" for r in rows[:5])
        log.info("%s, top components: %s", direction, top)
        for sweep, values in agreement.get(direction, {}).items():
            log.info(
                "  attribution against exact, %s: Spearman %.2f, top-%d overlap %.0f%% (%d components)",
                sweep, values["spearman"], values["k"], 100 * values["top_k_overlap"], values["n_components"],
            )
