"""A prompt and its answer as token ids, and right-padded batches of them.

A leaf shared by training (the organism's fine-tuning) and by metrics that read a model along an answer
(KL to a reference, cross-entropy of its own answers), so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SFTExample:
    prompt_ids: tuple[int, ...]  # the chat-formatted prompt, generation prompt included
    target_ids: tuple[int, ...]  # the response the model should give (with end-of-turn if it ends)
    avoid_at_start: tuple[int, ...] = ()  # tokens pushed down at the first response position
    weight: float = 1.0  # of this example's tokens in the loss, relative to the others'
    keep_close: bool = False  # KL to the reference model (the LoRA switched off) at the response tokens


def collate(batch: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (-100 outside the response) and the attention mask.

    Position t of the hidden states predicts label t+1, so ``labels[:, 1:] != -100`` marks the
    positions whose logits the response needs.
    """
    length = max(len(e.prompt_ids) + len(e.target_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, example in enumerate(batch):
        ids = example.prompt_ids + example.target_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.target_ids)
        attention[row, : len(ids)] = 1
    return input_ids, labels, attention
