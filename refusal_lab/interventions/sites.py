"""Sites: where in the model an activation is read or changed, as data.

Every kind is one tensor of shape [batch, positions, width] at one module of one layer:
    resid_pre  the residual stream entering the layer (width d_model)
    attn_out   what the attention block adds to the residual stream (width d_model)
    mlp_out    what the MLP adds to the residual stream (width d_model)
    head_z     the heads' outputs, concatenated, before the output projection (width n_heads * d_head)
The architecture adapter names the module; nothing else here knows a module path.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from refusal_lab.errors import ConfigError
from refusal_lab.models.adapters import ArchitectureAdapter

SITE_KINDS = ("resid_pre", "attn_out", "mlp_out", "head_z")
# Which end of the module the tensor lives at: a pre-hook sees the input, a forward hook the output.
_READS_INPUT = {"resid_pre": True, "head_z": True, "attn_out": False, "mlp_out": False}


@dataclass(frozen=True)
class Site:
    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ConfigError(f"unknown site kind {self.kind!r}; known: {', '.join(SITE_KINDS)}")

    @property
    def reads_input(self) -> bool:
        return _READS_INPUT[self.kind]

    def module(self, adapter: ArchitectureAdapter) -> nn.Module:
        if not 0 <= self.layer < adapter.n_layers:
            raise ConfigError(f"layer {self.layer} is out of range: the model has layers 0 to {adapter.n_layers - 1}")
        if self.kind == "resid_pre":
            return adapter.layer(self.layer)
        if self.kind == "attn_out":
            return adapter.attn_output(self.layer)
        if self.kind == "mlp_out":
            return adapter.mlp_output(self.layer)
        return adapter.head_output_proj(self.layer)

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"
