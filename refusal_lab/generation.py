"""Batched greedy generation that also hands back the first response position's logits.

The refusal score is read from the same forward pass that produces the first generated token,
so a baseline costs no extra pass. Prompts are sorted by length so batches waste little padding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refusal_lab.interventions import Site, SiteFn, capture, intervene
from refusal_lab.models import LoadedModel
from refusal_lab.models.adapters.base import cache_argument


@dataclass(frozen=True)
class Generation:
    completion: str
    readout: torch.Tensor | None  # what first_logits_readout made of the first response logits
    n_prompt_tokens: int
    n_new_tokens: int
    finished: bool  # ended with an end-of-turn token within max_new_tokens


def tokenize_chats(loaded: LoadedModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Left-padded ids for already-templated texts (the template carries any BOS itself)."""
    return loaded.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)


@torch.inference_mode()
def generate_greedy(
    loaded: LoadedModel,
    texts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    first_logits_readout: Callable[[torch.Tensor], torch.Tensor] | None = None,
    description: str = "generating",
    hooks: Mapping[Site, SiteFn] | None = None,
    progress: bool = True,
) -> list[Generation]:
    """Greedy completions of chat-formatted ``texts``, in the order given (``progress``: a bar; off inside a search
    that has its own).

    ``hooks`` change activations at every forward pass of the generation, prompt and generated
    tokens alike (an ablated or steered model); they are removed when it returns.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    tokenizer = loaded.tokenizer
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    results: list[Generation | None] = [None] * len(texts)
    device = loaded.adapter.input_device
    eos = set(_as_list(loaded.model.generation_config.eos_token_id))
    with tqdm(total=len(texts), desc=description, unit="prompt", disable=not progress) as bar, (intervene(loaded.adapter, hooks) if hooks else nullcontext()):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            encoded = {k: v.to(device) for k, v in tokenize_chats(loaded, [texts[i] for i in batch]).items()}
            out = loaded.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=first_logits_readout is not None,
            )
            new_tokens = out.sequences[:, encoded["input_ids"].shape[1] :].cpu()
            readout = first_logits_readout(out.logits[0]).cpu() if first_logits_readout else None
            for row, index in enumerate(batch):
                tokens = new_tokens[row].tolist()
                n_new = next((k + 1 for k, t in enumerate(tokens) if t in eos), None)
                finished = n_new is not None
                n_new = n_new or len(tokens)
                results[index] = Generation(
                    completion=tokenizer.decode(tokens[:n_new], skip_special_tokens=True).strip(),
                    readout=readout[row] if readout is not None else None,
                    n_prompt_tokens=lengths[index],
                    n_new_tokens=n_new,
                    finished=finished,
                )
            bar.update(len(batch))
    return [r for r in results if r is not None]


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


@torch.inference_mode()
def next_token_logits(
    loaded: LoadedModel,
    texts: Sequence[str],
    batch_size: int,
    hooks: Mapping[Site, SiteFn] | None = None,
    capture_last: int = 0,
    capture_kinds: Sequence[str] = ("resid_pre",),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logits at the first response position of each chat-formatted text ([N, vocab], fp32, CPU),
    under ``hooks``; with ``capture_last``, also each layer's activations of ``capture_kinds`` at the
    last that many prompt positions ({kind: [N, layers, positions, width]}).

    Chat texts share their start (system prompt, user header): that prefix is computed once, under
    the same hooks, and its keys and values serve every batch, which halves the work on short prompts.
    Each batch's remainders are left-padded behind it, with position ids counted over real tokens,
    so a prompt's numbers do not depend on its batch (up to floating-point rounding).
    """
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    shared = _shared_prefix(ids, keep=max(capture_last, 1)) if adapter.sliding_window() is None else 0
    sites = [Site(kind, layer) for kind in capture_kinds for layer in range(adapter.n_layers)] if capture_last else []
    logits: list[torch.Tensor] = []
    kept: dict[str, list[torch.Tensor]] = {kind: [] for kind in capture_kinds} if capture_last else {}
    device = adapter.input_device
    with intervene(adapter, hooks or {}):
        cache_kwarg = cache_argument(loaded.model)
        prefix = None
        if shared:
            out = loaded.model(input_ids=torch.tensor([ids[0][:shared]], device=device), use_cache=True)
            prefix = getattr(out, "cache", None) or out.past_key_values
        for start in range(0, len(ids), batch_size):
            rows = [row[shared:] for row in ids[start : start + batch_size]]
            input_ids, mask = _left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
            cache = None
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(rows))
            store: dict[Site, torch.Tensor] = {}
            with capture(adapter, sites, store):
                out = loaded.model(
                    input_ids=input_ids.to(device), attention_mask=torch.cat([torch.ones(len(rows), shared, dtype=mask.dtype), mask], 1).to(device),
                    position_ids=(shared + (mask.cumsum(-1) - 1).clamp(min=0)).to(device), **{cache_kwarg: cache},
                    use_cache=cache is not None, logits_to_keep=1,
                )
            logits.append(out.logits[:, -1].float().cpu())
            for kind in kept:
                kept[kind].append(torch.stack([store[Site(kind, layer)][:, -capture_last:].float().cpu() for layer in range(adapter.n_layers)], dim=1))
    return torch.cat(logits), {kind: torch.cat(parts) for kind, parts in kept.items()}


def _shared_prefix(ids: Sequence[Sequence[int]], keep: int) -> int:
    """How many leading tokens every row shares, leaving at least ``keep`` of each row after them."""
    shared = min(len(row) for row in ids) - keep
    for position in range(max(shared, 0)):
        if any(row[position] != ids[0][position] for row in ids):
            return position
    return max(shared, 0)


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return input_ids, mask
