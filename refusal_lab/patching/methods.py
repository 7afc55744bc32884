"""How a pair's variants are measured, by name: each method returns the patched refusal scores.

``exact`` patches each variant (the fast engine, or one forward pass per variant with
``engine=naive``); ``attribution`` estimates the same scores to first order from one backward pass
of the target. A new method is one function registered here; experiments pick it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from refusal_lab.errors import ConfigError
from refusal_lab.interventions import Site
from refusal_lab.models.adapters import ArchitectureAdapter
from refusal_lab.patching.attribution import attribution_deltas, score_gradients
from refusal_lab.patching.engine import CachedRun, Variant, patch_fast, patch_naive


@dataclass
class PairRuns:
    """One pair's clean runs (by label), how to run the model, and what methods computed on them."""

    model: torch.nn.Module
    adapter: ArchitectureAdapter
    refusal_ids: list[int]
    runs: dict[str, CachedRun]
    engine: str = "fast"
    max_batch_tokens: int = 8192
    gradients: dict[str, dict[Site, torch.Tensor]] = field(default_factory=dict)


MethodFn = Callable[[PairRuns, str, str, Sequence[Variant]], np.ndarray]
METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    def decorate(fn: MethodFn) -> MethodFn:
        METHODS[name] = fn
        return fn

    return decorate


def get_method(name: str) -> MethodFn:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


@register_method("exact")
def exact(pair: PairRuns, target: str, source: str, variants: Sequence[Variant]) -> np.ndarray:
    """The refusal score of the target run with each variant copied in from the source run."""
    if pair.engine == "fast":
        scores = patch_fast(pair.adapter, pair.runs[target], pair.runs[source], variants, pair.refusal_ids, pair.max_batch_tokens)
    else:
        scores = patch_naive(pair.model, pair.adapter, pair.runs[target], pair.runs[source], variants, pair.refusal_ids)
    return scores.numpy()


@register_method("attribution")
def attribution(pair: PairRuns, target: str, source: str, variants: Sequence[Variant]) -> np.ndarray:
    """The first-order estimate of the same scores; the target's gradients are computed once per pair."""
    if target not in pair.gradients:
        pair.gradients[target] = score_gradients(pair.model, pair.adapter, pair.runs[target], pair.refusal_ids)
    delta = attribution_deltas(pair.runs[target], pair.gradients[target], pair.runs[source], variants, pair.adapter.n_heads)
    return pair.runs[target].score + np.asarray(delta)


def describe_methods() -> dict[str, Any]:
    return {name: (fn.__doc__ or "").strip() for name, fn in METHODS.items()}
