"""The refusal score: log-odds of the refusal-start tokens at the first response position.

score = log p(R) - log(1 - p(R)), with p(R) the softmax mass on the refusal tokens R. Computed
as logsumexp over R minus logsumexp over the rest, which is exact and stable in any precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from refusal_lab.errors import ConfigError


def refusal_token_ids(tokenizer: PreTrainedTokenizerBase, strings: Sequence[str]) -> list[int]:
    """The first token of each refusal opener as the model would emit it at response start."""
    if not strings:
        raise ConfigError("model.refusal_tokens is empty; list the words refusals start with, e.g. ['I', 'Sorry', 'As']")
    ids: list[int] = []
    for text in strings:
        encoded = tokenizer.encode(str(text), add_special_tokens=False)
        if not encoded:
            raise ConfigError(f"model.refusal_tokens entry {text!r} encodes to no token")
        if encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


def refusal_score(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Log-odds of the refusal tokens, for logits of shape [..., vocab]; returns [...] in fp32."""
    logits = logits.float()
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    mask[list(token_ids)] = True
    refusal = torch.logsumexp(logits[..., mask], dim=-1)
    other = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1)
    return refusal - other
