"""Whether ablating the top components is evidence that they are necessary for refusal.

Two rules. An arm whose next-token KL on harmless prompts exceeds a bound broke the model: its drop
in refusal says nothing about the components (any large enough ablation stops a model refusing,
because it stops the model working). And the top components are compared with random ones at the
same damage, not only at the same count: a top arm's refusal is set beside the random arms'
refusal interpolated at its KL (piecewise linear over the random arms sorted by KL, the unablated
model at KL 0 included). A top arm whose KL lies beyond every random arm's has no comparison, so the
experiment grows random controls (twice, four times ... as many components) until one hurts the model
as much (``needs_larger_control``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BROKEN = "model broken: not evidence of necessity"


@dataclass(frozen=True)
class Arm:
    """One ablated set's two numbers (means over prompts): harmful refusal and harmless KL."""

    k: int
    condition: str  # none | top | random | matched (a random control grown to the damage of a top arm)
    refusal_rate: float
    harmless_kl: float

    @classmethod
    def of(cls, point: dict[str, Any]) -> Arm:
        """The arm of one measured point of the experiment's curve."""
        return cls(point["k"], point["condition"], point["refusal_rate"]["mean"], point["harmless_kl"]["mean"])


def broken(arm: Arm, max_damage_kl: float) -> bool:
    return arm.harmless_kl > max_damage_kl


CONTROLS = ("random", "matched")


def needs_larger_control(top: Arm, arms: Sequence[Arm], max_damage_kl: float) -> bool:
    """Whether an unbroken top arm hurts the model more than every unbroken random control: only a larger control can
    be compared with it."""
    reached = [a.harmless_kl for a in arms if a.condition in CONTROLS and not broken(a, max_damage_kl)]
    return not broken(top, max_damage_kl) and top.harmless_kl > max(reached, default=0.0)


def random_refusal_at(kl: float, none: Arm, randoms: Sequence[Arm], max_damage_kl: float) -> float | None:
    """The random arms' harmful refusal at harmless KL ``kl``, interpolated over the unbroken random arms (and the
    unablated model at KL 0); None where no random arm reached that damage."""
    points = sorted([(none.harmless_kl, none.refusal_rate)] + [(a.harmless_kl, a.refusal_rate) for a in randoms if not broken(a, max_damage_kl)])
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    if kl > xs.max():
        return None
    return float(np.interp(kl, xs, ys))


def matched_damage(arms: Sequence[Arm], max_damage_kl: float) -> list[dict[str, Any]]:
    """Per top arm: its refusal, the random arms' refusal at its damage, and the gap (random minus top: how much more
    the top components lower refusal than random ones that hurt the model as much)."""
    none = next(a for a in arms if a.condition == "none")
    randoms = [a for a in arms if a.condition in CONTROLS]
    out = []
    for arm in (a for a in arms if a.condition == "top"):
        if broken(arm, max_damage_kl):
            out.append({"k": arm.k, "top_refusal": arm.refusal_rate, "harmless_kl": arm.harmless_kl, "random_refusal": None,
                        "gap": None, "note": BROKEN})
            continue
        matched = random_refusal_at(arm.harmless_kl, none, randoms, max_damage_kl)
        out.append({"k": arm.k, "top_refusal": arm.refusal_rate, "harmless_kl": arm.harmless_kl, "random_refusal": matched,
                    "gap": None if matched is None else round(matched - arm.refusal_rate, 5),
                    "note": "no random arm reached this damage" if matched is None else ""})
    return out


def verdict(matched: Sequence[dict[str, Any]], min_gap: float, max_k: int) -> dict[str, Any]:
    """Whether some unbroken top arm of at most ``max_k`` components lowers refusal by ``min_gap`` more than random
    components at comparable damage; the best gap either way, so a reader sees how far it fell short."""
    usable = [m for m in matched if m["gap"] is not None and m["k"] <= max_k]
    best = max(usable, key=lambda m: m["gap"], default=None)
    return {
        "necessary": bool(best is not None and best["gap"] >= min_gap),
        "best_k": None if best is None else best["k"], "best_gap": None if best is None else best["gap"],
        "min_gap": min_gap, "max_k": max_k, "comparable_arms": len(usable),
    }
