"""Activation patching over contrastive pairs: which components carry the refusal decision.

For every pair the model separates (harmful score above harmless by at least ``min_gap``), and in
each direction, every sweep's variants are patched exactly and scored; the effect is the
normalised change of the refusal score (DESIGN.md). Means over pairs come with bootstrap
intervals, the per-pair effects go to a safetensors file beside the results, and a few variants
of the first pair are checked against the plain forward pass on every run.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.registry import ExperimentResult, register_experiment
from refusal_lab.interventions.activation_cache import ActivationCache, model_key
from refusal_lab.patching.attribution import attribution_deltas, score_gradients, spearman, top_k_overlap
from refusal_lab.patching.engine import CachedRun, Variant, patch_fast, patch_naive, run_cached
from refusal_lab.patching.stats import bootstrap_ci, nan_mean, normalised_effect
from refusal_lab.config import layer_range
from refusal_lab.patching.sweeps import SWEEPS, post_instruction_tokens, shared_span, sweep_shape, sweep_variants
from refusal_lab.viz import draw_circuit, write_dashboard

log = logging.getLogger(__name__)

DIRECTIONS = {
    # name: (target label, source label)
    "harmless_to_harmful": ("harmful", "harmless"),
    "harmful_to_harmless": ("harmless", "harmful"),
}
# Components ranked in the results (per-position sweeps are in the arrays).
_RANKED = ("head", "attn", "mlp")


METHODS = ("exact", "attribution")


@dataclass(frozen=True)
class _Settings:
    name: str
    sweeps: list[str]
    directions: list[str]
    method: str
    other: str | None
    compared: list[str]
    engine: str


def check_settings(cfg: DictConfig) -> _Settings:
    """Every experiment setting that can be wrong without the model, checked before it loads."""
    exp = cfg.experiment
    sweeps = _names(exp.sweeps, SWEEPS, "experiment.sweeps")
    directions = _names(exp.directions, DIRECTIONS, "experiment.directions")
    method = _names([exp.method], dict.fromkeys(METHODS), "experiment.method")[0]
    other = exp.get("compare_with")
    if other is not None and (other not in METHODS or other == method):
        raise ConfigError(f"experiment.compare_with={other!r}; use the other method ({', '.join(m for m in METHODS if m != method)}) or null")
    compared = (_names(exp.compare_sweeps, SWEEPS, "experiment.compare_sweeps") if exp.get("compare_sweeps") else sweeps) if other else []
    if set(compared) - set(sweeps):
        raise ConfigError(f"experiment.compare_sweeps={compared} must be among experiment.sweeps={sweeps}")
    if int(exp.resid_positions) < 1 or (exp.get("head_positions") is not None and int(exp.head_positions) < 1):
        raise ConfigError("experiment.resid_positions and experiment.head_positions must be at least 1")
    engine = str(exp.engine)
    if engine not in ("fast", "naive"):
        raise ConfigError(f"experiment.engine={engine!r}; use fast (exact, batched) or naive (one forward pass per patch)")
    if float(exp.min_gap) <= 0:
        raise ConfigError(
            f"experiment.min_gap={exp.min_gap} must be positive: effects divide by the pair's score gap, "
            "and a pair the model does not separate has no decision to patch"
        )
    if exp.get("max_pairs") is not None and int(exp.max_pairs) < 1:
        raise ConfigError(f"experiment.max_pairs={exp.max_pairs} must be at least 1 (or null for every pair)")
    return _Settings(str(exp.name), sweeps, directions, method, other, compared, engine)


@register_experiment("patching", needs_pairs=True, check=check_settings)
@register_experiment("attribution", needs_pairs=True, check=check_settings)
def run_patching(runner: Any, cfg: DictConfig) -> ExperimentResult:
    """``experiment=patching`` (exact effects, attribution beside them) and ``experiment=attribution`` (the reverse)."""
    exp = cfg.experiment
    settings = check_settings(cfg)
    name, sweeps, directions, method = settings.name, settings.sweeps, settings.directions, settings.method
    other, compared, engine = settings.other, settings.compared, settings.engine
    model, adapter = runner.model.model, runner.model.adapter
    layers = layer_range(exp.get("layers"), adapter.n_layers, "experiment.layers")
    n_post = post_instruction_tokens(runner.model.tokenizer, runner.system_prompt)
    positions = {
        "resid": int(exp.resid_positions),
        "head_pos": int(exp.head_positions) if exp.get("head_positions") is not None else n_post,
    }
    plan = {method: sweeps, **({other: compared} if other else {})}
    exact_needed = "exact" in plan

    cache = None
    if exp.get("activation_cache"):
        cache_dir = Path(cfg.paths.cache_dir)
        cache = ActivationCache(model_key(runner.model, cache_dir), cache_dir / "activations")

    pairs = balanced_order(runner.prompts.pairs())
    texts = runner.chat_texts([r for pair in pairs for r in pair])
    encoded = [runner.model.tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts]
    max_pairs = exp.get("max_pairs")
    shapes = {s: sweep_shape(s, adapter.n_layers, adapter.n_heads, positions.get(s, 0)) for s in sweeps}
    effects = {m: {d: {s: [] for s in plan[m]} for d in directions} for m in plan}
    pair_rows: list[dict[str, Any]] = []
    exactness: dict[str, Any] = {}
    seconds = dict.fromkeys(plan, 0.0)
    started = time.perf_counter()
    progress = tqdm(total=len(pairs) if max_pairs is None else min(len(pairs), int(max_pairs)), desc=f"{name} pairs", unit="pair")
    for index, (harmful, harmless) in enumerate(pairs):
        if max_pairs is not None and sum(r["kept"] for r in pair_rows) >= int(max_pairs):
            break
        runs = {
            "harmful": run_cached(model, adapter, encoded[2 * index], runner.refusal_ids, cache=cache),
            "harmless": run_cached(model, adapter, encoded[2 * index + 1], runner.refusal_ids, cache=cache),
        }
        gap = runs["harmful"].score - runs["harmless"].score
        span = shared_span(runs["harmful"].ids, runs["harmless"].ids, n_post)
        row = {
            "pair_id": harmful.pair_id, "category": harmful.category, "split": harmful.split,
            "harmful_score": round(runs["harmful"].score, 5), "harmless_score": round(runs["harmless"].score, 5),
            "gap": round(gap, 5), "span": span,
            "harmful_tokens": runs["harmful"].length, "harmless_tokens": runs["harmless"].length,
            "kept": gap >= float(exp.min_gap),
        }
        pair_rows.append(row)
        if not row["kept"]:
            continue
        gradients = {}
        if "attribution" in plan:
            clock = time.perf_counter()
            targets = {DIRECTIONS[d][0] for d in directions}
            gradients = {label: score_gradients(model, adapter, runs[label], runner.refusal_ids) for label in targets}
            seconds["attribution"] += time.perf_counter() - clock
        for direction in directions:
            target_label, source_label = DIRECTIONS[direction]
            target, source = runs[target_label], runs[source_label]
            for current, current_sweeps in plan.items():
                clock = time.perf_counter()
                for sweep in current_sweeps:
                    variants = sweep_variants(sweep, layers, adapter.n_heads, span, positions.get(sweep, 0))
                    if current == "attribution":
                        delta = attribution_deltas(target, gradients[target_label], source, variants, adapter.n_heads)
                        effect = normalised_effect(target.score + delta, target.score, source.score)
                    else:
                        if engine == "fast":
                            scores = patch_fast(adapter, target, source, variants, runner.refusal_ids, int(exp.max_batch_tokens))
                        else:
                            scores = patch_naive(model, adapter, target, source, variants, runner.refusal_ids)
                        effect = normalised_effect(scores.numpy(), target.score, source.score)
                    effects[current][direction][sweep].append(_place(sweep, variants, effect, shapes[sweep]))
                seconds[current] += time.perf_counter() - clock
            if exact_needed and engine == "fast" and not exactness and int(exp.verify_variants) > 0:
                exactness = _verify(model, adapter, target, source, layers, span, positions, runner.refusal_ids, exp, runner.model.precision.name)
                exactness.update(direction=direction, pair_id=harmful.pair_id)
        progress.update(1)
    progress.close()
    elapsed = time.perf_counter() - started
    kept_rows = [row for row in pair_rows if row["kept"]]
    if not kept_rows:
        raise ConfigError(
            f"no pair has a harmful score above its harmless one by experiment.min_gap={exp.min_gap}: "
            "this model does not separate the prompts, so there is no decision to patch (is it the refusal organism?)"
        )

    bootstrap = exp.bootstrap
    categories = np.array([row["category"] for row in kept_rows])
    summaries, per_category, arrays = _aggregate(effects, method, categories, bootstrap, int(cfg.seed))
    summary = summaries[method]
    ranked = {direction: _rank(summary[direction], sweeps) for direction in directions}
    agreement = _agreement(summaries, directions, compared, int(exp.agreement_top_k)) if other else {}
    effects_path = runner.output_dir / "results" / f"{name}_effects.safetensors"
    effects_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {**arrays, "pair_index": np.array([i for i, r in enumerate(pair_rows) if r["kept"]], dtype=np.int64)},
        str(effects_path),
        metadata={"pair_ids": ",".join(str(row["pair_id"]) for row in kept_rows), "layout": "[pairs, *sweep shape]; NaN: not patched"},
    )

    metrics: dict[str, float] = {
        f"{name}/n_pairs": float(len(kept_rows)),
        f"{name}/n_pairs_below_gap": float(len(pair_rows) - len(kept_rows)),
        f"{name}/seconds": round(elapsed, 2),
        **{f"{name}/seconds_{m}": round(t, 2) for m, t in seconds.items()},
    }
    if exactness:
        metrics[f"{name}/exactness_max_abs_diff"] = float(exactness["max_abs_diff"])
    for direction in directions:
        if ranked[direction]:
            metrics[f"{name}/{direction}/top_effect"] = float(ranked[direction][0]["effect"])
        for sweep, values in agreement.get(direction, {}).items():
            metrics[f"{name}/agreement/{direction}/{sweep}/spearman"] = values["spearman"]
            metrics[f"{name}/agreement/{direction}/{sweep}/top_k_overlap"] = values["top_k_overlap"]
    _log_summary(name, ranked, agreement, len(kept_rows), len(pair_rows), elapsed)
    details = {
        "method": method,
        "engine": engine if exact_needed else None,
        "precision": runner.model.precision.name,
        "layers": [layers[0], layers[-1] + 1],
        "positions": {
            "counted_from": "end (-1 is the last prompt token, the position the refusal score reads)",
            "post_instruction_tokens": n_post,
            "resid": list(range(-positions["resid"], 0)),
            "head_pos": list(range(-positions["head_pos"], 0)),
            "span": "per pair: the positions after the pair's common token prefix, aligned from the end "
                    f"(at least the {n_post} post-instruction tokens); see the pairs table",
        },
        "sweeps": {s: SWEEPS[s] for s in sweeps},
        "directions": {d: {"target": DIRECTIONS[d][0], "source": DIRECTIONS[d][1]} for d in directions},
        "min_gap": float(exp.min_gap),
        "bootstrap": {"resamples": int(bootstrap.resamples), "level": float(bootstrap.level), "over": "pairs"},
        "effects": summary,
        "ranked": ranked,
        "per_category": per_category,
        "comparison": {"method": other, "sweeps": compared, "effects": summaries[other]} if other else None,
        "agreement": agreement,
        "exactness": exactness,
        "activation_cache": cache.describe() if cache is not None else "memory, this run only",
    }
    folder = effects_path.parent
    header = {
        "title": f"{'Activation' if method == 'exact' else 'Attribution'} patching: {runner.model.name} at {runner.model.precision.name}",
        "model": runner.model.name,
        "prompts": f"{runner.prompts.name}, split {cfg.prompts.get('split') or 'all'}",
        "pairs": f"{len(kept_rows)} of the {len(pair_rows)} examined (harmful score above harmless by at least {exp.min_gap})",
    }
    files = {
        "effects": effects_path,
        "dashboard": write_dashboard(details, header, folder / f"{name}_dashboard.html"),
        "circuit": draw_circuit(ranked, details, adapter.n_layers, folder / "refusal_circuit.png", method=method),
    }
    return ExperimentResult(metrics=metrics, details=details, tables={"pairs": pair_rows}, files=files)


def _aggregate(effects: dict[str, Any], method: str, categories: np.ndarray, bootstrap: DictConfig,
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
                    "mean": _json(nan_mean(values)), "ci_low": _json(low), "ci_high": _json(high),
                    "n_pairs": _json(np.sum(~np.isnan(values), axis=0)),
                }
                if current == method and sweep != "head_pos":
                    per_category.setdefault(direction, {})[sweep] = {
                        c: _json(nan_mean(values[categories == c])) for c in sorted(set(categories))
                    }
    return summaries, per_category, arrays


def _agreement(summaries: dict[str, Any], directions: Sequence[str], sweeps: Sequence[str], k: int) -> dict[str, Any]:
    """Spearman correlation and top-k overlap of the mean effects, exact against attribution, per sweep."""
    out: dict[str, Any] = {}
    for direction in directions:
        out[direction] = {}
        for sweep in sweeps:
            exact = np.array(summaries["exact"][direction][sweep]["mean"], dtype=float)
            approx = np.array(summaries["attribution"][direction][sweep]["mean"], dtype=float)
            present = ~np.isnan(exact) & ~np.isnan(approx)
            labels = [_label(sweep, index, exact.shape) for index in zip(*np.nonzero(present))]
            out[direction][sweep] = {
                "spearman": spearman(exact[present], approx[present]),
                "top_k_overlap": top_k_overlap(exact[present], approx[present], k),
                "k": k,
                "n_components": int(present.sum()),
                "exact": [round(float(x), 5) for x in exact[present]],
                "attribution": [round(float(x), 5) for x in approx[present]],
                "labels": labels,
            }
    return out


def _label(sweep: str, index: tuple[int, ...], shape: tuple[int, ...]) -> str:
    """A component's name; positions as offsets from the end, as everywhere in the results."""
    if sweep in ("head", "head_pos"):
        name = f"L{index[0]}H{index[1]}"
    else:
        name = f"L{index[0]}" + ("" if sweep == "resid" else f" {sweep}")
    if sweep in ("resid", "head_pos"):
        name += f" position {index[-1] - shape[-1]}"
    return name


