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
        "experiment.max_new_tokens=4", "experiment.ranking.max_pairs=1", "experiment.ranking.sweeps=[mlp_post,mlp]",
        "experiment.ranking.min_gap=0.1", "experiment.bootstrap.resamples=50", "experiment.side_limit=2",
    ]
    document = run(compose_config(overrides, tmp_path / "first"))
    results = json.loads(Path(document["results_path"]).read_text())
    details = results["details"]
    assert details["ranking"]["from"].startswith("exact patching of the val split")
    assert details["positions"] == "post_instruction" and details["ranking"]["at"] == "post_instruction", "the default: where the decision is read"
    assert all(r["at"] == "post_instruction" for r in details["ranking"]["top"])
    bound = details["damage"]["max_kl"]
    assert all(p["broken"] == (p["condition"] != "none" and p["harmless_kl"]["mean"] > bound) for p in details["curve"])
    assert [m["k"] for m in details["matched_damage"]] == [1, 2] and "necessary" in details["necessity"]
    assert results["metrics"]["ablation/necessary"] == float(details["necessity"]["necessary"])
    assert [(p["k"], p["condition"]) for p in details["curve"][:5]] == [(0, "none"), (1, "top"), (1, "random"), (2, "top"), (2, "random")]
    for grown in details["curve"][5:]:  # a top arm more damaging than its control gets a larger one, of the same kinds
        assert grown["condition"] == "matched" and grown["k"] == grown["scale"] * grown["for_k"] and grown["scale"] in (2, 4, 8)
        top = next(p for p in details["curve"] if p["condition"] == "top" and p["k"] == grown["for_k"])
        assert not set(grown["components"]) & set(top["components"])
    top2 = details["curve"][3]
    assert top2["components"] == [r["component"] for r in details["ranking"]["top"][:2]]
    assert not set(top2["components"]) & set(details["curve"][4]["components"]), "the control avoids the top components"
    assert all(point["refusal_rate"]["n"] == 3 for point in details["curve"])
    assert results["metrics"]["ablation/k2/top/refusal_rate"] == top2["refusal_rate"]["mean"]
    ranking_file = tmp_path / "first" / "results" / "ablation_ranking.json"
    assert ranking_file.is_file() and (tmp_path / "first" / "results" / "ablation_dashboard.html").is_file()
    rows = [json.loads(line) for line in (tmp_path / "first" / "results" / "ablation_completions.jsonl").read_text().splitlines()]
    arms = len(details["curve"])
    assert len([r for r in rows if "set" not in r]) == arms * 3 and len([r for r in rows if r.get("set") == "overrefusal"]) == arms * 2
    assert all(p["side_sets"]["overrefusal"]["n"] == 2 for p in details["curve"]), "every arm's over-refusal rate beside its harmful refusal"
    assert "ablation/k1/top/overrefusal_refusal" in results["metrics"] and "ablation/k0/overrefusal_refusal" in results["metrics"]

    again = run(compose_config([*overrides, f"experiment.components_from={ranking_file}", "experiment.ks=[1]", "experiment.random_draws=0", "experiment.mode=zero"], tmp_path / "second"))
    second = json.loads(Path(again["results_path"]).read_text())["details"]
    assert second["ranking"]["from"] == str(ranking_file) and second["curve"][1]["components"] == top2["components"][:1]

    # In a band of two layers the two MLPs are the whole pool: k=2 has no random control of its kind and is
    # skipped with the reason, k=1 is measured against the other MLP of the band.
    band = run(compose_config([*overrides, f"experiment.components_from={ranking_file}", "experiment.layers=[28,30]", "experiment.kinds=[mlp]",
                               "experiment.mode=zero", "experiment.positions=all"], tmp_path / "band"))
    third = json.loads(Path(band["results_path"]).read_text())["details"]
    assert [(p["k"], p["condition"]) for p in third["curve"]] == [(0, "none"), (1, "top"), (1, "random")]
    assert "2" in third["ranking"]["skipped_ks"] and third["ranking"]["layers"] == [28, 30]
    assert {third["curve"][1]["components"][0], third["curve"][2]["components"][0]} == {"L28 mlp", "L29 mlp"}


