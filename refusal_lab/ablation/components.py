"""Components as ablation sees them: an attention head, an attention block or an MLP at one layer."""

from __future__ import annotations

import random
from collections.abc import Sequence

from refusal_lab.errors import ConfigError
from refusal_lab.findings import KINDS, Component

SITE_OF = {"head": "head_z", "attn": "attn_out", "mlp": "mlp_out"}


def random_like(components: Sequence[Component], layers: Sequence[int], n_heads: int, rng: random.Random,
                exclude: Sequence[Component] = (), scale: int = 1) -> list[Component]:
    """``scale`` times as many random components of each kind as ``components`` has, in ``layers``, none of them in
    ``exclude`` (the control; a larger scale grows it until it hurts the model as much as the top components)."""
    out: list[Component] = []
    banned = set(exclude)
    for kind in KINDS:
        wanted = scale * sum(c.kind == kind for c in components)
        pool = [Component(kind, layer, head) for layer in layers for head in (range(n_heads) if kind == "head" else [None])]
        pool = [c for c in pool if c not in banned]
        if wanted > len(pool):
            raise ConfigError(f"asked for {wanted} random {kind} components but only {len(pool)} are left")
        out += rng.sample(pool, wanted)
    return out
