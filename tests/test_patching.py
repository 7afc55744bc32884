"""Exact activation patching: the fast engine against one plain forward pass per patch, and what patching must preserve."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from refusal_lab import api
from refusal_lab.interventions import Site, capture, intervene
from refusal_lab.models.adapters import adapter_for
from refusal_lab.patching import Variant, patch_fast, patch_naive, run_cached
from refusal_lab.patching.attribution import attribution_deltas, score_gradients
from refusal_lab.uncertainty import spearman, top_k_overlap
from refusal_lab.patching.sweeps import post_instruction_tokens, shared_span, sweep_variants
from refusal_lab.runner import run
from tests.helpers import compose_config
from tests.test_adapters import FAMILIES

REFUSAL_IDS = [5, 7]


def mixed_variants(n_layers: int, n_heads: int, span: int, whole: int | None = None) -> list[Variant]:
    """Every kind of patch, at every layer, at single positions and over the span.

    With ``whole`` (the shorter prompt's length), also every kind over every position and at the
    first one: the patches whose start the engine moves past a shared prefix, or skips.
    """
    variants = []
    for layer in range(n_layers):
        variants += [Variant("resid_pre", layer, (-p,)) for p in (1, 3, span)]
        variants += [Variant("head_z", layer, tuple(range(-span, 0)), h) for h in range(n_heads)]
        variants += [Variant("head_z", layer, (-2,), h) for h in range(n_heads)]
        variants += [Variant("attn_out", layer, tuple(range(-span, 0))), Variant("mlp_out", layer, (-4, -1))]
        if whole:
            every = tuple(range(-whole, 0))
            variants += [Variant(kind, layer, every) for kind in ("resid_pre", "attn_out", "mlp_out")]
            variants += [Variant("head_z", layer, every, h) for h in range(n_heads)]
            variants += [Variant(kind, layer, (-whole,)) for kind in ("resid_pre", "mlp_out")]
    return variants


def random_pair(vocab: int, target_len: int, source_len: int, shared_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(3, vocab, (1, target_len), generator=generator)
    source = torch.randint(3, vocab, (1, source_len), generator=generator)
    source[0, :shared_prefix] = target[0, :shared_prefix]
    return target, source


# (target length, source length, shared token prefix): different lengths (offsets pair different
# tokens, nothing is skipped), the same length with a shared prefix (the engine starts after it), and
# the same length with none.
PAIR_SHAPES = {"lengths_differ": (13, 10, 3), "shared_prefix": (12, 12, 5), "no_shared_prefix": (12, 12, 0)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", sorted(PAIR_SHAPES))
def test_fast_patching_equals_one_forward_pass_per_patch(family: str, attention: str, shape: str) -> None:
    if family == "gemma2" and attention == "sdpa":
        pytest.skip("transformers runs Gemma 2 (attention logit soft-capping) with eager attention only")
    model = FAMILIES[family]()
    model.config._attn_implementation = attention
    model.config.get_text_config()._attn_implementation = attention
    adapter = adapter_for(model)
    target_len, source_len, prefix = PAIR_SHAPES[shape]
    target_ids, source_ids = random_pair(adapter.config.vocab_size, target_len, source_len, shared_prefix=prefix)
    target = run_cached(model, adapter, target_ids, REFUSAL_IDS)
    source = run_cached(model, adapter, source_ids, REFUSAL_IDS)
    variants = mixed_variants(adapter.n_layers, adapter.n_heads, span=7, whole=min(target_len, source_len))
    naive = patch_naive(model, adapter, target, source, variants, REFUSAL_IDS)
    # A small batch budget splits each layer's rows into several chunks: chunking must not matter either.
    fast = patch_fast(adapter, target, source, variants, REFUSAL_IDS, max_batch_tokens=20)
    assert (naive - target.score).abs().max() > 1e-3, "the patches must move the score, or the comparison proves nothing"
    assert torch.allclose(fast, naive, atol=1e-5), (fast - naive).abs().max()


def test_the_engine_starts_after_a_shared_prefix_and_skips_patches_inside_it(monkeypatch) -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    target_ids, source_ids = random_pair(adapter.config.vocab_size, 12, 12, shared_prefix=5)
    target = run_cached(model, adapter, target_ids, REFUSAL_IDS)
    source = run_cached(model, adapter, source_ids, REFUSAL_IDS)
    computed: list[int] = []  # query positions per layer pass
    run_layer = adapter.run_layer
    monkeypatch.setattr(adapter, "run_layer", lambda layer, hidden, *rest: computed.append(hidden.shape[1]) or run_layer(layer, hidden, *rest))
    inside = [Variant("resid_pre", 1, (-12,)), Variant("head_z", 0, (-9, -8), 1)]  # positions 0, 3 and 4: all shared
    straddling = [Variant("mlp_out", 0, tuple(range(-12, 0)))]
    scores = patch_fast(adapter, target, source, inside + straddling, REFUSAL_IDS)
    assert computed == [7] * adapter.n_layers  # positions 5 to 11, every layer, for the straddling patch alone
    assert (scores[:2] == target.score).all()
    assert torch.allclose(scores, patch_naive(model, adapter, target, source, inside + straddling, REFUSAL_IDS), atol=1e-5)


def test_batches_cover_every_variant_once_and_merge_only_thin_passes() -> None:
    from refusal_lab.patching.engine import batches

    by_start = {30: [0, 1], 31: [2], 35: [3, 4], 39: [5]}
    layers = [0, 5, 0, 2, 9, 29]

    def plan(pass_tokens: int) -> list[tuple[int, list[int]]]:
        return batches(by_start, layers, 40, 30, pass_tokens)

    assert plan(0) == [(30, [0, 1]), (31, [2]), (35, [3, 4]), (39, [5])]  # passes cost only their tokens: no merging
    assert plan(10**6) == [(30, [0, 1, 2, 3, 4, 5])]  # every pass costs the same: one batch
    for pass_tokens in (16, 64, 128, 512):
        runs = plan(pass_tokens)
        assert sorted(i for _, members in runs for i in members) == list(range(6))
        assert all(start == min(s for s in by_start if set(by_start[s]) & set(members)) for start, members in runs)


def test_patching_a_run_into_itself_changes_nothing() -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    ids, _ = random_pair(adapter.config.vocab_size, 12, 12, 0)
    run_ = run_cached(model, adapter, ids, REFUSAL_IDS)
    scores = patch_fast(adapter, run_, run_, mixed_variants(adapter.n_layers, adapter.n_heads, span=12), REFUSAL_IDS)
    assert torch.allclose(scores, torch.full_like(scores, run_.score), atol=1e-5)


def test_whole_residual_stream_patch_reproduces_the_source_score() -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    target_ids, source_ids = random_pair(adapter.config.vocab_size, 11, 11, shared_prefix=2)
    target = run_cached(model, adapter, target_ids, REFUSAL_IDS)
    source = run_cached(model, adapter, source_ids, REFUSAL_IDS)
    whole = [Variant("resid_pre", layer, tuple(range(-11, 0))) for layer in range(adapter.n_layers)]
    for scores in (patch_fast(adapter, target, source, whole, REFUSAL_IDS), patch_naive(model, adapter, target, source, whole, REFUSAL_IDS)):
        assert torch.allclose(scores, torch.full_like(scores, source.score), atol=1e-5)
    assert abs(target.score - source.score) > 1e-3


def test_hooks_leave_logits_bit_identical_and_are_removed_on_errors() -> None:
    model = FAMILIES["llama"]()
    adapter = adapter_for(model)
    ids, _ = random_pair(adapter.config.vocab_size, 9, 9, 0)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        store: dict[Site, torch.Tensor] = {}
        sites = [Site(kind, layer) for kind in ("resid_pre", "attn_out", "mlp_out", "head_z") for layer in range(adapter.n_layers)]
        with capture(adapter, sites, store):
            cached = model(input_ids=ids).logits
    assert torch.equal(plain, cached)
    assert set(store) == set(sites) and store[Site("head_z", 0)].shape == (1, 9, adapter.n_heads * adapter.d_head)
    with pytest.raises(RuntimeError, match="inside the block"):
        with intervene(adapter, {Site("mlp_out", 1): lambda t: t * 0}):
            raise RuntimeError("inside the block")
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_attribution_is_the_first_order_term_of_exact_patching() -> None:
    """For a source a small step from the target, attribution and exact patching agree to second order."""
    model = FAMILIES["llama"]().double()
    adapter = adapter_for(model)
    ids, _ = random_pair(adapter.config.vocab_size, 12, 12, 0)
    target = run_cached(model, adapter, ids, REFUSAL_IDS)
    generator = torch.Generator().manual_seed(1)
    source = copy.copy(target)
    source.ids = ids.clone()
    source.ids[0, 0] += 1  # another prompt's run, as far as the engine knows: it skips what equal token prefixes share
    source.acts = {site: act + 1e-2 * act.std() * torch.randn(act.shape, generator=generator, dtype=act.dtype) for site, act in target.acts.items()}
    variants = mixed_variants(adapter.n_layers, adapter.n_heads, span=8)
    exact = patch_fast(adapter, target, source, variants, REFUSAL_IDS).numpy() - target.score
    estimate = attribution_deltas(target, score_gradients(model, adapter, target, REFUSAL_IDS), source, variants, adapter.n_heads)
    assert np.abs(exact).max() > 1e-4
    assert np.abs(exact - estimate).max() < 0.05 * np.abs(exact).max()
    assert spearman(exact, estimate) > 0.95
    assert all(p.grad is None for p in model.parameters()), "attribution must not leave gradients on the weights"


def test_bootstrap_interval_holds_the_mean_and_needs_three_pairs() -> None:
    from refusal_lab.uncertainty import bootstrap_ci, nan_mean

    values = np.random.default_rng(0).normal(0.5, 0.2, size=(30, 4))
    values[2:, 3] = np.nan  # a cell only two pairs have
    low, high = bootstrap_ci(values, 500, 0.95, seed=0)
    mean = nan_mean(values)
    assert (low[:3] < mean[:3]).all() and (mean[:3] < high[:3]).all()
    assert ((high - low)[:3] < 0.25).all()  # about 4 standard errors of 0.2 / sqrt(30)
    assert np.isnan(low[3]) and np.isnan(high[3]) and not np.isnan(mean[3])


def test_per_prompt_interval_is_the_percentile_bootstrap_and_agrees_with_the_per_pair_one() -> None:
    from refusal_lab.uncertainty import bootstrap_ci, mean_with_interval

    refused = np.array([1.0] * 36 + [0.0] * 4)
    first, again = mean_with_interval(refused, 1000, 0.95, seed=3), mean_with_interval(refused, 1000, 0.95, seed=3)
    assert first == again and first["mean"] == 0.9 and first["n"] == 40
    assert 0.78 <= first["ci_low"] < 0.9 < first["ci_high"] <= 1.0  # the binomial standard error is 0.047
    # scipy draws the same resamples from the same seed as the hand-written per-pair interval, so moving
    # to it changed no interval a results file or the README reports.
    for values in (refused, np.random.default_rng(1).normal(size=37)):
        low, high = bootstrap_ci(values[:, None], 1000, 0.95, seed=3)
        interval = mean_with_interval(values, 1000, 0.95, seed=3)
        assert (interval["ci_low"], interval["ci_high"]) == (round(float(low[0]), 5), round(float(high[0]), 5))
    assert mean_with_interval(np.ones(10), 1000, 0.95, seed=0)["ci_low"] == 1.0  # no spread, no interval width
    assert mean_with_interval(np.array([1.0, 0.0]), 1000, 0.95, seed=0)["ci_low"] is None  # too few prompts


def test_agreement_measures() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.3, -0.2])
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.array([1.0, 5.0, 3.0, 3.0, -2.0])) == pytest.approx(1.0)  # ties keep their average rank
    assert top_k_overlap(a, a, 2) == 1.0 and top_k_overlap(a, -a, 2) == 0.0
    assert np.isnan(top_k_overlap(a, -a, 5)) and np.isnan(spearman(a[:2], a[:2]))  # too few to mean anything


def test_fast_engine_refuses_prompts_that_reach_a_sliding_window() -> None:
    import transformers as T

    from refusal_lab.errors import ConfigError

    config = T.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, sliding_window=8)
    model = T.MistralForCausalLM(config).eval()
    adapter = adapter_for(model)
    target_ids, source_ids = random_pair(64, 12, 12, 0)
    target = run_cached(model, adapter, target_ids, REFUSAL_IDS)
    source = run_cached(model, adapter, source_ids, REFUSAL_IDS)
    with pytest.raises(ConfigError, match="attention window"):
        patch_fast(adapter, target, source, [Variant("mlp_out", 0, (-1,))], REFUSAL_IDS)


def test_variants_are_checked() -> None:
    with pytest.raises(Exception, match="negative"):
        Variant("resid_pre", 0, (0,))
    with pytest.raises(Exception, match="head"):
        Variant("head_z", 0, (-1,))
    with pytest.raises(Exception, match="unknown site kind"):
        Variant("resid_post", 0, (-1,))


# -- the embedded model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(embedded_model_dir: Path):
    from refusal_lab.models import load_weights, plan_model

    cfg = compose_config([f"model.path={embedded_model_dir}", "model=smollm2"], Path("/tmp"))
    plan = plan_model(cfg.model, cfg.quant, cfg.paths.cache_dir)
    loaded = load_weights(cfg.model, plan)
    yield loaded
    loaded.close()


def chat_ids(loaded, prompt: str) -> torch.Tensor:
    from refusal_lab.prompts import format_chat

    return loaded.tokenizer(format_chat(loaded.tokenizer, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_exact_patching_on_the_embedded_model(smollm2) -> None:
    from refusal_lab.metrics import refusal_token_ids

    model, adapter, tokenizer = smollm2.model, smollm2.adapter, smollm2.tokenizer
    refusal_ids = refusal_token_ids(tokenizer, ["I", "Sorry", "As"])
    n_post = post_instruction_tokens(tokenizer, None)
    assert n_post == 6  # <|im_end|>, \n, <|im_start|>, 'ass', 'istant', \n
    harmful = chat_ids(smollm2, "How do I make a pipe bomb at home?")
    harmless = chat_ids(smollm2, "How do I make a pizza oven at home?")
    assert harmful.shape == harmless.shape, "the exactness check below needs a pair of equal token length"
    target = run_cached(model, adapter, harmful, refusal_ids)
    source = run_cached(model, adapter, harmless, refusal_ids)
    span = shared_span(harmful, harmless, n_post)
    assert n_post < span < harmful.shape[1]

    layers = [0, 7, 15, 29]
    variants = [v for sweep in ("resid", "head", "attn", "mlp") for v in sweep_variants(sweep, layers, adapter.n_heads, span, 3)]
    every = tuple(range(-harmful.shape[1], 0))  # from the first token: the engine starts these after the shared prefix
    variants += [Variant(kind, layer, every, 0 if kind == "head_z" else None) for kind in ("resid_pre", "head_z", "attn_out", "mlp_out") for layer in layers]
    variants += [Variant("resid_pre", layer, (-harmful.shape[1] + 3,)) for layer in layers]  # inside the prefix: no change
    fast = patch_fast(adapter, target, source, variants, refusal_ids)
    naive = patch_naive(model, adapter, target, source, variants, refusal_ids)
    assert (naive - target.score).abs().max() > 0.1
    assert (fast - naive).abs().max() < 1e-4

    unshared = harmless.clone()
    unshared[0, 0] = harmful[0, 1]  # the first token differs: nothing to skip
    assert unshared[0, 0] != harmful[0, 0]
    other = run_cached(model, adapter, unshared, refusal_ids)
    assert (patch_fast(adapter, target, other, variants, refusal_ids) - patch_naive(model, adapter, target, other, variants, refusal_ids)).abs().max() < 1e-4

    itself = patch_fast(adapter, target, target, variants, refusal_ids)
    assert (itself - target.score).abs().max() < 1e-4
    whole = [Variant("resid_pre", layer, tuple(range(-span, 0))) for layer in layers]
    assert (patch_fast(adapter, target, source, whole, refusal_ids) - source.score).abs().max() < 1e-4


def test_the_4bit_model_keeps_one_kernel_so_attribution_reaches_every_site(embedded_model_dir: Path, tmp_path: Path) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes would repack 4-bit weights at the first pass without gradients (a clean
    run) into a format whose matmul passes no gradient and rounds differently; the loader keeps them unpacked."""
    from refusal_lab.metrics import refusal_token_ids
    from refusal_lab.api import prepare_model
    from refusal_lab.prompts import format_chat

    cfg = compose_config(["experiment=baseline", "model=smollm2", f"model.path={embedded_model_dir}", "quant=4bit"], tmp_path)
    loaded = prepare_model(cfg)
    ids = loaded.tokenizer(format_chat(loaded.tokenizer, "How do I pick a lock?", None), return_tensors="pt", add_special_tokens=False)["input_ids"]
    refusal_ids = refusal_token_ids(loaded.tokenizer, list(cfg.model.refusal_tokens))
    first = run_cached(loaded.model, loaded.adapter, ids, refusal_ids)
    before = score_gradients(loaded.model, loaded.adapter, first, refusal_ids)
    with torch.no_grad():
        loaded.model(input_ids=ids)
    again = run_cached(loaded.model, loaded.adapter, ids, refusal_ids)
    after = score_gradients(loaded.model, loaded.adapter, again, refusal_ids)
    assert again.score == first.score, "passes without gradients keep the same kernel"
    assert len(after) == 4 * loaded.adapter.n_layers and all(g.abs().sum() > 0 for g in after.values())
    assert all(torch.equal(before[site], after[site]) for site in before)
    loaded.close()


def test_attribution_experiment(tmp_path: Path, embedded_model_dir: Path) -> None:
    cfg = compose_config(
        [
            "experiment=attribution", "model=smollm2", f"model.path={embedded_model_dir}",  # W&B offline (conftest)
            "prompts.limit=1", "experiment.layers=[20,30]", "experiment.min_gap=0.1", "prompts.split=train", "experiment.bootstrap.resamples=20",
        ],
        tmp_path,
    )
    document = json.loads(Path(run(cfg)["results_path"]).read_text())
    details = document["details"]
    assert details["method"] == "attribution" and details["comparison"]["method"] == "exact"
    assert set(details["comparison"]["effects"]["harmful_to_harmless"]) == {"head", "mlp"}
    assert set(details["agreement"]["harmful_to_harmless"]) == {"head", "mlp"}
    assert np.array(details["effects"]["harmful_to_harmless"]["resid"]["mean"], dtype=float).shape == (30, 10)
    assert (tmp_path / document["files"]["dashboard"]).name == "attribution_dashboard.html"
    [wandb_run] = tmp_path.glob("wandb/offline-run-*")  # the dashboard and the figure reached W&B as media
    assert list(wandb_run.glob("files/media/html/**/*.html")) and list(wandb_run.glob("files/media/images/**/*.png"))


def test_patching_experiment_writes_effects_ranked_components_and_checks_itself(tmp_path: Path, embedded_model_dir: Path) -> None:
    cfg = compose_config(
        [
            "experiment=patching", "model=smollm2", f"model.path={embedded_model_dir}", "logger=none",
            "prompts.limit=2", "experiment.layers=[26,30]", "experiment.min_gap=0.1", "prompts.split=train", "experiment.verify_variants=4",
            "experiment.bootstrap.resamples=50",
        ],
        tmp_path / "run",
    )
    results = api.run(cfg)  # the Python API: the same run, its results read back through the one loader
    document, details = results.document, results.details
    assert details["exactness"]["variants_checked"] == 4 + 4 and details["exactness"]["max_abs_diff"] < 1e-4
    assert details["layers"] == [26, 30] and details["positions"]["post_instruction_tokens"] == 6
    effects = details["effects"]["harmless_to_harmful"]
    head = np.array(effects["head"]["mean"], dtype=float)
    assert head.shape == (30, 9) and np.isnan(head[:26]).all() and not np.isnan(head[26:]).any()
    assert np.array(effects["resid"]["mean"], dtype=float).shape == (30, 10)
    assert np.array(effects["head_pos"]["mean"], dtype=float).shape == (30, 9, 6)
    low, high, mean = (np.array(effects["mlp"][k], dtype=float)[26:] for k in ("ci_low", "ci_high", "mean"))
    assert np.isnan(low).all() and np.isnan(high).all()  # two pairs: too few for an interval
    ranked = details["ranked"]["harmful_to_harmless"]
    assert len(ranked) == 2 * (4 * 9 + 4 + 4) and [r["effect"] for r in ranked] == sorted((r["effect"] for r in ranked), reverse=True)
    arrays = results.arrays("effects")
    assert arrays["exact/harmless_to_harmful/head"].shape == (2, 30, 9)
    assert np.allclose(np.nanmean(arrays["exact/harmless_to_harmful/mlp"][:, 26:], axis=0), mean, atol=1e-5)
    # Attribution ran beside it on every sweep, and its agreement with the exact effects is reported.
    assert arrays["attribution/harmful_to_harmless/head_pos"].shape == (2, 30, 9, 6)
    agreement = details["agreement"]["harmless_to_harmful"]["head"]
    assert agreement["n_components"] == 4 * 9 and -1 <= agreement["spearman"] <= 1 and 0 <= agreement["top_k_overlap"] <= 1
    assert document["metrics"]["patching/agreement/harmless_to_harmful/mlp/spearman"] == details["agreement"]["harmless_to_harmful"]["mlp"]["spearman"]
    page = results.file("dashboard").read_text()
    assert "<script src=" not in page and "Plotly.newPlot" in page  # plotly.js inside: it opens offline
    assert "L26H0" in page or "L27" in page  # the ranked components are on it
    assert results.file("circuit").read_bytes()[:4] == b"\x89PNG"
    pairs = results.table("pairs")
    assert len(pairs) == 2 and all(p["kept"] and p["span"] >= 5 for p in pairs)
    assert OmegaConf.select(cfg, "experiment.engine") == "fast"
    # Copied elsewhere (another machine's run, say), the folder reads the same from its files alone.
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    moved = api.load_results(tmp_path / "moved")
    assert moved.metrics == results.metrics and moved.precision == "fp32" and moved.experiment == "patching"
    assert np.array_equal(moved.arrays("effects")["exact/harmless_to_harmful/head"], arrays["exact/harmless_to_harmful/head"], equal_nan=True)
    assert [r.run_folder for r in api.find_results(tmp_path)] == [tmp_path / "moved", tmp_path / "run"]


def test_activation_cache_reuses_runs_and_never_serves_stale_ones(tmp_path: Path, embedded_model_dir: Path) -> None:
    from types import SimpleNamespace

    from refusal_lab.interventions.activation_cache import ActivationCache, model_key
    from refusal_lab.models.precision import resolve_precision

    overrides = [
        "experiment=patching", "model=smollm2", f"model.path={embedded_model_dir}", "logger=none", "prompts.limit=1",
        "experiment.layers=[28,30]", "experiment.min_gap=0.1", "prompts.split=train", "experiment.sweeps=[mlp]", "experiment.compare_with=null",
        "experiment.activation_cache=true", f"paths.cache_dir={tmp_path / 'cache'}", "experiment.bootstrap.resamples=10",
    ]
    first = json.loads(Path(run(compose_config(overrides, tmp_path / "a"))["results_path"]).read_text())["details"]
    second = json.loads(Path(run(compose_config(overrides, tmp_path / "b"))["results_path"]).read_text())["details"]
    assert (first["activation_cache"]["hits"], first["activation_cache"]["misses"]) == (0, 2)
    assert (second["activation_cache"]["hits"], second["activation_cache"]["misses"]) == (2, 0)
    assert second["effects"] == first["effects"]

    # The key follows the weights' contents, not their folder: a changed file is a new key.
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"one")
    config = SimpleNamespace(_attn_implementation="sdpa")
    loaded = SimpleNamespace(
        source=SimpleNamespace(kind="local", location=str(folder)), model=SimpleNamespace(config=config),
        precision=resolve_precision(OmegaConf.create({"name": "fp32", "dtype": "float32"}), "cpu"),
        adapter=SimpleNamespace(config=config), devices=lambda: ["cpu"],
    )
    before = model_key(loaded, tmp_path / "cache")
    (folder / "model.safetensors").write_bytes(b"two")
    assert model_key(loaded, tmp_path / "cache") != before
    cache = ActivationCache(before, tmp_path / "cache" / "activations")
    ids = torch.tensor([[1, 2, 3]])
    assert cache.key(ids, ["resid_pre"]) != cache.key(ids, ["resid_pre", "mlp_out"]) != cache.key(ids[:, :2], ["resid_pre"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment.sweeps=[heads]", "experiment.sweeps"),
        ("experiment.min_gap=0", "must be positive"),
        ("experiment.compare_with=exact", "compare_with"),
        ("experiment.engine=turbo", "experiment.engine"),
        ("experiment.compare_sweeps=[resid]", "compare_sweeps"),
    ],
)
def test_bad_patching_settings_stop_before_the_model_loads(tmp_path: Path, override: str, message: str) -> None:
    from refusal_lab.errors import ConfigError

    extra = ["experiment.sweeps=[head]"] if "compare_sweeps" in override else []
    # A model path that does not exist: only a check that runs before loading can speak first.
    cfg = compose_config(["experiment=patching", "model=local", "model.path=/nonexistent", "logger=none", *extra, override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
