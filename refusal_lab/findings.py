"""What one stage finds and a later stage takes: a ranking of components, a refusal direction.

Typed values, so that ablation reads a ``Ranking`` (from this run's patching stage or from a results
file) instead of another stage's results dict, and the optimised ablation places the paper's single
``Direction`` beside its own. A leaf: it imports nothing from the package but its error type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refusal_lab.errors import ConfigError

KINDS = ("head", "attn", "mlp")


@dataclass(frozen=True)
class Component:
    """An attention head, an attention block or an MLP at one layer."""

    kind: str
    layer: int
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS or (self.kind == "head") != (self.head is not None):
            raise ConfigError(f"a component is a head (with its index), an attn or an mlp block, not {self}")

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head}" if self.kind == "head" else f"L{self.layer} {self.kind}"


SPAN, POST_INSTRUCTION = "span", "post_instruction"  # where a component was patched: the pair's differing tokens and the
# template's tail, or the template's tail alone (where the decision is read)


@dataclass(frozen=True)
class RankedComponent:
    component: Component
    effect: float  # mean normalised patching effect over pairs
    ci: tuple[float | None, float | None]  # its bootstrap interval (None: too few pairs)
    at: str = SPAN


@dataclass(frozen=True)
class Ranking:
    """Components by patching effect in one direction, largest first: what patching hands to ablation."""

    direction: str  # harmless_to_harmful: the effect that removes refusal
    method: str  # exact (activation patching) or attribution (its gradient estimate)
    split: str | None  # the prompt split the pairs came from
    model: str
    components: tuple[RankedComponent, ...]
    where: str  # for the log and the results file: which run measured it

    def ranked(self, kinds: Any, at: str, layers: Any = None, exclude: Any = ()) -> list[RankedComponent]:
        """The components of the ``kinds`` given patched ``at`` (in ``layers`` when given, none of ``exclude``), largest effect first."""
        band, banned = None if layers is None else set(layers), set(exclude)
        return [r for r in self.components if r.component.kind in kinds and r.at == at and r.component not in banned
                and (band is None or r.component.layer in band)]

    def content_carriers(self, min_effect: float, ratio: float) -> list[RankedComponent]:
        """Components whose effect over the pair's span is at least ``min_effect`` and ``ratio`` times their effect at the
        post-instruction positions: patching them swaps what was asked (the request's content), not how the model
        decides. Only components patched both ways can be told apart."""
        post = {r.component: r.effect for r in self.components if r.at == POST_INSTRUCTION}
        return [r for r in self.components if r.at == SPAN and r.component in post
                and r.effect >= min_effect and r.effect >= ratio * max(post[r.component], 0.0)]

    def rows(self, ranked: list[RankedComponent] | None = None) -> list[dict[str, Any]]:
        """As the patching results file lists them."""
        return [{"component": r.component.label, "kind": r.component.kind, "at": r.at, "layer": r.component.layer,
                 "head": r.component.head, "effect": r.effect, "ci": list(r.ci)} for r in (self.components if ranked is None else ranked)]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], direction: str, method: str, split: str | None, model: str, where: str) -> "Ranking":
        components = tuple(
            RankedComponent(Component(str(r["kind"]), int(r["layer"]), None if r.get("head") is None else int(r["head"])),
                            float(r["effect"]), (r["ci"][0], r["ci"][1]), str(r.get("at", SPAN)))
            for r in rows if r["kind"] in KINDS
        )
        return cls(direction, method, split, model, components, where)

    @classmethod
    def from_results_file(cls, path: Path, direction: str) -> "Ranking":
        """The ranking a patching run wrote (``results/patching.json``, or ablation's own ``ablation_ranking.json``)."""
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        ranked = document.get("details", {}).get("ranked")
        if ranked is None:
            raise ConfigError(f"{path} holds no ranking of components; give a patching results file (results/patching.json)")
        if direction not in ranked:
            raise ConfigError(f"{path} ranks the directions {sorted(ranked)}, not {direction}")
        details = document["details"]
        return cls.from_rows(ranked[direction], direction, str(details.get("method", "exact")), details.get("split"),
                             str(document.get("model", {}).get("name")), str(path))


@dataclass(frozen=True)
class Direction:
    """The refusal direction the paper's method chose: what ablating one direction looks like, and where."""

    vector: torch.Tensor  # [d_model], the difference of means, unnormalised
    layer: int
    position: int  # from the end of the prompt (-1: the last token)
    model: str
    split: str  # where it was chosen
    bypass: float  # mean refusal score of the harmful selection prompts with it ablated
    induce: float  # ... of the harmless ones with it added
    kl: float  # next-token KL on harmless selection prompts with it ablated
