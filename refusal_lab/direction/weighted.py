"""Directional ablation with a weight per layer and per residual writer: the parametrisation that an
optimiser searches (``experiment=abliteration``), beside the paper's single direction removed everywhere.

- A direction per layer: the difference of the harmful and harmless mean residual streams entering it
  (at the last prompt token), optionally made orthogonal to the harmless mean, so that removing it
  takes less of what every prompt shares.
- A fractional direction index: the direction used is the interpolation of the two neighbouring
  layers' unit directions, so the search moves smoothly between layers.
- For each residual writer (attention output, MLP output) a kernel over layers: ``peak`` weight at
  layer ``position``, falling linearly to ``floor`` at ``width`` layers away, and zero beyond.

Ablating with weight w at a writer's layer removes w times its output's component along the unit
direction r: x <- x - w (x . r) r. Editing the writer's weight the same way (W <- W - w r r^T W) gives a
model that computes the same without hooks (exactly, where nothing sits between the writer and the
residual stream).

The search method is heretic's, described in its documentation and implemented here from that
description; no code of it is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from refusal_lab.interventions.hooks import SiteFn
from refusal_lab.interventions.sites import Site
from refusal_lab.models.adapters import ArchitectureAdapter

WRITERS = ("attn_out", "mlp_out")  # sites the kernels weigh: each block's write into the residual stream


@dataclass(frozen=True)
class Kernel:
    """A writer's ablation weight over layers."""

    peak: float  # the weight at ``position``
    position: float  # the layer (fractional) where the weight peaks
    floor: float  # the weight ``width`` layers away
    width: float  # beyond this distance the weight is zero

    def weights(self, n_layers: int) -> np.ndarray:
        distance = np.abs(np.arange(n_layers) - self.position)
        falloff = self.peak + (self.floor - self.peak) * distance / max(self.width, 1e-9)
        return np.where(distance <= self.width, falloff, 0.0)


@dataclass(frozen=True)
class WeightedAblation:
    """One point of the search space: which direction, and how hard each writer's output loses it at each layer."""

    direction_index: float
    kernels: dict[str, Kernel]

    def layer_weights(self, n_layers: int) -> dict[str, np.ndarray]:
        return {writer: kernel.weights(n_layers) for writer, kernel in self.kernels.items()}

    def describe(self, n_layers: int) -> dict[str, object]:
        return {"direction_index": round(self.direction_index, 4),
                "kernels": {w: {k: round(v, 4) for k, v in asdict(kernel).items()} for w, kernel in self.kernels.items()},
                "layer_weights": {w: [round(float(x), 4) for x in weights] for w, weights in self.layer_weights(n_layers).items()}}


def layer_directions(harmful_means: torch.Tensor, harmless_means: torch.Tensor, project_harmless: bool) -> torch.Tensor:
    """[layers, d_model] unit directions: harmful minus harmless mean per layer, optionally with its component along
    the harmless mean removed."""
    directions = harmful_means.float() - harmless_means.float()
    if project_harmless:
        unit = harmless_means.float() / harmless_means.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        directions = directions - (directions * unit).sum(-1, keepdim=True) * unit
    return directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer index: neighbouring layers' directions interpolated."""
    index = float(np.clip(index, 0, directions.shape[0] - 1))
    low = int(np.floor(index))
    high = min(low + 1, directions.shape[0] - 1)
    mixed = (1 - (index - low)) * directions[low] + (index - low) * directions[high]
    return mixed / mixed.norm().clamp_min(1e-12)


def _weighted_projection(unit: torch.Tensor, weight: float) -> SiteFn:
    def fn(tensor: torch.Tensor) -> torch.Tensor:
        d = unit.to(tensor.device, tensor.dtype)
        return tensor - weight * (tensor @ d)[..., None] * d

    return fn


def weighted_hooks(params: WeightedAblation, directions: torch.Tensor, n_layers: int) -> dict[Site, SiteFn]:
    """Hooks that ablate as ``params`` says, at every position, generated tokens included."""
    unit = direction_at(directions, params.direction_index)
    return {Site(writer, layer): _weighted_projection(unit, float(w))
            for writer, weights in params.layer_weights(n_layers).items() for layer, w in enumerate(weights) if w != 0.0}


@torch.no_grad()
def edit_weights(adapter: ArchitectureAdapter, params: WeightedAblation, directions: torch.Tensor) -> list[str]:
    """Edit the writers' weights in place (a copy of the model, never the loaded one): W <- W - w r r^T W; returns the
    edited writers' names."""
    unit = direction_at(directions, params.direction_index)
    edited = []
    for writer, weights in params.layer_weights(adapter.n_layers).items():
        for layer, w in enumerate(weights):
            if w == 0.0:
                continue
            module = adapter.head_output_proj(layer) if writer == "attn_out" else adapter.mlp_down_proj(layer)
            weight = module.weight
            r = unit.to(weight.device, torch.float32)
            weight.copy_((weight.float() - float(w) * r[:, None] * (r @ weight.float())[None]).to(weight.dtype))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_((module.bias.float() - float(w) * (module.bias.float() @ r) * r).to(module.bias.dtype))
            edited.append(f"{writer}.{layer}")
    return edited


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both objectives (both minimised), by the first objective."""
    front = [i for i, (a, b) in enumerate(points)
             if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: points[i])
