"""Named operations on a site's activations, each a small factory of hook functions (``SiteFn``).

    replace      write given values (zero, mean or resample ablation) at the last ``n`` positions or all
    project_out  remove the component along a direction (directional ablation)
    add          add a vector (activation addition)

A function gets [batch, positions, width] and returns a new tensor, never changing its input (see
``hooks.py``). Position-limited operations act on the prompt's own forward pass (more than one
position); the one-token steps of generation that follow are generated tokens, left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from refusal_lab.interventions.hooks import SiteFn
from refusal_lab.interventions.sites import Site
from refusal_lab.models.adapters import ArchitectureAdapter


def project_out(direction: torch.Tensor) -> SiteFn:
    """x - (x . d) d for the unit vector d along ``direction``, at every position."""
    unit = direction / direction.norm()

    def fn(tensor: torch.Tensor) -> torch.Tensor:
        d = unit.to(tensor.device, tensor.dtype)
        return tensor - (tensor @ d)[..., None] * d

    return fn


def add(vector: torch.Tensor, scale: float = 1.0) -> SiteFn:
    """x + scale * vector at every position."""

    def fn(tensor: torch.Tensor) -> torch.Tensor:
        return tensor + scale * vector.to(tensor.device, tensor.dtype)

    return fn


def replace(values: torch.Tensor, last: int | None = None, columns: slice | None = None) -> SiteFn:
    """Write ``values`` ([width] or [last, width], aligned from the end) into the last ``last`` positions
    (None: every position), only in ``columns`` of the width where given (one head of ``head_z``)."""

    def fn(tensor: torch.Tensor) -> torch.Tensor | None:
        if last is not None and tensor.shape[1] == 1:
            return None  # a generated token, not one of the prompt's positions
        out = tensor.clone()
        where = slice(-last, None) if last is not None else slice(None)
        width = columns or slice(None)
        out[:, where, width] = values.to(tensor.device, tensor.dtype)
        return out

    return fn


def directional_ablation(adapter: ArchitectureAdapter, direction: torch.Tensor) -> dict[Site, SiteFn]:
    """Project ``direction`` out of every layer's residual stream input, attention output and MLP output:
    no component can write it, at any position, generated tokens included (Arditi et al. 2024)."""
    fn = project_out(direction)
    return {Site(kind, layer): fn for layer in range(adapter.n_layers) for kind in ("resid_pre", "attn_out", "mlp_out")}


def activation_addition(direction: torch.Tensor, layer: int, scale: float = 1.0) -> dict[Site, SiteFn]:
    """Add ``direction`` to the residual stream entering ``layer``, at every position."""
    return {Site("resid_pre", layer): add(direction, scale)}


def combine(*hook_sets: Mapping[Site, SiteFn]) -> dict[Site, SiteFn]:
    """Several operations at once; two on the same site run one after the other."""
    out: dict[Site, SiteFn] = {}
    for hooks in hook_sets:
        for site, fn in hooks.items():
            if site in out:
                first = out[site]

                def chained(tensor: torch.Tensor, first: SiteFn = first, second: SiteFn = fn) -> torch.Tensor | None:
                    middle = first(tensor)
                    middle = tensor if middle is None else middle
                    last = second(middle)
                    return middle if last is None else last

                out[site] = chained
            else:
                out[site] = fn
    return out
