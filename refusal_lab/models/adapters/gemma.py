"""Gemma families.

Gemma 1 is a Llama module tree. Gemma 2 and 3 normalise each block's output before adding it to
the residual stream: the attention contribution is ``post_attention_layernorm``'s output (in Llama
that name is the *pre*-MLP norm) and the MLP contribution is ``post_feedforward_layernorm``'s.
Gemma 2 also soft-caps its final logits. Gemma 3 has a rotary embedding per attention type
(sliding and full).
"""

from typing import Any

import torch
from torch import nn

from refusal_lab.models.adapters.base import ArchitectureAdapter
from refusal_lab.models.adapters.registry import register_adapter


@register_adapter
class GemmaAdapter(ArchitectureAdapter):
    model_types = ("gemma",)


@register_adapter
class Gemma2Adapter(ArchitectureAdapter):
    model_types = ("gemma2", "gemma3", "gemma3_text")
    writes_through_norm = True

    def attn_output(self, index: int) -> nn.Module:
        return self.layer(index).post_attention_layernorm

    def mlp_output(self, index: int) -> nn.Module:
        return self.layer(index).post_feedforward_layernorm

    def _cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def position_embeddings(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        layer_types = getattr(self.config, "layer_types", None)
        if self.config.model_type == "gemma2" or not layer_types:
            return super().position_embeddings(index, hidden, position_ids)
        return self.decoder.rotary_emb(hidden, position_ids, layer_types[index])
