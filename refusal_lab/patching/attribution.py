"""Attribution patching: the first-order estimate of every patch's effect at once.

The score change of a patch is approximated by (source activation - target activation) times the
gradient of the target's refusal score with respect to that activation, summed over the patched
positions (and, for a head, over its slice). One forward and one backward pass of the target plus
the source's cached forward pass serve every site. It is an approximation: runs that also have
exact effects report how well the two agree (``agreement``) instead of assuming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from refusal_lab.interventions import SITE_KINDS, Site, capture
from refusal_lab.metrics.refusal_score import refusal_score
from refusal_lab.models.adapters import ArchitectureAdapter
from refusal_lab.patching.engine import CachedRun, Variant


def score_gradients(model: torch.nn.Module, adapter: ArchitectureAdapter, run: CachedRun, refusal_ids: Sequence[int],
                    kinds: Sequence[str] = SITE_KINDS) -> dict[Site, torch.Tensor]:
    """d(refusal score at the last position) / d(activation), [T, width] per site, for ``run``'s prompt."""
    kept: dict[Site, torch.Tensor] = {}
    # Gradients flow from the embeddings on, whether or not the weights ask for them (quantized ones cannot).
    def differentiable(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    sites = [Site(kind, layer) for kind in kinds for layer in range(adapter.n_layers)]
    handle = adapter.embed.register_forward_hook(differentiable)
    try:
        with torch.enable_grad(), capture(adapter, sites, kept, detach=False):
            logits = model(input_ids=run.ids.to(adapter.input_device), logits_to_keep=1).logits
            score = refusal_score(logits[0, -1], refusal_ids)
            grads = torch.autograd.grad(score, [kept[site] for site in sites])
    finally:
        handle.remove()
    return {site: grad[0].detach() for site, grad in zip(sites, grads)}


def attribution_deltas(target: CachedRun, gradients: dict[Site, torch.Tensor], source: CachedRun,
                       variants: Sequence[Variant], n_heads: int) -> np.ndarray:
    """The estimated score change of each variant (what ``patch_fast`` minus the target score measures exactly)."""
    # Per site: (source - target) . gradient at every target position, per head for head_z.
    products: dict[Site, torch.Tensor] = {}
    out = np.empty(len(variants))
    for i, variant in enumerate(variants):
        site = Site(variant.kind, variant.layer)
        if site not in products:
            products[site] = _position_products(target, gradients[site], source, site, n_heads)
        per_position = products[site]  # [offsets from the end, heads or 1]
        rows = [per_position.shape[0] + offset for offset in variant.offsets]
        column = variant.head if variant.kind == "head_z" else 0
        out[i] = float(per_position[rows, column].sum())
    return out


def _position_products(target: CachedRun, gradient: torch.Tensor, source: CachedRun, site: Site, n_heads: int) -> torch.Tensor:
    """[positions the pair shares from the end, heads (or 1)]: each position's first-order term."""
    shared = min(target.length, source.length)
    difference = source.acts[site][-shared:].double() - target.acts[site][-shared:].double()
    grad = gradient[-shared:].double()
    if site.kind == "head_z":
        return (difference.view(shared, n_heads, -1) * grad.view(shared, n_heads, -1)).sum(-1).cpu()
    return (difference * grad).sum(-1, keepdim=True).cpu()


