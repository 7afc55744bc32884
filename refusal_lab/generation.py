"""Batched greedy generation that also hands back the first response position's logits.

The refusal score is read from the same forward pass that produces the first generated token,
so a baseline costs no extra pass. Prompts are sorted by length so batches waste little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refusal_lab.interventions import Site, SiteFn, capture, intervene
from refusal_lab.models import LoadedModel


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
) -> list[Generation]:
    """Greedy completions of chat-formatted ``texts``, in the order given.

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
    with tqdm(total=len(texts), desc=description, unit="prompt") as bar, (intervene(loaded.adapter, hooks) if hooks else nullcontext()):
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
    one forward pass per batch under ``hooks``; with ``capture_last``, also each layer's activations
    of ``capture_kinds`` at the last that many prompt positions ({kind: [N, layers, positions, width]}).

    Batches are left-padded, with position ids counted from each prompt's first real token, so a
    prompt's numbers do not depend on what it was batched with (up to floating-point rounding).
    """
    adapter = loaded.adapter
    sites = [Site(kind, layer) for kind in capture_kinds for layer in range(adapter.n_layers)] if capture_last else []
    logits: list[torch.Tensor] = []
    kept: dict[str, list[torch.Tensor]] = {kind: [] for kind in capture_kinds} if capture_last else {}
    for start in range(0, len(texts), batch_size):
        encoded = tokenize_chats(loaded, texts[start : start + batch_size])
        mask = encoded["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        store: dict[Site, torch.Tensor] = {}
        with intervene(adapter, hooks or {}), capture(adapter, sites, store):
            out = loaded.model(
                input_ids=encoded["input_ids"].to(adapter.input_device), attention_mask=mask.to(adapter.input_device),
                position_ids=position_ids.to(adapter.input_device), logits_to_keep=1, use_cache=False,
            )
        logits.append(out.logits[:, -1].float().cpu())
        for kind in kept:
            kept[kind].append(torch.stack([store[Site(kind, layer)][:, -capture_last:].float().cpu() for layer in range(adapter.n_layers)], dim=1))
    return torch.cat(logits), {kind: torch.cat(parts) for kind, parts in kept.items()}
