"""Which variants a sweep patches, and how a pair's positions line up.

Pairs rarely have the same token length, so positions are counted from the end. The chat
template's tokens after the user's message (the post-instruction tokens) are the same in every
prompt; before them, a pair's two prompts line up from the end until their common token prefix
(system prompt, user header), whose activations are the same in both runs and would patch nothing.
The *span* is what lies between: the positions "all positions" means for a pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from refusal_lab.errors import ConfigError
from refusal_lab.patching.engine import Variant
from refusal_lab.prompts import format_chat

# name -> what each variant patches; the shape of its result per pair.
SWEEPS = {
    "resid": "the residual stream entering a layer, at one position: [layers, positions]",
    "head": "one attention head's output over the pair's span: [layers, heads]",
    "head_pos": "one attention head's output at one position: [layers, heads, positions]",
    "attn": "the attention block's output over the span: [layers]",
    "mlp": "the MLP's output over the span: [layers]",
}


def post_instruction_tokens(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> int:
    """How many template tokens follow the user's message (SmolLM2: ``<|im_end|>``, newline, ``<|im_start|>``, ``ass``, ``istant``, newline)."""
    counts = set()
    for probe in ("Tell me a story about a dog.", "What is 2 + 2?"):
        text = format_chat(tokenizer, probe, system_prompt)
        end = text.rindex(probe) + len(probe)
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
        counts.add(len(whole) - len(head))
    if len(counts) != 1 or min(counts) < 1:
        raise ConfigError(f"the chat template's post-instruction tokens could not be counted (got {sorted(counts)})")
    return counts.pop()


def shared_span(a: torch.Tensor, b: torch.Tensor, post_instruction: int) -> int:
    """Positions from the end that both prompts have after their common prefix (at least the post-instruction ones)."""
    a_ids, b_ids = a.flatten().tolist(), b.flatten().tolist()
    common = 0
    for x, y in zip(a_ids, b_ids):
        if x != y:
            break
        common += 1
    return max(post_instruction, min(len(a_ids), len(b_ids)) - common)


def sweep_variants(sweep: str, layers: Sequence[int], n_heads: int, span: int, positions: int) -> list[Variant]:
    """The variants of one sweep for a pair; ``positions`` is how many per-position offsets it covers.

    Per-position sweeps stop at the pair's span: before it the two prompts share their tokens (the
    activations are the same, the patch a no-op) or, for prompts of different lengths, the offsets
    would pair different tokens. Those cells stay unmeasured (NaN) for the pair.
    """
    whole = tuple(range(-span, 0))
    positions = min(positions, span)
    if sweep == "resid":
        return [Variant("resid_pre", layer, (-p,)) for layer in layers for p in range(positions, 0, -1)]
    if sweep == "head":
        return [Variant("head_z", layer, whole, head) for layer in layers for head in range(n_heads)]
    if sweep == "head_pos":
        return [
            Variant("head_z", layer, (-p,), head) for layer in layers for head in range(n_heads) for p in range(positions, 0, -1)
        ]
    if sweep == "attn":
        return [Variant("attn_out", layer, whole) for layer in layers]
    if sweep == "mlp":
        return [Variant("mlp_out", layer, whole) for layer in layers]
    raise ConfigError(f"unknown sweep {sweep!r}; known sweeps: {', '.join(SWEEPS)}")


def sweep_shape(sweep: str, n_layers: int, n_heads: int, positions: int) -> tuple[int, ...]:
    return {
        "resid": (n_layers, positions),
        "head": (n_layers, n_heads),
        "head_pos": (n_layers, n_heads, positions),
        "attn": (n_layers,),
        "mlp": (n_layers,),
    }[sweep]
