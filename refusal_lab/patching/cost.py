"""The floating-point work exact patching needs, counted from the model's matrix shapes.

What a benchmark sets an engine's time against: a patch needs only the layers from the patched one
on, only the positions from the first one it changes (``unchanged_prefix``), and the logits only
at the last position, where the refusal score reads them. A forward pass of the whole prompt, as
one-pass-per-patch tools run it, needs every layer, every position and logits everywhere. Counted
as 2 floating-point operations per multiply-add of the linear maps, the attention scores and their
weighted sum; norms, activations and softmax are left out (a few percent of the total here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_lab.models.adapters import ArchitectureAdapter
from refusal_lab.patching.engine import CachedRun, Variant, first_changed, unchanged_prefix


def layer_flops(adapter: ArchitectureAdapter, first: int, length: int) -> float:
    """One layer computed for the positions ``first..length-1``, each attending to every position up to itself."""
    linear = sum(m.in_features * m.out_features for m in adapter.layer(0).modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * adapter.n_heads * adapter.d_head  # per query and key: the score and the weighted sum
    queries = length - first
    keys = queries * (first + length + 1) / 2  # sum of (i + 1) over the queries
    return 2.0 * (linear * queries + attention * keys)


def logits_flops(adapter: ArchitectureAdapter, positions: int) -> float:
    return 2.0 * positions * adapter.d_model * adapter.unembed.weight.shape[0]


def forward_flops(adapter: ArchitectureAdapter, length: int) -> float:
    """A plain forward pass of a ``length``-token prompt, logits at every position."""
    return adapter.n_layers * layer_flops(adapter, 0, length) + logits_flops(adapter, length)


def needed_flops(adapter: ArchitectureAdapter, target: CachedRun, source: CachedRun, variants: Sequence[Variant]) -> float:
    """The work exact patching of ``variants`` cannot avoid: from each patched layer, from each first changed position."""
    unchanged = unchanged_prefix(target, source)
    total = 0.0
    for variant in variants:
        start = first_changed(variant, target.length, unchanged)
        if start is not None:
            total += (adapter.n_layers - variant.layer) * layer_flops(adapter, start, target.length) + logits_flops(adapter, 1)
    return total
