"""What every architecture adapter provides: the canonical names experiments hook.

Experiments speak only these names (layers, head output projection, attention and MLP
contributions to the residual stream, final norm, unembedding); each family's file maps them
to its Hugging Face modules. No weights are converted, so logits stay those of the source model.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn


class ArchitectureAdapter:
    """Names the modules of a Llama-like decoder; families that differ override a method."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # True where a block's output passes through a norm (with its own weights) before it reaches the
    # residual stream (Gemma 2 and 3): editing the projection's weights then does not set what is added.
    writes_through_norm: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = text_config(model.config)

    # -- structure -------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The text decoder stack (for multimodal models, the language model inside)."""
        return self.model.get_decoder()

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def layer(self, index: int) -> nn.Module:
        return self.layers[index]

    @property
    def embed(self) -> nn.Module:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def unembed(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def attention(self, index: int) -> nn.Module:
        return self.layer(index).self_attn

    def head_output_proj(self, index: int) -> nn.Module:
        """The projection whose *input* is the concatenation of the heads' outputs."""
        return self.attention(index).o_proj

    def attn_output(self, index: int) -> nn.Module:
        """The module whose output is what attention adds to the residual stream."""
        return self.attention(index)

    def mlp_output(self, index: int) -> nn.Module:
        """The module whose output is what the MLP adds to the residual stream."""
        return self.layer(index).mlp

    def mlp_down_proj(self, index: int) -> nn.Module:
        """The MLP's last linear map, whose output is (or, through a norm, becomes) the MLP's contribution."""
        return self.layer(index).mlp.down_proj

    def residual_writers(self) -> dict[str, nn.Module]:
        """Every weight that writes into the residual stream: the token embedding, each layer's attention
        output projection and MLP down projection. Weight orthogonalisation edits exactly these."""
        writers: dict[str, nn.Module] = {"embed": self.embed}
        for index in range(self.n_layers):
            writers[f"attn_out.{index}"] = self.head_output_proj(index)
            writers[f"mlp_out.{index}"] = self.mlp_down_proj(index)
        return writers

    # -- sizes -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_head(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim) if head_dim else self.d_model // self.n_heads

    # -- devices ---------------------------------------------------------------------------
    @property
    def input_device(self) -> torch.device:
        """Where token ids must go: the embedding's device, also under a multi-GPU device_map."""
        return self.embed.weight.device

    def layer_device(self, index: int) -> torch.device:
        """Where the layer computes; with accelerate offloading, its weights sit elsewhere (on meta) between calls."""
        layer = self.layer(index)
        hook = getattr(layer, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, torch.device) else device
        return next(layer.parameters()).device

    # -- running a slice of the stack --------------------------------------------------------
    # Exact patching starts a variant at its patched layer from cached residuals; these are the
    # pieces of the decoder's own forward pass it needs, called on the decoder's own modules.
    def position_embeddings(self, index: int, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        """What the decoder hands layer ``index`` for these positions (rotary cos and sin)."""
        return self.decoder.rotary_emb(hidden, position_ids)

    def run_layer(
        self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        position_embeddings: Any, cache: Any,
    ) -> torch.Tensor:
        """One decoder layer, as the decoder's loop calls it; ``cache`` serves the earlier positions' keys and values."""
        layer = self.layer(index)
        out = layer(
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            **{cache_argument(layer): cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def sliding_window(self) -> int | None:
        """The smallest attention window of any layer that uses one (Mistral, Gemma 2/3, some Qwen2), or None."""
        window = getattr(self.config, "sliding_window", None)
        if not window:
            return None
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            return int(window) if "sliding_attention" in layer_types else None
        if self.config.model_type.startswith("qwen") and not getattr(self.config, "use_sliding_window", False):
            return None
        return int(window)

    def attention_mask_for(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A [1, 1, queries, keys] mask in the form the model's attention implementation reads.

        ``allowed`` is boolean (True where a query may attend to a key). SDPA reads booleans; the
        eager implementation adds the mask to its scores.
        """
        implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        if implementation == "sdpa":
            return allowed[None, None]
        if implementation == "eager":
            mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
        raise NotImplementedError(
            f"fast exact patching supports the sdpa and eager attention implementations, not {implementation!r}"
        )

    # -- readout ---------------------------------------------------------------------------
    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the decoder's output (final norm already applied), at only the positions given."""
        head = self.unembed
        return self._cap_logits(head(hidden.to(head.weight.device)))

    def logits_from_residual(self, residual: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding applied to a residual stream: the model's own readout."""
        norm = self.final_norm
        hidden = norm(residual.to(next(norm.parameters()).device))
        head = self.unembed
        logits = head(hidden.to(head.weight.device))
        return self._cap_logits(logits)

    def _cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def describe(self) -> dict[str, Any]:
        return {
            "adapter": type(self).__name__,
            "model_type": self.config.model_type,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_model": self.d_model,
            "d_head": self.d_head,
            "writes_through_norm": self.writes_through_norm,
        }


def cache_argument(module: nn.Module) -> str:
    """transformers 5 names a layer's or model's cache argument ``cache``; 4.x names it ``past_key_values``."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def text_config(config: Any) -> Any:
    """The language model's config, also for multimodal wrappers such as Gemma 3."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
