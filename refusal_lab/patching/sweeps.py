"""Which variants a sweep patches, and how a pair's positions line up.

Pairs rarely have the same token length, so positions are counted from the end. The chat
template's tokens after the user's message (the post-instruction tokens) are the same in every
prompt; before them, a pair's two prompts line up from the end until their common token prefix
(system prompt, user header), whose activations are the same in both runs and would patch nothing.
The *span* is what lies between: the positions "all positions" means for a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from refusal_lab.errors import ConfigError
from refusal_lab.patching.engine import Variant
from refusal_lab.prompts import format_chat

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


@dataclass(frozen=True)
class Sweep:
    """One kind of component patched over a range of layers, and everything that follows from it.

    ``kind``: the site each variant patches. ``per_head``: one variant per head. ``positions``: the
    setting (``experiment.<positions>``) that gives how many positions from the end get one variant
    each; None patches the whole span at once, or with ``post_instruction`` only the template's tokens
    after the user's message, where the decision is read and every prompt has the same tokens: a
    component whose effect there is small beside its effect over the span carries what was asked,
    not how the model decides. ``ranked``: listed among the top components, as a ``component`` kind.
    ``figure``: how the dashboard draws it (a name in ``viz/dashboard.py``'s figure table).
    Adding a sweep is adding one entry to ``SWEEPS``.
    """

    name: str
    description: str
    kind: str
    per_head: bool = False
    positions: str | None = None
    ranked: bool = False
    figure: str = "blocks"
    title: str = ""
    post_instruction: bool = False
    component: str | None = None  # the ablation component it patches (head, attn, mlp), for ranked sweeps

    @property
    def at(self) -> str:
        """Where a ranked sweep's component is patched: over the pair's span, or at the post-instruction positions."""
        return "post_instruction" if self.post_instruction else "span"

    def shape(self, n_layers: int, n_heads: int, positions: int) -> tuple[int, ...]:
        """The shape of one pair's result: layers, then heads, then positions where the sweep has them."""
        return (n_layers, *((n_heads,) if self.per_head else ()), *((positions,) if self.positions else ()))

    def variants(self, layers: Sequence[int], n_heads: int, span: int, positions: int) -> list[Variant]:
        """The variants for a pair whose span (see the module docstring) is ``span``.

        Per-position sweeps stop at the span: before it the two prompts share their tokens (the
        activations are the same, the patch a no-op) or, for prompts of different lengths, the
        offsets would pair different tokens. Those cells stay unmeasured (NaN) for the pair.
        """
        if self.positions:
            offsets = [(-p,) for p in range(min(positions, span), 0, -1)]
        else:
            offsets = [tuple(range(-(min(positions, span) if self.post_instruction else span), 0))]
        heads = range(n_heads) if self.per_head else [None]
        return [Variant(self.kind, layer, where, head) for layer in layers for head in heads for where in offsets]

    def place(self, variants: Sequence[Variant], values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """One pair's values in the sweep's array; cells the pair has no variant for stay NaN."""
        out = np.full(shape, np.nan)
        for variant, value in zip(variants, values):
            out[self.cell(variant, shape)] = value
        return out

    def cell(self, variant: Variant, shape: tuple[int, ...]) -> tuple[int, ...]:
        position = (shape[-1] + variant.offsets[0],) if self.positions else ()
        return (variant.layer, *((variant.head,) if self.per_head else ()), *position)

    def label(self, index: tuple[int, ...], shape: tuple[int, ...]) -> str:
        """A component's name; positions as offsets from the end, as everywhere in the results."""
        name = f"L{index[0]}H{index[1]}" if self.per_head else f"L{index[0]}" + ("" if self.kind == "resid_pre" else f" {self.component or self.name}")
        return name + (f" position {index[-1] - shape[-1]}" if self.positions else "") + (" (post-instruction)" if self.post_instruction else "")


SWEEPS: dict[str, Sweep] = {
    sweep.name: sweep
    for sweep in (
        Sweep("resid", "the residual stream entering a layer, at one position: [layers, positions]", "resid_pre",
              positions="resid_positions", figure="layer_by_position", title="Residual stream entering each layer, per position"),
        Sweep("head", "one attention head's output over the pair's span: [layers, heads]", "head_z", per_head=True,
              ranked=True, figure="layer_by_head", title="Attention heads (output over the pair's span)", component="head"),
        Sweep("head_post", "one attention head's output at the post-instruction positions: [layers, heads]", "head_z", per_head=True,
              ranked=True, figure="layer_by_head", title="Attention heads (output at the post-instruction positions)",
              post_instruction=True, component="head"),
        Sweep("head_pos", "one attention head's output at one position: [layers, heads, positions]", "head_z", per_head=True,
              positions="head_positions", figure="head_by_position"),
        Sweep("attn", "the attention block's output over the span: [layers]", "attn_out", ranked=True, title="attention block",
              component="attn"),
        Sweep("mlp", "the MLP's output over the span: [layers]", "mlp_out", ranked=True, title="MLP", component="mlp"),
        Sweep("attn_post", "the attention block's output at the post-instruction positions: [layers]", "attn_out", ranked=True,
              title="attention block, post-instruction", post_instruction=True, component="attn"),
        Sweep("mlp_post", "the MLP's output at the post-instruction positions: [layers]", "mlp_out", ranked=True,
              title="MLP, post-instruction", post_instruction=True, component="mlp"),
    )
}


def get_sweep(name: str) -> Sweep:
    if name not in SWEEPS:
        raise ConfigError(f"unknown sweep {name!r}; known sweeps: {', '.join(SWEEPS)}")
    return SWEEPS[name]


def sweep_variants(sweep: str, layers: Sequence[int], n_heads: int, span: int, positions: int) -> list[Variant]:
    """The variants of the sweep named ``sweep`` for one pair (see ``Sweep.variants``)."""
    return get_sweep(sweep).variants(layers, n_heads, span, positions)
