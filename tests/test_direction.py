"""The refusal direction: hooks, the shared-prefix forward pass, weight orthogonalisation, the experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from refusal_lab.direction.export import orthogonalise
from refusal_lab.direction.selection import CandidateScores, choose
from refusal_lab.interventions import Site, capture, intervene
from refusal_lab.interventions.operations import activation_addition, directional_ablation
from refusal_lab.models.adapters import adapter_for
from tests.helpers import compose_config
from tests.test_adapters import FAMILIES

IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 7, 8]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_orthogonalised_weights_compute_what_hook_ablation_computes(family: str, tmp_path: Path) -> None:
    """Exact where blocks write straight into the residual stream; said to be approximate where they write through a norm."""
    model = FAMILIES[family]()
    adapter = adapter_for(model)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
        with intervene(adapter, directional_ablation(adapter, direction)):
            hooked = model(input_ids=IDS).logits
    report = orthogonalise(adapter, direction)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        exported = reloaded(input_ids=IDS).logits
    assert (plain - hooked).abs().max() > 1e-3, "the ablation must change something for the comparison to mean anything"
    assert report["exact"] == (not adapter.writes_through_norm)
    if report["exact"]:
        assert (exported - hooked).abs().max() < 1e-5
    else:
        assert "approximate" in report["note"] and (exported - hooked).abs().max() > 1e-5
    # No block of the exported model can write the direction: each writer's output is orthogonal to it.
    unit = direction / direction.norm()
    for name, module in adapter_for(reloaded).residual_writers().items():
        written = module.weight @ unit if name == "embed" else unit @ module.weight
        assert written.abs().max() < 1e-5, name


def test_directional_ablation_removes_the_direction_everywhere_and_addition_adds_it() -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    direction = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(2))
    unit = direction / direction.norm()
    last = adapter.n_layers - 1
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        seen["final"] = output[0] if isinstance(output, tuple) else output

    handle = adapter.layer(last).register_forward_hook(keep)
    try:
        with torch.no_grad(), intervene(adapter, directional_ablation(adapter, direction)):
            model(input_ids=IDS)
        assert (seen["final"] @ unit).abs().max() < 1e-5, "the residual stream leaving the last layer holds none of it"
    finally:
        handle.remove()
    site = Site("resid_pre", last)
    plain: dict = {}
    added: dict = {}
    with torch.no_grad():
        with capture(adapter, [site], plain):
            model(input_ids=IDS)
        with intervene(adapter, activation_addition(direction, last)), capture(adapter, [site], added):
            model(input_ids=IDS)
    assert torch.allclose(added[site] - plain[site], direction.expand_as(plain[site]), atol=1e-5)


def test_selection_discards_by_kl_induce_and_depth_then_takes_the_lowest_bypass() -> None:
    nan = float("nan")
    scores = CandidateScores(
        bypass=torch.tensor([[nan, -9.0], [-5.0, -1.0], [-2.0, -8.0], [-7.0, -6.0]]).numpy(),
        induce=torch.tensor([[nan, 1.0], [1.0, 1.0], [1.0, -0.5], [1.0, 1.0]]).numpy(),
        kl=torch.tensor([[nan, 0.5], [0.05, 0.05], [0.05, 0.05], [0.05, 0.05]]).numpy(),
    )
    cell, counts = choose(scores, n_layers=4, max_kl=0.1, min_induce=0.0, max_layer_fraction=0.75)
    # (0, 1) costs too much, (2, 1) induces nothing, row 3 is too deep: (1, 0) is the best kept one.
    assert cell == (1, 0)
    assert counts == {"candidates": 8, "scored": 7, "kept": 3, "too_deep": 2, "kl_too_high": 1, "induce_too_low": 1}
    assert choose(scores, 4, max_kl=0.01, min_induce=0.0, max_layer_fraction=0.75)[0] is None


def test_shared_prefix_forward_matches_one_prompt_at_a_time(embedded_model_dir: Path) -> None:
    from refusal_lab.generation import next_token_logits
    from refusal_lab.interventions import Site, capture
    from refusal_lab.api import prepare_model
    from refusal_lab.prompts import format_chat, load_prompt_set

    cfg = compose_config([f"model.path={embedded_model_dir}", "model=smollm2"], Path("/tmp"))
    loaded = prepare_model(cfg)
    records = load_prompt_set(cfg.prompts.path).select(split="val", limit=3).records
    texts = [format_chat(loaded.tokenizer, r.prompt, cfg.model.get("system_prompt")) for r in records]
    direction = torch.randn(loaded.adapter.d_model, generator=torch.Generator().manual_seed(3))
    hooks = directional_ablation(loaded.adapter, direction)
    logits, captured = next_token_logits(loaded, texts, batch_size=4, hooks=hooks, capture_last=3)
    sites = [Site("resid_pre", layer) for layer in range(loaded.adapter.n_layers)]
    for row, text in enumerate(texts):
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        store: dict = {}
        with torch.no_grad(), intervene(loaded.adapter, hooks), capture(loaded.adapter, sites, store):
            alone = loaded.model(input_ids=ids).logits[0, -1]
        assert (logits[row] - alone).abs().max() < 1e-3
        stacked = torch.stack([store[site][0, -3:] for site in sites])
        assert torch.allclose(captured["resid_pre"][row], stacked, rtol=1e-4, atol=1e-3)
    loaded.close()


def test_direction_experiment_finds_ablates_adds_and_exports(embedded_model_dir: Path, tmp_path: Path) -> None:
    """A small run on the shipped organism: every stage runs and writes what the dashboard shows, and the
    exported folder loads as a model that computes what hook ablation computes."""
    from safetensors.torch import load_file

    from refusal_lab.generation import next_token_logits
    from refusal_lab.api import prepare_model
    from refusal_lab.models import load_model
    from refusal_lab.prompts import format_chat, load_prompt_set
    from refusal_lab.runner import run

    cfg = compose_config([
        "experiment=direction", "logger=none", "experiment.limit_per_label=4", "experiment.positions=2", "experiment.side_limit=2",
        "experiment.score_all_layers=false", "experiment.max_new_tokens=8", "experiment.max_kl=1000",
        "experiment.min_induce=-1000", "experiment.bootstrap.resamples=50",
    ], tmp_path)
    document = run(cfg)
    results = json.loads(Path(document["results_path"]).read_text())
    details, metrics = results["details"], results["metrics"]
    selection = details["selection"]
    assert len(selection["scores"]["bypass"]) == 30 and len(selection["scores"]["bypass"][0]) == 2
    assert all(value is None for value in selection["scores"]["bypass"][29]), "layers past 80 % of the depth are not scored"
    chosen = selection["chosen"]
    assert chosen["layer"] < 24 and chosen["position"] in (-2, -1)
    assert metrics["direction/chosen/bypass"] == chosen["bypass"]
    refusal = details["outcome"]["refusal"]
    assert set(refusal) == {"harmful/none", "harmful/ablation", "harmless/none", "harmless/addition"}
    assert all(v["refusal_rate"]["n"] == 4 for v in refusal.values())
    every_row = [json.loads(line) for line in (tmp_path / "results" / "direction_completions.jsonl").read_text().splitlines()]
    rows = [r for r in every_row if "set" not in r]
    assert len(rows) == 16 and {r["condition"] for r in rows} == {"none", "ablation", "addition"}
    side = [r for r in every_row if r.get("set") == "overrefusal"]
    assert len(side) == 4 and {r["condition"] for r in side} == {"none", "ablation"}, "over-refusal with and without the direction"
    assert metrics["direction/overrefusal/ablation/refusal_rate"] == details["outcome"]["side_sets"]["ablation"]["overrefusal"]["refusal_rate"]
    cost = details["outcome"]["cost"]
    assert cost["kl"]["mean"] >= 0
    kls = [r["kl_under_ablation"] for r in rows if r["label"] == "harmless" and r["condition"] == "none"]
    assert len(kls) == 4 and abs(sum(kls) / 4 - cost["kl"]["mean"]) < 1e-4
    split = cost["kl_by_unablated_decision"]
    assert split["answered"]["n"] + split["refused"]["n"] == 4
    assert abs(sum(v["mean"] * v["n"] for v in split.values() if v["n"]) / 4 - cost["kl"]["mean"]) < 1e-4
    assert (tmp_path / "results" / "direction_dashboard.html").stat().st_size > 100_000

    export = details["export"]
    assert export["exact"] and export["untied_output_embedding"] and export["check"]["max_abs_logit_diff"] < 1e-3
    folder = Path(export["folder"])
    local = compose_config(["model=local", f"model.path={folder}", "logger=none"], tmp_path)
    exported = load_model(local.model, local.quant, local.paths.cache_dir)
    direction = load_file(tmp_path / "results" / "direction_vectors.safetensors")["direction"]
    texts = [format_chat(exported.tokenizer, r.prompt, local.model.get("system_prompt"))
             for r in load_prompt_set(local.prompts.path).select(split="test", limit=2).records]
    organism = prepare_model(cfg)
    hooked, _ = next_token_logits(organism, texts, 4, hooks=directional_ablation(organism.adapter, direction))
    reloaded, _ = next_token_logits(exported, texts, 4)
    assert (hooked - reloaded).abs().max() < 1e-3
