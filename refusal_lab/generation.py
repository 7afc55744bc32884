"""Batched greedy generation that also hands back the first response position's logits.

The refusal score is read from the same forward pass that produces the first generated token,
so a baseline costs no extra pass. Prompts are sorted by length so batches waste little padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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
) -> list[Generation]:
    """Greedy completions of chat-formatted ``texts``, in the order given."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be at least 1")
    tokenizer = loaded.tokenizer
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    results: list[Generation | None] = [None] * len(texts)
    device = loaded.adapter.input_device
    eos = set(_as_list(loaded.model.generation_config.eos_token_id))
    with tqdm(total=len(texts), desc=description, unit="prompt") as bar:
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
