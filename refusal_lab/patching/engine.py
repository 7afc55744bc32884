"""Exact activation patching, fast: many patched variants of a pair in one pass, each started at its patched layer.

A variant copies the source run's activation at one site (a layer's residual stream, attention
block, MLP, or one head) and some positions into the target run, and reads the refusal score at
the target's last position. Attention is causal, so nothing before the first patched position
changes, and nothing before the patched layer does: the engine computes only the layers from the
patched one on and only the positions from the first one the patch changes. Where the two prompts
have the same length and share a token prefix, their activations there are the same (causality), so
copying them changes nothing: a patch starts at the first position it copies from outside that
prefix, and a patch that copies only inside it leaves the target's score as it is. It takes the target run's
cached residual stream as the input of the patched layer and its cached keys and values for the
earlier positions. Variants that start at the same position share each layer's forward pass
(``batches`` also merges nearby starts where thin passes would cost more than the recomputed
positions); those that start deeper join the batch at their layer. ``patch_naive`` is the reference: one
full forward pass of the Hugging Face model per variant, through the same hooks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from refusal_lab.errors import ConfigError
from refusal_lab.interventions import SITE_KINDS, Site, capture, intervene
from refusal_lab.interventions.activation_cache import ActivationCache
from refusal_lab.metrics.refusal_score import refusal_score
from refusal_lab.models.adapters import ArchitectureAdapter


@dataclass(frozen=True)
class Variant:
    """One patch: copy ``kind`` at ``layer`` (and ``head``) at ``offsets`` from the source run into the target run.

    Offsets count positions from the end (-1 is the last token), so prompts of different lengths align.
    """

    kind: str
    layer: int
    offsets: tuple[int, ...]
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ConfigError(f"unknown site kind {self.kind!r}; known: {', '.join(SITE_KINDS)}")
        if not self.offsets or any(o >= 0 for o in self.offsets):
            raise ConfigError(f"offsets count from the end and must be negative (-1 is the last token), not {self.offsets}")
        if (self.kind == "head_z") != (self.head is not None):
            raise ConfigError("a head is given exactly for head_z variants")


@dataclass
class CachedRun:
    """One prompt's clean forward pass: what patching reads from a source run and starts a target run from.

    The engine relies on it being the clean pass of ``ids``: two runs whose ids share a prefix share
    its activations, so a patch there changes nothing and is not computed.
    """

    ids: torch.Tensor  # [1, T]
    score: float
    acts: dict[Site, torch.Tensor]  # [T, width] per site
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer, [1, n_kv_heads, T, d_head]
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def run_cached(model: torch.nn.Module, adapter: ArchitectureAdapter, ids: torch.Tensor, refusal_ids: Sequence[int],
               kinds: Sequence[str] = SITE_KINDS, cache: ActivationCache | None = None) -> CachedRun:
    """Forward ``ids`` ([1, T]) once, keeping every layer's activations of ``kinds`` and its keys and values.

    With a ``cache``, a run it holds is read instead of computed, and a computed one is added to it.
    """
    key = cache.key(ids, list(kinds)) if cache is not None else ""
    tensors = cache.get(key) if cache is not None else None
    if tensors is None:
        store: dict[Site, torch.Tensor] = {}
        sites = [Site(kind, layer) for kind in kinds for layer in range(adapter.n_layers)]
        with torch.no_grad(), capture(adapter, sites, store):
            out = model(input_ids=ids.to(adapter.input_device), use_cache=True, logits_to_keep=1)
        kv = getattr(out, "cache", None) or out.past_key_values
        tensors = {"last_logits": out.logits[0, -1]}
        tensors.update({str(site): tensor[0] for site, tensor in store.items()})
        for layer in range(adapter.n_layers):
            tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = _layer_kv(kv, layer)
        if cache is not None:
            cache.put(key, tensors)
    devices = [adapter.layer_device(layer) for layer in range(adapter.n_layers)]
    return CachedRun(
        ids=ids,
        score=float(refusal_score(tensors["last_logits"], refusal_ids)),
        acts={Site(kind, layer): tensors[f"{kind}.{layer}"].to(devices[layer]) for kind in kinds for layer in range(adapter.n_layers)},
        keys=[tensors[f"keys.{layer}"].to(devices[layer]) for layer in range(adapter.n_layers)],
        values=[tensors[f"values.{layer}"].to(devices[layer]) for layer in range(adapter.n_layers)],
    )


def patch_naive(model: torch.nn.Module, adapter: ArchitectureAdapter, target: CachedRun, source: CachedRun,
                variants: Sequence[Variant], refusal_ids: Sequence[int]) -> torch.Tensor:
    """The reference: one full forward pass of the model per variant. Returns the patched scores."""
    scores = []
    _check_offsets(variants, target, source)
    for variant in variants:
        plan = _Plan(variant.layer, source, adapter.n_heads)
        plan.add(variant, 0, 0, target.length)
        with torch.no_grad(), intervene(adapter, plan.hooks(0, 1, SITE_KINDS)):
            logits = model(input_ids=target.ids.to(adapter.input_device)).logits
        scores.append(refusal_score(logits[0, -1], refusal_ids).item())
    return torch.tensor(scores, dtype=torch.float64)


def patch_fast(adapter: ArchitectureAdapter, target: CachedRun, source: CachedRun, variants: Sequence[Variant],
               refusal_ids: Sequence[int], max_batch_tokens: int = 8192) -> torch.Tensor:
    """The scores ``patch_naive`` computes (up to floating-point rounding), computing only what the patches can change."""
    _check_offsets(variants, target, source)
    window = adapter.sliding_window()
    if window is not None and max(target.length, source.length) >= window:
        raise ConfigError(
            f"prompts of {max(target.length, source.length)} tokens reach this model's attention window ({window}); "
            "the fast engine builds full causal masks, so use experiment.engine=naive"
        )
    scores = torch.full((len(variants),), target.score, dtype=torch.float64)  # what a patch that copies nothing new leaves
    unchanged = unchanged_prefix(target, source)
    by_start: dict[int, list[int]] = defaultdict(list)
    for i, variant in enumerate(variants):
        start = first_changed(variant, target.length, unchanged)
        if start is not None:
            by_start[start].append(i)
    with torch.no_grad():
        for start, members in batches(by_start, [v.layer for v in variants], target.length, adapter.n_layers):
            rows = _run_from(adapter, target, source, [variants[i] for i in members], start, refusal_ids, max_batch_tokens)
            scores[members] = rows
    return scores


# A layer pass of fewer tokens than this costs about as much as one of this many: thin matrix
# products leave the cores idle, and the Python and small kernels of a pass cost the same. Chosen
# on 2 CPU cores (the residual sweeps of scripts/bench_peers.py ran 1.2x to 3x faster than with no
# merging); any value stays exact, since a batch that starts early only recomputes unchanged positions.
LAYER_PASS_TOKENS = 128


def batches(by_start: dict[int, list[int]], layers: Sequence[int], length: int, n_layers: int,
            pass_tokens: int = LAYER_PASS_TOKENS) -> list[tuple[int, list[int]]]:
    """Variants grouped by first changed position, merged into fewer, larger batches where that costs less.

    A batch computes every position from its earliest start, so merging starts trades recomputed
    positions for fewer, fuller layer passes. A pass costs its tokens (rows times positions), or
    ``pass_tokens`` if it has fewer; the cheapest split of the sorted starts into runs under that
    cost is found exactly, by dynamic programming.
    """
    starts = sorted(by_start)
    if len(starts) <= 1:
        return [(start, by_start[start]) for start in starts]
    joins = np.zeros((len(starts) + 1, n_layers))  # joins[k, l]: variants of the first k starts joining at layer l
    for k, start in enumerate(starts):
        joins[k + 1] = joins[k] + np.bincount([layers[i] for i in by_start[start]], minlength=n_layers)
    rows = joins.cumsum(axis=1)  # rows[k, l]: those variants' rows in the batch at layer l
    queries = length - np.array(starts)  # positions a batch computes, by its first start
    best = np.full(len(starts) + 1, np.inf)
    best[0] = 0.0
    cut = np.zeros(len(starts) + 1, dtype=int)
    for end in range(1, len(starts) + 1):
        batch_rows = rows[end] - rows[:end]  # [candidate first start, layer]
        tokens = batch_rows * queries[:end, None]
        cost = np.where(batch_rows > 0, np.maximum(tokens, pass_tokens), 0).sum(axis=1) + best[:end]
        cut[end] = int(np.argmin(cost))
        best[end] = cost[cut[end]]
    runs, end = [], len(starts)
    while end:
        runs.append((starts[cut[end]], [i for start in starts[cut[end]:end] for i in by_start[start]]))
        end = cut[end]
    return runs[::-1]


def unchanged_prefix(target: CachedRun, source: CachedRun) -> int:
    """How many leading positions a patch from ``source`` provably cannot change in ``target``.

    Offsets from the end name the same position in both runs only when the prompts have the same
    length; there, the positions of their common token prefix hold the same activations in both.
    """
    if target.length != source.length:
        return 0
    differs = (target.ids.flatten() != source.ids.flatten()).nonzero()
    return int(differs[0]) if len(differs) else target.length


def first_changed(variant: Variant, length: int, unchanged: int) -> int | None:
    """The first position of a ``length``-token target that ``variant`` changes; None if it copies only unchanged ones."""
    changed = [length + o for o in variant.offsets if length + o >= unchanged]
    return min(changed) if changed else None


def _run_from(adapter: ArchitectureAdapter, target: CachedRun, source: CachedRun, variants: list[Variant], start: int,
              refusal_ids: Sequence[int], max_batch_tokens: int) -> torch.Tensor:
    """Scores of variants that change nothing before ``start``, computed from it, joining the batch at their layers."""
    length = target.length
    queries = length - start
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, variant in enumerate(variants):
        by_layer[variant.layer].append(i)
    order: list[int] = []  # which variant each row of ``hidden`` is
    hidden: torch.Tensor | None = None
    chunk_rows = max(1, max_batch_tokens // queries)
    for layer in range(min(by_layer), adapter.n_layers):
        device = adapter.layer_device(layer)
        joining = by_layer.get(layer, [])
        plan = _Plan(layer, source, adapter.n_heads)
        if joining:
            fresh = target.acts[Site("resid_pre", layer)][start:].to(device).expand(len(joining), -1, -1)
            for row, i in enumerate(joining):
                plan.add(variants[i], row, start, length)
            fresh = plan.patch_rows(fresh, "resid_pre")
            # Newcomers go first, so the plan's rows are the batch's rows.
            hidden = fresh if hidden is None else torch.cat([fresh, hidden.to(device)])
            order[:0] = joining
        assert hidden is not None
        hidden = hidden.to(device)
        position_ids = torch.arange(start, length, device=device)[None]
        embeddings = adapter.position_embeddings(layer, hidden[:1], position_ids)
        allowed = torch.ones(queries, length, dtype=torch.bool, device=device).tril(diagonal=start)
        mask = adapter.attention_mask_for(allowed, hidden.dtype)
        keys = target.keys[layer][:, :, :start].to(device)
        values = target.values[layer][:, :, :start].to(device)
        outputs = []
        for first in range(0, hidden.shape[0], chunk_rows):
            chunk = hidden[first:first + chunk_rows]
            hooks = plan.hooks(first, first + chunk.shape[0], ("attn_out", "mlp_out", "head_z"))
            cache = _PrefixKV(keys, values) if start else None
            with intervene(adapter, hooks):
                outputs.append(adapter.run_layer(layer, chunk, mask, position_ids, embeddings, cache))
        hidden = torch.cat(outputs)
    assert hidden is not None
    result = torch.empty(len(variants), dtype=torch.float64)
    scores = [
        refusal_score(adapter.logits_from_residual(hidden[first:first + 256, -1]), refusal_ids)  # [rows, vocab] at a time
        for first in range(0, hidden.shape[0], 256)
    ]
    result[order] = torch.cat(scores).double().cpu()
    return result


class _Plan:
    """Which rows get which source values at one layer: (row, query position, source position, head) per site kind."""

    def __init__(self, layer: int, source: CachedRun, n_heads: int) -> None:
        self.layer = layer
        self.source = source
        self.n_heads = n_heads
        self.entries: dict[str, list[tuple[int, int, int, int]]] = defaultdict(list)

    def add(self, variant: Variant, row: int, start: int, length: int) -> None:
        """Patch ``variant`` into ``row``, whose first computed position is ``start`` of a ``length``-token target.

        Offsets before ``start`` are left out: the caller starts a row only after the positions it copies nothing new into.
        """
        for offset in variant.offsets:
            if length + offset < start:
                continue
            self.entries[variant.kind].append((row, length + offset - start, self.source.length + offset, variant.head or 0))

    def patch_rows(self, tensor: torch.Tensor, kind: str, first: int = 0) -> torch.Tensor:
        """``tensor`` (rows ``first:`` of the batch) with this plan's source values written in, as a new tensor."""
        entries = [e for e in self.entries.get(kind, ()) if first <= e[0] < first + tensor.shape[0]]
        if not entries:
            return tensor
        row, query, src, head = (torch.tensor(x, device=tensor.device) for x in zip(*entries))
        values = self.source.acts[Site(kind, self.layer)].to(tensor.device, tensor.dtype)
        out = tensor.clone()
        if kind == "head_z":
            heads = out.view(*out.shape[:2], self.n_heads, -1)
            heads[row - first, query, head] = values.view(values.shape[0], self.n_heads, -1)[src, head]
        else:
            out[row - first, query] = values[src]
        return out

    def hooks(self, first: int, stop: int, kinds: Sequence[str]) -> dict[Site, Any]:
        """Hook functions for the rows ``first:stop`` of the batch, one per site kind that has a patch there."""
        wanted = [k for k in kinds if any(first <= e[0] < stop for e in self.entries.get(k, ()))]
        return {Site(kind, self.layer): self._hook(kind, first) for kind in wanted}

    def _hook(self, kind: str, first: int) -> Any:
        return lambda tensor: self.patch_rows(tensor, kind, first)


class _PrefixKV:
    """Serves the target run's keys and values for the positions before the patched ones.

    Stands in for a transformers cache inside attention, which calls ``update`` with the new
    positions' keys and values and attends over what it returns; nothing is stored.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch = key_states.shape[0]
        keys = self.keys.to(key_states.dtype).expand(batch, -1, -1, -1)
        values = self.values.to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([keys, key_states], dim=2), torch.cat([values, value_states], dim=2)


def _layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _check_offsets(variants: Sequence[Variant], target: CachedRun, source: CachedRun) -> None:
    shortest = min(target.length, source.length)
    for variant in variants:
        if min(variant.offsets) < -shortest:
            raise ConfigError(f"{variant} reaches position {min(variant.offsets)} from the end; the pair's shorter prompt has {shortest} tokens")
