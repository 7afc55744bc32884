"""Components as ablation sees them: an attention head, an attention block or an MLP at one layer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from refusal_lab.errors import ConfigError

KINDS = ("head", "attn", "mlp")
SITE_OF = {"head": "head_z", "attn": "attn_out", "mlp": "mlp_out"}


@dataclass(frozen=True)
class Component:
    kind: str
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "head") != (self.head is not None):
            raise ConfigError(f"a component is a head (with its index), an attn or an mlp block, not {self}")

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"L{self.layer} {self.kind}"


def from_ranked(rows: Sequence[dict[str, Any]], kinds: Sequence[str], k: int) -> list[Component]:
    """The first ``k`` components of a patching run's ranked list (largest effect first) of the ``kinds`` given."""
    chosen = [Component(r["kind"], int(r["layer"]), r.get("head")) for r in rows if r["kind"] in kinds]
    return chosen[:k]


def random_like(components: Sequence[Component], layers: Sequence[int], n_heads: int, rng: random.Random,
                exclude: Sequence[Component] = ()) -> list[Component]:
    """As many random components of each kind as ``components`` has, in ``layers``, none of them in ``exclude`` (the control)."""
    out: list[Component] = []
    banned = set(exclude)
    for kind in KINDS:
        wanted = sum(c.kind == kind for c in components)
        pool = [Component(kind, layer, head) for layer in layers for head in (range(n_heads) if kind == "head" else [None])]
        pool = [c for c in pool if c not in banned]
        if wanted > len(pool):
            raise ConfigError(f"asked for {wanted} random {kind} components but only {len(pool)} are left")
        out += rng.sample(pool, wanted)
    return out
