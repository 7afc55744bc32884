"""Optimised directional ablation: the parametrisation, its weight edit against its hooks, the Pareto front, and a
small search on the shipped organism that resumes, chooses, measures and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lab.direction.weighted import Kernel, WeightedAblation, direction_at, edit_weights, layer_directions, pareto_front, weighted_hooks
from refusal_lab.interventions import intervene
from refusal_lab.models.adapters import adapter_for
from tests.helpers import compose_config
from tests.test_adapters import FAMILIES

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 8]])


def test_a_kernel_peaks_falls_to_its_floor_and_stops_at_its_width() -> None:
    weights = Kernel(peak=1.2, position=4.0, floor=0.2, width=2.0).weights(8)
    assert weights.tolist() == pytest.approx([0.0, 0.0, 0.2, 0.7, 1.2, 0.7, 0.2, 0.0])
    assert Kernel(peak=1.0, position=3.5, floor=1.0, width=0.5).weights(6).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0], "between layers"


def test_directions_interpolate_between_layers_and_can_leave_the_harmless_mean() -> None:
    g = torch.Generator().manual_seed(0)
    harmful, harmless = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    plain, projected = layer_directions(harmful, harmless, False), layer_directions(harmful, harmless, True)
    assert torch.allclose(plain.norm(dim=-1), torch.ones(4)) and torch.allclose(plain[1], (harmful[1] - harmless[1]) / (harmful[1] - harmless[1]).norm())
    assert (projected * harmless / harmless.norm(dim=-1, keepdim=True)).sum(-1).abs().max() < 1e-5, "orthogonal to the harmless mean"
    assert torch.allclose(direction_at(plain, 2.0), plain[2]) and torch.allclose(direction_at(plain, 9.0), plain[3])
    halfway = direction_at(plain, 1.5)
    assert torch.allclose(halfway, (plain[1] + plain[2]) / (plain[1] + plain[2]).norm(), atol=1e-6)


def test_the_pareto_front_keeps_the_points_nothing_beats() -> None:
    points = [(0.5, 0.1), (0.2, 0.3), (0.6, 0.05), (0.5, 0.2), (0.2, 0.4), (0.0, 1.0)]
    assert pareto_front(points) == [5, 1, 0, 2]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_weight_edit_computes_what_the_weighted_hooks_compute(family: str, tmp_path: Path) -> None:
    """On a tiny random model of each family: exact where blocks write straight into the residual stream."""
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(3)
    directions = layer_directions(torch.randn(adapter.n_layers, adapter.d_model, generator=g), torch.randn(adapter.n_layers, adapter.d_model, generator=g), True)
    last = adapter.n_layers - 1.0
    params = WeightedAblation(0.6 * last, {"attn_out": Kernel(1.3, 0.3 * last, 0.4, last), "mlp_out": Kernel(0.9, last, 0.1, 0.5 * last + 1)})
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        with intervene(adapter, weighted_hooks(params, directions, adapter.n_layers)):
            hooked = model(input_ids=IDS).logits
    edited = edit_weights(adapter, params, directions)
    assert edited and all(name.split(".")[0] in ("attn_out", "mlp_out") for name in edited)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(input_ids=IDS).logits
    assert (plain - hooked).abs().max() > 1e-3, "the ablation must change something for the comparison to mean anything"
    if not adapter.writes_through_norm:
        assert (exported - hooked).abs().max() < 1e-5
    else:
        assert (exported - hooked).abs().max() > 1e-5, "through a norm the edit only approximates the hooks"


def test_abliteration_searches_resumes_chooses_measures_and_exports(embedded_model_dir: Path, tmp_path: Path) -> None:
    from refusal_lab.runner import run

    overrides = ["experiment=abliteration", "logger=none", "experiment.limit_per_label=4", "experiment.n_trials=4", "experiment.startup_trials=2",
                 "experiment.max_new_tokens=4", "experiment.search_new_tokens=6", "experiment.bootstrap.resamples=50",
                 "experiment.side_limit=4", f"hydra.run.dir={tmp_path / 'run'}"]
    first = json.loads(Path(run(compose_config(overrides, tmp_path / "run"))["results_path"]).read_text())
    details = first["details"]
    assert len(details["trials"]) == 4 and details["pareto"] and details["chosen"]["number"] in [t["number"] for t in details["trials"]]
    chosen = next(t for t in details["trials"] if t["number"] == details["chosen"]["number"])
    if details["chosen"]["met_bound"]:
        assert chosen["kl_upper"] <= 0.1 and chosen["refusal"] == min(t["refusal"] for t in details["trials"] if t["kl_upper"] <= 0.1)
    assert all(t["kl_upper"] >= t["kl"] and t["kl_tokens"] >= 0 for t in details["trials"])
    assert set(details["measured"]) == {"none", "optimised"} and details["single_direction"] is None
    assert details["points"]["search"]["optimised"] == {k: chosen[k] for k in ("number", "refusal", "kl", "kl_upper", "kl_tokens")}, \
        "the chosen trial's own figures"
    cost = details["measured"]["optimised"]["cost"]
    assert cost["kl_tokens"]["tokens"] == 8 and cost["kl_tokens"]["mean"] >= 0
    assert {name: v["n"] for name, v in details["measured"]["optimised"]["side_sets"].items()} == {"everyday": 4, "overrefusal": 4}
    assert details["measured"]["optimised"]["harmful_refusal"]["n"] == 4 and "cost" in details["measured"]["optimised"]
    assert details["export"]["check"]["max_abs_logit_diff"] < 1e-3, "the edited weights compute what the hooks compute"
    # The study file holds the trials: a second run in the same folder with more trials resumes and adds two.
    again = json.loads(Path(run(compose_config([*overrides, "experiment.n_trials=6"], tmp_path / "run"))["results_path"]).read_text())
    assert [t["number"] for t in again["details"]["trials"]][:4] == [t["number"] for t in details["trials"]] and len(again["details"]["trials"]) == 6
    assert again["details"]["trials"][0]["refusal"] == details["trials"][0]["refusal"]
    latest = again["details"]
    exported = json.loads((Path(latest["export"]["folder"]) / "abliteration.json").read_text())
    chosen_now = next(t for t in latest["trials"] if t["number"] == latest["chosen"]["number"])
    assert exported["ablation"]["direction_index"] == pytest.approx(chosen_now["direction_index"], abs=1e-3), "the export is the chosen trial"
    assert np.isfinite(first["metrics"]["abliteration/optimised/kl"])


def test_the_choice_bounds_the_kl_a_trial_can_show_beyond_its_search_prompts() -> None:
    from refusal_lab.experiments.abliteration import choose, upper_bound

    lucky = np.array([0.0, 0.0, 0.0, 0.36])  # mean 0.09: one prompt it moves a lot
    assert upper_bound(lucky) == pytest.approx(0.09 + 1.645 * lucky.std(ddof=1) / 2)
    trials = [{"number": 0, "refusal": 0.0, "kl": 0.09, "kl_upper": upper_bound(lucky), "params": None},
              {"number": 1, "refusal": 0.1, "kl": 0.05, "kl_upper": 0.08, "params": None},
              {"number": 2, "refusal": 0.5, "kl": 0.01, "kl_upper": 0.02, "params": None}]
    assert choose(trials, 0.1, "mean")["number"] == 0
    assert choose(trials, 0.1, "upper")["number"] == 1, "its upper bound, not its luck, is held to the bound"
    fallback = choose(trials, 0.01, "upper")
    assert fallback["number"] == 2 and not fallback["met_bound"]
