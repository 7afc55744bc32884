"""Exact patching: the naive loop against the fast engine, on the same pairs and sites, in one run.

The naive loop runs one full Hugging Face forward pass per patch (every layer, every position,
logits everywhere). The engine batches a pair's variants and starts each at its patched layer and
the first position the patch changes. Per sweep it prints both times, the speed-up, the largest
difference between their refusal scores, and the ideal: the share of the naive loop's floating-point
work that exact patching needs (layers from the patched one on, positions from the first one the
patch changes, logits at the last position only), counted from the model's matrix shapes
(``refusal_lab.patching.cost``). "engine / ideal" is the engine's time over the naive time scaled by that share: 1.0 would be a perfect implementation of the ideal
at the naive loop's speed per operation; below 1, batching runs faster per operation than one
prompt at a time.

    python scripts/bench_patching.py                       # 2 test pairs, head and resid sweeps, default model
    python scripts/bench_patching.py --pairs 4 --sweeps head,resid,head_pos,attn,mlp
    python scripts/bench_patching.py --overrides model=smollm2 quant=4bit

Timings are noisy on a shared machine: compare the ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from hydra import compose, initialize_config_dir

from refusal_lab.config import CONF_DIR
from refusal_lab.experiments.patching import DIRECTIONS, balanced_order
from refusal_lab.metrics import refusal_token_ids
from refusal_lab.api import prepare_model
from refusal_lab.patching import patch_fast, patch_naive, run_cached
from refusal_lab.patching.cost import forward_flops, needed_flops
from refusal_lab.patching.sweeps import post_instruction_tokens, shared_span, sweep_variants
from refusal_lab.prompts import format_chat, load_prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="contrastive pairs from the test split, categories in turn")
    parser.add_argument("--sweeps", default="head,resid", help="comma-separated: resid, head, head_pos, attn, mlp")
    parser.add_argument("--direction", default="harmless_to_harmful", choices=sorted(DIRECTIONS))
    parser.add_argument("--resid-positions", type=int, default=10)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides, e.g. model=smollm2 quant=4bit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    loaded = prepare_model(cfg)
    model, adapter, tokenizer = loaded.model, loaded.adapter, loaded.tokenizer
    refusal_ids = refusal_token_ids(tokenizer, list(cfg.model.refusal_tokens))
    system_prompt = cfg.model.get("system_prompt")
    n_post = post_instruction_tokens(tokenizer, system_prompt)
    pairs = balanced_order(load_prompt_set(cfg.prompts.path).select(split="test").pairs())[: args.pairs]
    target_label, source_label = DIRECTIONS[args.direction]
    print(f"{loaded.name} at {loaded.precision.name}, {torch.get_num_threads()} threads, {len(pairs)} pairs, {args.direction}")

    totals: dict[str, dict[str, float]] = {}
    for harmful, harmless in pairs:
        records = {"harmful": harmful, "harmless": harmless}
        runs = {}
        for label, record in records.items():
            ids = tokenizer(format_chat(tokenizer, record.prompt, system_prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
            runs[label] = run_cached(model, adapter, ids, refusal_ids)
        target, source = runs[target_label], runs[source_label]
        span = shared_span(target.ids, source.ids, n_post)
        for sweep in args.sweeps.split(","):
            positions = args.resid_positions if sweep == "resid" else n_post
            variants = [
                v for v in sweep_variants(sweep, range(adapter.n_layers), adapter.n_heads, span, positions)
                if -min(v.offsets) <= min(target.length, source.length)
            ]
            started = time.perf_counter()
            naive = patch_naive(model, adapter, target, source, variants, refusal_ids)
            naive_s = time.perf_counter() - started
            started = time.perf_counter()
            fast = patch_fast(adapter, target, source, variants, refusal_ids)
            fast_s = time.perf_counter() - started
            ideal, full = needed_flops(adapter, target, source, variants), forward_flops(adapter, target.length) * len(variants)
            total = totals.setdefault(sweep, {"variants": 0, "naive_s": 0.0, "fast_s": 0.0, "ideal": 0.0, "full": 0.0, "max_diff": 0.0})
            total["variants"] += len(variants)
            total["naive_s"] += naive_s
            total["fast_s"] += fast_s
            total["ideal"] += ideal
            total["full"] += full
            total["max_diff"] = max(total["max_diff"], float((fast - naive).abs().max()))
            print(f"  {harmful.pair_id} {sweep}: {len(variants)} variants, naive {naive_s:.2f} s, engine {fast_s:.2f} s")

    print()
    header = f"{'sweep':<9} {'variants':>8} {'naive s':>9} {'engine s':>9} {'speed-up':>9} {'ideal work':>11} {'ideal speed-up':>15} {'engine / ideal':>15} {'max |diff|':>11}"
    print(header)
    for sweep, total in totals.items():
        share = total["ideal"] / total["full"]
        ideal_s = total["naive_s"] * share
        print(
            f"{sweep:<9} {int(total['variants']):>8} {total['naive_s']:>9.1f} {total['fast_s']:>9.2f} "
            f"{total['naive_s'] / total['fast_s']:>8.1f}x {share:>10.1%} {1 / share:>14.1f}x "
            f"{total['fast_s'] / ideal_s:>15.2f} {total['max_diff']:>11.1e}"
        )
    loaded.close()


if __name__ == "__main__":
    main()
