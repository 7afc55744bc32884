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
from refusal_lab.sequences import SFTExample, collate


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
    reference_adapter, model_adapter = adapter_for(reference), adapter_for(model)
    results: list[float] = []
    for ids, labels, mask, reads in tqdm(_answer_batches(tokenizer, chats, answers, batch_size), desc="KL to the base model", unit="batch"):
        kl = _kl(_log_probs(reference_adapter, ids, mask, reads), _log_probs(model_adapter, ids, mask, reads))
        results += [piece.mean().item() if len(piece) else float("nan") for piece in kl.split(reads.sum(dim=1).tolist())]
    return results


def _answer_batches(tokenizer: PreTrainedTokenizerBase, chats: Sequence[str], answers: Sequence[str],
                    batch_size: int, max_answer_tokens: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (ids, labels, mask, reads) batches of chat + answer (its first ``max_answer_tokens`` tokens);
    ``reads`` marks the positions that predict an answer token, the only ones unembedded (the vocabulary is large)."""
    examples = [
        SFTExample(tuple(tokenizer(c, add_special_tokens=False)["input_ids"]),
                   tuple(tokenizer(a, add_special_tokens=False)["input_ids"][:max_answer_tokens]))
        for c, a in zip(chats, answers, strict=True)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(examples), batch_size):
        ids, labels, mask = collate(examples[start : start + batch_size], pad)
        reads = torch.zeros_like(mask, dtype=torch.bool)
        reads[:, :-1] = labels[:, 1:] != -100
        batches.append((ids, labels, mask, reads))
    return batches


def _log_probs(adapter: Any, ids: torch.Tensor, mask: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
    hidden = adapter.decoder(input_ids=ids.to(adapter.input_device), attention_mask=mask.to(adapter.input_device)).last_hidden_state
    return torch.log_softmax(adapter.logits_from_hidden(hidden[reads.to(hidden.device)]).float(), dim=-1).cpu()


@torch.inference_mode()
def answer_log_probs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[str],
    answers: Sequence[str],
    max_answer_tokens: int,
    hooks: Any = None,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per answer, the model's next-token log-probabilities [tokens, vocab] at the positions that predict its first
    ``max_answer_tokens`` tokens (teacher-forced, under ``hooks``): compared with ``answer_kl``, how far an intervention
    moves the distributions along a whole stretch of an answer, not only at its first token."""
    from refusal_lab.interventions import intervene

    adapter = adapter_for(model)
    out: list[torch.Tensor] = []
    with intervene(adapter, hooks or {}):
        for ids, _labels, mask, reads in _answer_batches(tokenizer, chats, answers, batch_size, max_answer_tokens):
            out += list(_log_probs(adapter, ids, mask, reads).split(reads.sum(dim=1).tolist()))
    return out


def answer_kl(reference: Sequence[torch.Tensor], logp: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per answer, the mean over its tokens of KL(reference || logp) in nats, from ``answer_log_probs``; NaN for an empty answer."""
    return torch.tensor([_kl(r, p).mean().item() if len(r) else float("nan") for r, p in zip(reference, logp, strict=True)])


def next_token_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(reference || logits) of the next-token distributions given as logits, per row, in nats."""
    return _kl(torch.log_softmax(reference.float(), dim=-1), torch.log_softmax(logits.float(), dim=-1))


def _kl(reference_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return (reference_logp.exp() * (reference_logp - logp)).sum(dim=-1)


@torch.inference_mode()
def mean_token_cross_entropy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[str],
    answers: Sequence[str],
    hooks: Any = None,
    batch_size: int = 16,
) -> list[float]:
    """Per answer, the mean next-token cross-entropy (nats) of its tokens given the chat, under ``hooks``
    (site -> function, as in ``interventions.intervene``): how well the model still predicts ordinary text."""
    from refusal_lab.interventions import intervene

    adapter = adapter_for(model)
    results: list[float] = []
    with intervene(adapter, hooks or {}):
        for ids, labels, mask, reads in _answer_batches(tokenizer, chats, answers, batch_size):
            logp = _log_probs(adapter, ids, mask, reads)
            targets = labels[:, 1:][reads[:, :-1]]
            nll = -logp.gather(1, targets[:, None])[:, 0]
            results += [piece.mean().item() if len(piece) else float("nan") for piece in nll.split(reads.sum(dim=1).tolist())]
    return results
