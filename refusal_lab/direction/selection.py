"""Choosing the refusal direction among the candidates on held-out prompts, as Arditi et al. (2024) do.

Per candidate (layer, position):
    bypass  the mean refusal score of harmful prompts with the direction ablated everywhere (lower is better)
    induce  the mean refusal score of harmless prompts with the direction added at its layer
    kl      the mean KL(model || ablated model) of the next-token distribution on harmless prompts
A candidate is discarded when its KL is above ``max_kl``, its induce score below ``min_induce``, or
its layer at or beyond ``max_layer_fraction`` of the depth; the lowest bypass score among the rest wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from refusal_lab.uncertainty import to_json
from refusal_lab.generation import next_token_logits
from refusal_lab.interventions.operations import activation_addition, directional_ablation
from refusal_lab.metrics.divergence import next_token_kl
from refusal_lab.metrics.refusal_score import refusal_score
from refusal_lab.models import LoadedModel


@dataclass
class CandidateScores:
    """[layers, positions] arrays; NaN where a candidate was not scored."""

    bypass: np.ndarray
    induce: np.ndarray
    kl: np.ndarray

    def as_json(self) -> dict[str, Any]:
        return {name: to_json(getattr(self, name)) for name in ("bypass", "induce", "kl")}


def score_candidates(loaded: LoadedModel, candidates: torch.Tensor, harmful: Sequence[str], harmless: Sequence[str],
                     refusal_ids: Sequence[int], batch_size: int, layers: Sequence[int]) -> CandidateScores:
    """Score the candidates at ``layers`` (every position) on the chat texts given (the val split).

    A candidate that is (numerically) the zero vector is left unscored (NaN)."""
    n_layers, n_positions = candidates.shape[:2]
    scores = CandidateScores(*(np.full((n_layers, n_positions), np.nan) for _ in range(3)))
    reference, _ = next_token_logits(loaded, harmless, batch_size)
    both = [*harmful, *harmless]
    norms = candidates.norm(dim=-1)
    # Where every prompt has the same token and nothing has mixed in yet (layer 0 at the template's
    # positions), the means agree and the difference is zero, or rounding noise: no direction to score.
    cells = [(layer, position) for layer in layers for position in range(n_positions) if norms[layer, position] > 1e-4 * norms.max()]
    for layer, position in tqdm(cells, desc="scoring candidate directions", unit="candidate"):
        direction = candidates[layer, position]
        ablated, _ = next_token_logits(loaded, both, batch_size, hooks=directional_ablation(loaded.adapter, direction))
        added, _ = next_token_logits(loaded, harmless, batch_size, hooks=activation_addition(direction, layer))
        scores.bypass[layer, position] = float(refusal_score(ablated[: len(harmful)], refusal_ids).mean())
        scores.kl[layer, position] = float(next_token_kl(reference, ablated[len(harmful):]).mean())
        scores.induce[layer, position] = float(refusal_score(added, refusal_ids).mean())
    return scores


def choose(scores: CandidateScores, n_layers: int, max_kl: float, min_induce: float,
           max_layer_fraction: float) -> tuple[tuple[int, int] | None, dict[str, int]]:
    """The kept candidate with the lowest bypass score (None if every one is discarded), and how many each filter discarded."""
    layers = np.arange(scores.bypass.shape[0])[:, None] * np.ones_like(scores.bypass)
    scored = ~np.isnan(scores.bypass)
    too_deep = scored & (layers >= max_layer_fraction * n_layers)
    too_costly = scored & (scores.kl > max_kl)
    too_weak = scored & (scores.induce < min_induce)
    kept = scored & ~too_deep & ~too_costly & ~too_weak
    counts = {
        "candidates": int(scores.bypass.size), "scored": int(scored.sum()), "kept": int(kept.sum()), "too_deep": int(too_deep.sum()),
        "kl_too_high": int(too_costly.sum()), "induce_too_low": int(too_weak.sum()),
    }
    if not kept.any():
        return None, counts
    masked = np.where(kept, scores.bypass, np.inf)
    layer, position = np.unravel_index(int(np.argmin(masked)), masked.shape)
    return (int(layer), int(position)), counts
