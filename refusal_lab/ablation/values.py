"""What an ablated component's output becomes, and the hooks that write it.

    zero      its output is zero
    mean      its mean output over reference (harmless) prompts
    resample  its output on one reference prompt drawn at random (seeded), averaged over that prompt's
              positions (all positions) or taken at the aligned post-instruction positions

``positions``: ``all`` replaces the output at every position of the prompt and at every generated
token; ``post_instruction`` replaces it at the chat template's tokens after the user's message only
(the prompt's last ``n_post`` positions, where every prompt has the same tokens), leaving what was
asked intact.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from refusal_lab.ablation.components import SITE_OF, Component
from refusal_lab.errors import ConfigError
from refusal_lab.interventions import Site, SiteFn, capture
from refusal_lab.interventions.operations import combine, replace
from refusal_lab.models import LoadedModel

MODES = ("zero", "mean", "resample")
POSITIONS = ("all", "post_instruction")


@torch.inference_mode()
def reference_activations(loaded: LoadedModel, texts: Sequence[str]) -> dict[Site, list[torch.Tensor]]:
    """Per site (every layer's attention, MLP and head outputs), each reference prompt's activations
    [positions, width], one prompt at a time (no padding to mask)."""
    adapter = loaded.adapter
    sites = [Site(kind, layer) for kind in SITE_OF.values() for layer in range(adapter.n_layers)]
    out: dict[Site, list[torch.Tensor]] = {site: [] for site in sites}
    for text in texts:
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(adapter.input_device)
        store: dict[Site, torch.Tensor] = {}
        with capture(adapter, sites, store):
            loaded.model(input_ids=ids, logits_to_keep=1)
        for site in sites:
            out[site].append(store[site][0].float().cpu())
    return out


def ablation_hooks(components: Sequence[Component], mode: str, positions: str, n_post: int, d_head: int,
                   reference: dict[Site, list[torch.Tensor]] | None, seed: int) -> dict[Site, SiteFn]:
    """Hooks that ablate every component in ``components`` at once."""
    if mode not in MODES or positions not in POSITIONS:
        raise ConfigError(f"ablation mode {mode!r} / positions {positions!r}: use one of {MODES} / {POSITIONS}")
    last = n_post if positions == "post_instruction" else None
    rng = random.Random(seed)
    hooks = []
    for component in components:
        site = Site(SITE_OF[component.kind], component.layer)
        columns = slice(component.head * d_head, (component.head + 1) * d_head) if component.head is not None else None
        values = _values(mode, reference[site] if reference else None, last, rng)
        if columns is not None and values.numel() > 1:
            values = values[..., columns]
        hooks.append({site: replace(values if mode != "zero" else torch.zeros(()), last, columns)})
    return combine(*hooks)


def _values(mode: str, prompts: list[torch.Tensor] | None, last: int | None, rng: random.Random) -> torch.Tensor:
    """[width] (every position gets it) or [last, width] (aligned from the end)."""
    if mode == "zero":
        return torch.zeros(())
    assert prompts is not None, "mean and resample ablation need reference activations"
    if mode == "resample":
        prompts = [rng.choice(prompts)]
    if last is None:
        return torch.cat(prompts).mean(dim=0)
    return torch.stack([p[-last:] for p in prompts]).mean(dim=0)
