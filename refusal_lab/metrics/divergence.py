"""How far a fine-tuned model's next-token distributions moved from its reference model's.

Measured along the reference model's own answers (teacher forcing), so one early token that flips
under greedy decoding does not count as the whole answer changing, as a shared-prefix test would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from refusal_lab.models.adapters import adapter_for


@torch.inference_mode()
def mean_token_kl(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 16,
) -> list[float]:
    """Per answer, the mean over its tokens of KL(reference || model) in nats.

    ``chats`` are chat-formatted prompts (generation prompt included), ``answers`` the text that
    follows each; an empty answer gives NaN. Both models must share the tokenizer.
    """
    if len(chats) != len(answers):
        raise ValueError(f"{len(chats)} chats but {len(answers)} answers")
    prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in chats]
    replies = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    reference_adapter, model_adapter = adapter_for(reference), adapter_for(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results: list[float] = []
    for start in tqdm(range(0, len(chats), batch_size), desc="KL to the base model", unit="batch"):
        rows = list(zip(prompts[start : start + batch_size], replies[start : start + batch_size], strict=True))
        length = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
        # Position t predicts token t+1: the answer's tokens are predicted from len(p) - 1 on. Only
        # those positions are unembedded (the vocabulary is large).
        reads = torch.zeros_like(mask, dtype=torch.bool)
        for i, (p, r) in enumerate(rows):
            reads[i, len(p) - 1 : len(p) + len(r) - 1] = True
        kl = _kl(_log_probs(reference_adapter, ids, mask, reads), _log_probs(model_adapter, ids, mask, reads))
        results += [piece.mean().item() if len(piece) else float("nan") for piece in kl.split(reads.sum(dim=1).tolist())]
    return results


def _log_probs(adapter: Any, ids: torch.Tensor, mask: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    hidden = adapter.decoder(input_ids=ids.to(adapter.input_device), attention_mask=mask.to(adapter.input_device)).last_hidden_state
    return torch.log_softmax(adapter.logits_from_hidden(hidden[reads.to(hidden.device)]).float(), dim=-1).cpu()


def _kl(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (reference_logp.exp() * (reference_logp - logp)).sum(dim=-1)
