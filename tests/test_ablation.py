"""Component ablation: the hooks write what each mode says, and the experiment end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from refusal_lab.ablation import Component, ablation_hooks, random_like
from refusal_lab.errors import ConfigError
from refusal_lab.interventions import Site, capture, intervene
from refusal_lab.models.adapters import adapter_for
from tests.helpers import compose_config
from tests.test_adapters import FAMILIES

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 8]])


def _own_activations(model, adapter, components):
    sites = [Site({"head": "head_z", "attn": "attn_out", "mlp": "mlp_out"}[c.kind], c.layer) for c in components]
    store: dict = {}
    with torch.no_grad(), capture(adapter, sites, store):
        logits = model(input_ids=IDS).logits
    return logits, {site: [store[site][0].clone()] for site in sites}


def test_resampling_a_prompts_own_activations_changes_nothing_and_zero_ablation_changes_only_its_slice() -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    components = [Component("head", 1, 2), Component("attn", 0), Component("mlp", 1)]
    plain, own = _own_activations(model, adapter, components)
    # Resampled from a reference set holding only this prompt, at its own aligned positions: nothing changes.
    hooks = ablation_hooks(components, "resample", "post_instruction", 3, adapter.d_head, own, seed=0)
    with torch.no_grad(), intervene(adapter, hooks):
        same = model(input_ids=IDS).logits
    assert torch.allclose(same, plain, atol=1e-6)
    site = Site("head_z", 1)
    store: dict = {}
    with torch.no_grad(), intervene(adapter, ablation_hooks([Component("head", 1, 2)], "zero", "all", 3, adapter.d_head, None, 0)), \
            capture(adapter, [site], store):
        model(input_ids=IDS)
    heads = store[site][0].view(IDS.shape[1], adapter.n_heads, adapter.d_head)
    assert heads[:, 2].abs().max() == 0 and heads[:, [0, 1, 3]].abs().min() > 0
    with torch.no_grad(), intervene(adapter, ablation_hooks([Component("mlp", 1)], "zero", "post_instruction", 3, adapter.d_head, None, 0)):
        changed = model(input_ids=IDS).logits
    assert torch.allclose(changed[0, :-3], plain[0, :-3], atol=1e-6), "positions before the post-instruction ones are untouched"
    assert (changed[0, -3:] - plain[0, -3:]).abs().max() > 1e-4


def test_random_control_matches_the_kinds_and_avoids_the_top_components() -> None:
    top = [Component("head", 3, 1), Component("mlp", 0), Component("head", 5, 0)]
    for seed in range(20):
        control = random_like(top, layers=range(6), n_heads=4, rng=random.Random(seed), exclude=top)
        assert sorted(c.kind for c in control) == ["head", "head", "mlp"] and not set(control) & set(top)
    with pytest.raises(ConfigError, match="only 1 are left"):
        random_like([Component("mlp", 0), Component("mlp", 1)], layers=range(2), n_heads=4, rng=random.Random(0), exclude=[Component("mlp", 0)])


def test_ablation_experiment_ranks_ablates_and_controls(embedded_model_dir: Path, tmp_path: Path) -> None:
    """A small run on the shipped organism: patch the val split to rank, ablate the top k and random k on test."""
    from refusal_lab.runner import run

    overrides = [
        "experiment=ablation", "logger=none", "experiment.limit_per_label=3", "experiment.ks=[1,2]", "experiment.random_draws=1",
        "experiment.max_new_tokens=4", "experiment.ranking.max_pairs=1", "experiment.ranking.sweeps=[mlp]",
        "experiment.ranking.min_gap=0.1", "experiment.bootstrap.resamples=50", "experiment.positions=post_instruction",
    ]
    document = run(compose_config(overrides, tmp_path / "first"))
    results = json.loads(Path(document["results_path"]).read_text())
    details = results["details"]
    assert details["ranking"]["from"].startswith("exact patching of the val split")
    assert [(p["k"], p["condition"]) for p in details["curve"]] == [(0, "none"), (1, "top"), (1, "random"), (2, "top"), (2, "random")]
    top2 = details["curve"][3]
    assert top2["components"] == [r["component"] for r in details["ranking"]["top"][:2]]
    assert not set(top2["components"]) & set(details["curve"][4]["components"]), "the control avoids the top components"
    assert all(point["refusal_rate"]["n"] == 3 for point in details["curve"])
    assert results["metrics"]["ablation/k2/top/refusal_rate"] == top2["refusal_rate"]["mean"]
    ranking_file = tmp_path / "first" / "results" / "ablation_ranking.json"
    assert ranking_file.is_file() and (tmp_path / "first" / "results" / "ablation_dashboard.html").is_file()
    rows = (tmp_path / "first" / "results" / "ablation_completions.jsonl").read_text().splitlines()
    assert len(rows) == 5 * 3

    again = run(compose_config([*overrides, f"experiment.components_from={ranking_file}", "experiment.ks=[1]", "experiment.random_draws=0", "experiment.mode=zero"], tmp_path / "second"))
    second = json.loads(Path(again["results_path"]).read_text())["details"]
    assert second["ranking"]["from"] == str(ranking_file) and second["curve"][1]["components"] == top2["components"][:1]

    # In a band of two layers the two MLPs are the whole pool: k=2 has no random control of its kind and is
    # skipped with the reason, k=1 is measured against the other MLP of the band.
    band = run(compose_config([*overrides, f"experiment.components_from={ranking_file}", "experiment.layers=[28,30]", "experiment.kinds=[mlp]",
                               "experiment.mode=zero"], tmp_path / "band"))
    third = json.loads(Path(band["results_path"]).read_text())["details"]
    assert [(p["k"], p["condition"]) for p in third["curve"]] == [(0, "none"), (1, "top"), (1, "random")]
    assert "2" in third["ranking"]["skipped_ks"] and third["ranking"]["layers"] == [28, 30]
    assert {third["curve"][1]["components"][0], third["curve"][2]["components"][0]} == {"L28 mlp", "L29 mlp"}