def balanced_order(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Categories in turn (first pair of each, then the second...), so ``max_pairs`` keeps the categories balanced."""
    by_category: dict[str, list[tuple[Any, Any]]] = {}
    for pair in pairs:
        by_category.setdefault(pair[0].category, []).append(pair)
    return [pair for group in zip_longest(*by_category.values()) for pair in group if pair is not None]


def _names(setting: Any, known: dict[str, Any], key: str) -> list[str]:
    names = [str(x) for x in (setting or [])]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"{key}={names} must name some of: {', '.join(known)}")
    return names


def _place(sweep: str, variants: Sequence[Variant], effect: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One pair's effects in the sweep's array; cells the pair has no variant for stay NaN."""
    out = np.full(shape, np.nan)
    width = shape[-1] if sweep in ("resid", "head_pos") else 0
    for variant, value in zip(variants, effect):
        if sweep == "resid":
            out[variant.layer, width + variant.offsets[0]] = value
        elif sweep == "head":
            out[variant.layer, variant.head] = value
        elif sweep == "head_pos":
            out[variant.layer, variant.head, width + variant.offsets[0]] = value
        else:
            out[variant.layer] = value
    return out


def _rank(summary: dict[str, Any], sweeps: Sequence[str]) -> list[dict[str, Any]]:
    """Heads, attention blocks and MLPs by mean effect, largest first, each with its interval."""
    rows = []
    for sweep in (s for s in _RANKED if s in sweeps):
        mean = np.array(summary[sweep]["mean"], dtype=float)
        low = np.array(summary[sweep]["ci_low"], dtype=float)
        high = np.array(summary[sweep]["ci_high"], dtype=float)
        for index in np.ndindex(mean.shape):
            if np.isnan(mean[index]):
                continue
            layer = int(index[0])
            rows.append({
                "component": _label(sweep, index, mean.shape), "kind": sweep, "layer": layer, "head": int(index[1]) if sweep == "head" else None,
                "effect": round(float(mean[index]), 5), "ci": [_json(low[index]), _json(high[index])],
            })
    return sorted(rows, key=lambda r: r["effect"], reverse=True)


def _verify(model: torch.nn.Module, adapter: Any, target: CachedRun, source: CachedRun, layers: list[int], span: int,
            positions: dict[str, int], refusal_ids: list[int], exp: DictConfig, precision: str) -> dict[str, Any]:
    """Patch a few random variants both ways, fast and naive; a disagreement stops the run."""
    candidates = [
        v for sweep in ("resid", "head", "head_pos", "attn", "mlp")
        for v in sweep_variants(sweep, layers, adapter.n_heads, span, positions.get(sweep, 0))
    ]
    chosen = random.Random(0).sample(candidates, min(int(exp.verify_variants), len(candidates)))
    fast = patch_fast(adapter, target, source, chosen, refusal_ids, int(exp.max_batch_tokens))
    naive = patch_naive(model, adapter, target, source, chosen, refusal_ids)
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
    chosen by batch shape round differently (and 8-bit picks its outlier columns per batch), so the
    bound is looser; ``{fp32: ..., other: ...}`` in the config, or one number for every precision.
    """
    if isinstance(setting, (int, float)):
        return float(setting)
    return float(setting["fp32"] if precision == "fp32" else setting["other"])


def _json(array: np.ndarray) -> Any:
    """Nested lists with NaN as None, rounded: JSON for the results file."""
    return [_json(a) for a in array] if array.ndim else (None if np.isnan(array) else round(float(array), 5))


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


