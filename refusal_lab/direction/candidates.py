"""Candidate refusal directions: harmful minus harmless mean residual stream, per layer and position.

The positions are the last ``positions`` prompt tokens (the chat template's post-instruction tokens
by default), where every prompt has the same tokens, so the means compare like with like.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from refusal_lab.generation import next_token_logits
from refusal_lab.models import LoadedModel


def mean_difference(loaded: LoadedModel, harmful: Sequence[str], harmless: Sequence[str], positions: int,
                    batch_size: int) -> torch.Tensor:
    """[layers, positions, d_model]: the mean residual stream entering each layer at each of the last
    ``positions`` positions over the ``harmful`` chat texts, minus the same over the ``harmless`` ones (fp32)."""
    means = []
    for texts in (harmful, harmless):
        _, captured = next_token_logits(loaded, texts, batch_size, capture_last=positions)
        means.append(captured["resid_pre"].mean(dim=0))
    return means[0] - means[1]
