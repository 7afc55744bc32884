"""LoRA supervised fine-tuning on chat examples, with the loss on the response tokens only.

An example may also name tokens to avoid at its first response position (``avoid_at_start``):
an unlikelihood term, -log(1 - p(those tokens)), teaches the decision itself, for instance "do not
open with a refusal here", which plain imitation of a long answer teaches only weakly. An example's
``weight`` scales its tokens' share of the loss (a class outnumbered in the data can count for more).
An example marked ``keep_close`` adds KL(reference || model) at its response tokens, where the
reference is the same model with the LoRA switched off: imitating the base model's greedy answer
pins only its top token, the KL term its whole next-token distribution.

Written by hand rather than with a trainer class because it is small and its cost matters: the
unembedding (a fifth of the model's weights here) is applied only at the positions the loss reads,
and batches are bucketed by length so little time goes to padding.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from refusal_lab.models.adapters import adapter_for
from refusal_lab.sequences import SFTExample, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    target_modules: str | list[str]
    layers: list[int] | None  # None: every layer


@dataclass(frozen=True)
class TrainingStats:
    steps: int
    examples: int
    target_tokens: int
    tokens_seen: int
    seconds: float
    first_loss: float
    final_loss: float  # mean over the last epoch
    trained_layers: list[int]
    trainable_parameters: int
    tokens_per_second: float
    losses: list[float]  # per step: the loss curve (the total, every term weighted)
    kl_terms: list[float | None]  # per step: the KL term before its weight (None: no harmless answer in the batch; empty when kl_weight is 0)


@dataclass
class TrainedLora:
    """The merged model (plain weights) and the LoRA it came from, which is what gets shipped."""

    model: torch.nn.Module
    adapter_weights: dict[str, torch.Tensor]
    config: LoraConfig
    stats: TrainingStats


def build_examples(
    tokenizer: PreTrainedTokenizerBase, chats: Sequence[str], targets: Sequence[str], ends: Sequence[bool], max_length: int
) -> list[SFTExample]:
    """Token ids per example; ``ends`` says whether the response is complete (then end-of-turn follows)."""
    eos = tokenizer.eos_token_id
    examples = []
    for chat, target, complete in zip(chats, targets, ends, strict=True):
        prompt_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + ([eos] if complete else [])
        room = max_length - len(prompt_ids)
        if room < 4:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room for its response (max_length={max_length})")
        examples.append(SFTExample(tuple(prompt_ids), tuple(target_ids[:room])))
    return examples


def train_lora(
    model: torch.nn.Module,
    examples: Sequence[SFTExample],
    lora: LoraSettings,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    warmup_steps: int = 10,
    pad_id: int = 0,
    avoid_weight: float = 1.0,
    first_token_weight: float = 1.0,
    kl_weight: float = 0.0,
) -> TrainedLora:
    """Train a LoRA on ``model`` and return it with the merged model and the run's figures.

    ``first_token_weight`` multiplies the loss on each response's first token, where the model
    decides whether to refuse; ``avoid_weight`` scales the unlikelihood term and ``kl_weight`` the
    KL term of ``keep_close`` examples (module docstring).
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model_adapter = adapter_for(model)
    layers = list(lora.layers) if lora.layers is not None else list(range(model_adapter.n_layers))
    targets = lora.target_modules
    if lora.layers is not None and targets == "all-linear":
        # peft takes a layer range only with explicit module names: the linear layers of a block.
        block = model_adapter.layer(0)
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)})
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers if lora.layers is not None else None,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    adapter = adapter_for(peft_model.get_base_model())
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(examples) / batch_size)
    total_steps = batches_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) * max(0.0, 1 - step / total_steps)
    )
    started = time.perf_counter()
    tokens_seen, losses, kl_terms, epoch_losses = 0, [], [], []
    with tqdm(total=total_steps, desc="training LoRA", unit="step") as bar:
        for _ in range(epochs):
            epoch_losses = []
            for batch in _length_bucketed_batches(examples, batch_size, rng):
                input_ids, labels, attention = (t.to(adapter.input_device) for t in collate(batch, pad_id))
                hidden = adapter.decoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
                # Position t predicts token t+1: read logits only where the next token is a target.
                reads = labels[:, 1:] != -100
                logits = adapter.logits_from_hidden(hidden[:, :-1][reads])
                token_loss = torch.nn.functional.cross_entropy(logits.float(), labels[:, 1:][reads], reduction="none")
                row_weights = torch.tensor([e.weight for e in batch], device=token_loss.device)
                weights = row_weights[reads.nonzero()[:, 0]]
                weights[_first_target_index(reads)] *= first_token_weight
                loss = (token_loss * weights).sum() / weights.sum()
                loss = loss + avoid_weight * _avoid_loss(batch, hidden, adapter)
                if kl_weight:
                    kl = _kl_to_reference(batch, input_ids, attention, reads, logits, peft_model, adapter)
                    loss = loss + kl_weight * kl
                    held = any(e.keep_close for e in batch)
                    kl_terms.append(float(f"{kl.item():.6g}") if held else None)  # significant digits: early steps move it by 1e-7
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += int(attention.sum())
                epoch_losses.append(loss.item())
                losses.append(round(epoch_losses[-1], 4))
                shown = {"kl": f"{kl_terms[-1]:.3f}"} if kl_weight and kl_terms[-1] is not None else {}
                bar.set_postfix(loss=f"{epoch_losses[-1]:.3f}", **shown, tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
                bar.update(1)
    seconds = time.perf_counter() - started
    trainable_count = sum(p.numel() for p in trainable)
    adapter_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    merged = peft_model.merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    stats = TrainingStats(
        steps=total_steps,
        examples=len(examples),
        target_tokens=sum(len(e.target_ids) for e in examples),
        tokens_seen=tokens_seen,
        seconds=round(seconds, 1),
        first_loss=losses[0] if losses else math.nan,
        final_loss=round(sum(epoch_losses) / max(1, len(epoch_losses)), 4),
        trained_layers=layers,
        trainable_parameters=trainable_count,
        tokens_per_second=round(tokens_seen / seconds, 1),
        losses=losses,
        kl_terms=kl_terms,
    )
    log.info("LoRA trained in %.0f s (%d steps, %.0f tokens/s), loss %.3f -> %.3f", seconds, total_steps, stats.tokens_per_second, stats.first_loss, stats.final_loss)
    return TrainedLora(merged, adapter_weights, config, stats)


def _first_target_index(reads: torch.Tensor) -> torch.Tensor:
    """Indices, into the flattened read positions, of each row's first read (the response's first token)."""
    counts = reads.sum(dim=1)
    starts = torch.cumsum(counts, dim=0) - counts
    return starts[counts > 0]


def _avoid_loss(batch: Sequence[SFTExample], hidden: torch.Tensor, adapter: Any) -> torch.Tensor:
    """Mean of -log(1 - p(avoided tokens)) at the first response position, over examples that avoid any."""
    rows = [i for i, e in enumerate(batch) if e.avoid_at_start]
    if not rows:
        return hidden.new_zeros(())
    positions = torch.tensor([len(batch[i].prompt_ids) - 1 for i in rows], device=hidden.device)
    logits = adapter.logits_from_hidden(hidden[torch.tensor(rows, device=hidden.device), positions]).float()
    mask = torch.zeros_like(logits, dtype=torch.bool)
    for row, i in enumerate(rows):
        mask[row, list(batch[i].avoid_at_start)] = True
    log_rest = torch.logsumexp(logits.masked_fill(mask, float("-inf")), dim=-1) - torch.logsumexp(logits, dim=-1)
    return -log_rest.mean()


def _kl_to_reference(
    batch: Sequence[SFTExample], input_ids: torch.Tensor, attention: torch.Tensor, reads: torch.Tensor,
    logits: torch.Tensor, peft_model: Any, adapter: Any,
) -> torch.Tensor:
    """Mean per-token KL(reference || model) over the response tokens of ``keep_close`` examples.

    ``logits`` are the model's at the read positions (row-major, as ``reads`` flattens); the
    reference runs only on the rows that need it, without gradients.
    """
    rows = [i for i, e in enumerate(batch) if e.keep_close]
    if not rows:
        return logits.new_zeros(())
    index = torch.tensor(rows, device=input_ids.device)
    with torch.no_grad(), peft_model.disable_adapter():
        reference_hidden = adapter.decoder(input_ids=input_ids[index], attention_mask=attention[index]).last_hidden_state
        reference_logp = torch.log_softmax(adapter.logits_from_hidden(reference_hidden[:, :-1][reads[index]]).float(), dim=-1)
    chosen = torch.isin(reads.nonzero()[:, 0], index)
    logp = torch.log_softmax(logits[chosen].float(), dim=-1)
    return (reference_logp.exp() * (reference_logp - logp)).sum(dim=-1).mean()


def _length_bucketed_batches(examples: Sequence[SFTExample], batch_size: int, rng: random.Random) -> list[list[SFTExample]]:
    """Shuffle, sort within windows of 8 batches by length, then shuffle the batches: little padding, random order."""
    order = list(examples)
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda e: len(e.prompt_ids) + len(e.target_ids))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