def test_broken_arms_are_never_evidence_and_arms_are_compared_at_matched_damage() -> None:
    from refusal_lab.ablation.necessity import BROKEN, Arm, matched_damage, verdict

    none = Arm(0, "none", 0.9, 0.0)
    arms = [none, Arm(1, "top", 0.5, 0.05), Arm(1, "random", 0.88, 0.02), Arm(4, "top", 0.1, 0.3), Arm(4, "random", 0.85, 0.4),
            Arm(16, "top", 0.0, 5.0), Arm(16, "random", 0.6, 2.0)]
    matched = {m["k"]: m for m in matched_damage(arms, max_damage_kl=1.0)}
    assert matched[16]["gap"] is None and matched[16]["note"] == BROKEN, "refusal 0 % at KL 5 nats says nothing"
    # k=4: KL 0.3 lies between the random arms at 0.02 (88 %) and 0.4 (85 %): interpolated 85.8 %, gap 75.8 points.
    assert matched[4]["random_refusal"] == pytest.approx(0.88 + (0.3 - 0.02) / (0.4 - 0.02) * (0.85 - 0.88))
    assert matched[4]["gap"] == pytest.approx(matched[4]["random_refusal"] - 0.1, abs=1e-5)
    assert verdict(list(matched.values()), min_gap=0.4, max_k=16) | {} == {
        "necessary": True, "best_k": 4, "best_gap": matched[4]["gap"], "min_gap": 0.4, "max_k": 16, "comparable_arms": 2}
    assert not verdict(list(matched.values()), min_gap=0.4, max_k=2)["necessary"], "only k=1 counts, and its gap is 38 points"
    # A random control that broke the model is no comparison either: beyond the unbroken random arms, nothing matches.
    lone = matched_damage([none, Arm(2, "top", 0.2, 0.5), Arm(2, "random", 0.3, 3.0)], max_damage_kl=1.0)
    assert lone[0]["gap"] is None and "no random arm" in lone[0]["note"]


def test_a_top_arm_beyond_every_control_is_compared_with_a_grown_one() -> None:
    from refusal_lab.ablation.necessity import Arm, matched_damage, needs_larger_control

    none, top = Arm(0, "none", 0.9, 0.0), Arm(4, "top", 0.1, 0.7)
    arms = [none, top, Arm(4, "random", 0.9, 0.1)]
    assert needs_larger_control(top, arms, max_damage_kl=1.0), "no control reached KL 0.7"
    assert matched_damage(arms, 1.0)[0]["gap"] is None
    assert needs_larger_control(top, [*arms, Arm(16, "matched", 0.5, 1.5)], 1.0), "a broken control matches nothing"
    grown = [*arms, Arm(8, "matched", 0.85, 0.9)]
    assert not needs_larger_control(top, grown, 1.0)
    # KL 0.7 lies between the random arm (0.1: 90 %) and the grown one (0.9: 85 %): 86.25 %, a gap of 76 points.
    assert matched_damage(grown, 1.0)[0]["random_refusal"] == pytest.approx(0.9 + (0.6 / 0.8) * (0.85 - 0.9))
    assert not needs_larger_control(Arm(4, "top", 0.0, 2.0), arms, 1.0), "a broken top arm is not compared at all"


