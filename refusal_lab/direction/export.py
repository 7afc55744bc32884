"""Weight orthogonalisation: a model that cannot write the refusal direction, saved as a standard folder.

Every weight that writes into the residual stream (the adapter's ``residual_writers``: the token
embedding, each attention output projection and MLP down projection) has its output's component
along the unit direction r removed: W <- W - r r^T W (rows of the embedding: E <- E - E r r^T).
Where nothing sits between those weights and the residual stream, the edited model computes what
directional ablation through hooks computes, up to floating-point rounding. Where a family writes
through a norm (Gemma 2 and 3), the norm's weights reintroduce a component along r, so the export
only approximates the ablation; the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_lab.models.adapters import ArchitectureAdapter


@torch.no_grad()
def orthogonalise(adapter: ArchitectureAdapter, direction: torch.Tensor) -> dict[str, Any]:
    """Edit the model behind ``adapter`` in place; returns what was edited and whether the edit is exact."""
    model = adapter.model
    untied = _untie_output_embedding(adapter)
    edited = []
    for name, module in adapter.residual_writers().items():
        weight = module.weight
        unit = (direction / direction.norm()).to(weight.device, torch.float32)
        if isinstance(module, nn.Embedding):  # [vocab, d_model]: each row is written
            weight.copy_((weight.float() - (weight.float() @ unit)[:, None] * unit).to(weight.dtype))
        else:  # nn.Linear, [d_model, d_in]: each column is written
            weight.copy_((weight.float() - unit[:, None] * (unit @ weight.float())[None]).to(weight.dtype))
            if getattr(module, "bias", None) is not None:
                bias = module.bias
                bias.copy_((bias.float() - (bias.float() @ unit) * unit).to(bias.dtype))
        edited.append(name)
    model.config.refusal_direction_removed = True
    return {
        "edited": edited,
        "untied_output_embedding": untied,
        "exact": not adapter.writes_through_norm,
        "note": (
            "exact: the edited weights compute what directional ablation through hooks computes"
            if not adapter.writes_through_norm else
            f"approximate: {adapter.config.model_type} adds each block's output through a norm with its own weights, "
            "which puts back a component along the direction; hook ablation removes it after the norm"
        ),
    }


def save_orthogonalised(adapter: ArchitectureAdapter, tokenizer: Any, direction: torch.Tensor, folder: Path,
                        provenance: dict[str, Any]) -> dict[str, Any]:
    """Orthogonalise and save a Hugging Face folder (``model=local model.path=<folder>`` loads it),
    with ``refusal_direction.json`` beside the weights saying what was done."""
    report = orthogonalise(adapter, direction)
    folder.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    document = {**provenance, **report, "direction": [round(float(x), 7) for x in direction.float().cpu()]}
    (folder / "refusal_direction.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return {k: v for k, v in document.items() if k != "direction"}


def _untie_output_embedding(adapter: ArchitectureAdapter) -> bool:
    """Give the unembedding its own copy where it shares the embedding's weights: only the embedding is edited."""
    model, head = adapter.model, adapter.unembed
    if head is None or head.weight is not adapter.embed.weight and head.weight.data_ptr() != adapter.embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text.tie_word_embeddings = False
    return True