def test_a_ranking_tells_content_carriers_from_decision_components(tmp_path: Path) -> None:
    from refusal_lab.findings import Ranking

    rows = [
        {"component": "L0 mlp", "kind": "mlp", "at": "span", "layer": 0, "head": None, "effect": 0.9, "ci": [0.8, 1.0]},
        {"component": "L20 attn", "kind": "attn", "at": "span", "layer": 20, "head": None, "effect": 0.5, "ci": [0.4, 0.6]},
        {"component": "L20 attn (post-instruction)", "kind": "attn", "at": "post_instruction", "layer": 20, "head": None, "effect": 0.45, "ci": [None, None]},
        {"component": "L0 mlp (post-instruction)", "kind": "mlp", "at": "post_instruction", "layer": 0, "head": None, "effect": 0.01, "ci": [0.0, 0.02]},
        {"component": "L5 resid", "kind": "resid", "layer": 5, "head": None, "effect": 2.0, "ci": [1.0, 3.0]},
    ]
    ranking = Ranking.from_rows(rows, "harmless_to_harmful", "exact", "val", "m", "here")
    assert [r.component.label for r in ranking.content_carriers(min_effect=0.1, ratio=2.0)] == ["L0 mlp"]
    assert [r.component.label for r in ranking.ranked(["attn", "mlp"], "post_instruction")] == ["L20 attn", "L0 mlp"]
    assert [r.component.label for r in ranking.ranked(["attn", "mlp"], "span", layers=range(10, 30))] == ["L20 attn"]
    path = tmp_path / "patching.json"
    path.write_text(json.dumps({"model": {"name": "m"}, "details": {"method": "exact", "split": "val", "ranked": {"harmless_to_harmful": rows}}}))
    assert Ranking.from_results_file(path, "harmless_to_harmful") == ranking.__class__(*[getattr(ranking, f) for f in ("direction", "method", "split", "model", "components")], str(path))
    with pytest.raises(ConfigError, match="not harmful_to_harmless"):
        Ranking.from_results_file(path, "harmful_to_harmless")
    path.write_text(json.dumps({"details": {"selection": {}}}))
    with pytest.raises(ConfigError, match="holds no ranking"):
        Ranking.from_results_file(path, "harmless_to_harmful")


def test_controls_grow_until_they_hurt_the_model_as_much_as_the_top_arm() -> None:
    """A stand-in measurement whose damage grows with the number of components ablated: the top arm (k=2, KL 0.9)
    outdoes the random pair (KL 0.2); random sets of 4 (0.4) and 8 (0.8) fall short, 16 (1.6) breaks the model
    and growth stops there; a top arm no control has to catch up with grows none."""
    from types import SimpleNamespace

    from refusal_lab.experiments.ablation import grown_controls, summarize_curve

    def point(k: int, condition: str, refusal: float, kl: float, **extra: object) -> dict:
        return {"k": k, "condition": condition, "refusal_rate": {"mean": refusal}, "refusal_score": {"mean": 0.0}, "harmless_kl": {"mean": kl}, **extra}

    measured: list[int] = []

    def measure(components: list, _label: str) -> dict:
        measured.append(len(components))
        return {"refusal_rate": {"mean": 0.9}, "refusal_score": {"mean": 0.0}, "harmless_kl": {"mean": 0.1 * len(components)}}

    ranked = [Component("head", 3, 1), Component("mlp", 5), Component("head", 7, 0)]
    settings = SimpleNamespace(max_damage_kl=1.0, matched_controls=SimpleNamespace(max_scale=8))
    context = SimpleNamespace(settings=settings, model=SimpleNamespace(adapter=SimpleNamespace(n_heads=4)))
    curve = [point(0, "none", 0.9, 0.0), point(1, "top", 0.8, 0.05), point(1, "random", 0.9, 0.1),
             point(2, "top", 0.3, 0.9), point(2, "random", 0.9, 0.2)]
    grown = grown_controls(context, curve, ranked, list(range(30)), measure, random.Random(0))
    assert measured == [4, 8, 16] and [(g["for_k"], g["scale"]) for g in grown] == [(2, 2), (2, 4), (2, 8)]
    kinds = lambda labels: sorted(label.split()[1] if " " in label else "head" for label in labels)  # noqa: E731  (L3H1, L5 mlp)
    assert all(kinds(g["components"]) == ["head"] * g["scale"] + ["mlp"] * g["scale"] for g in grown), "of the top arm's kinds"
    assert not {"L3H1", "L5 mlp"} & {c for g in grown for c in g["components"]}
    assert [s["k"] for s in summarize_curve(curve + grown, 1.0)] == [1, 2], "grown controls are not arms of their own k"
