"""How precision changes speed, memory and the refusal score, measured in one run.

Loads the embedded model (or any model config) at each precision, generates greedy completions
for the same prompts, and prints, relative to the first precision listed: load time, generation
time, memory, how often the greedy completion is identical, and how far the refusal score moves.

    python scripts/bench_precision.py                          # fp32,fp16,bf16,8bit,4bit; 32 prompts
    python scripts/bench_precision.py --quants fp32,4bit --prompts 64 --new-tokens 32
    python scripts/bench_precision.py --overrides model=local model.path=/models/x

Timings are noisy on a shared machine: compare the ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from hydra import compose, initialize_config_dir

from refusal_lab.config import CONF_DIR
from refusal_lab.generation import generate_greedy
from refusal_lab.metrics import refusal_score, refusal_token_ids
from refusal_lab.api import prepare_model
from refusal_lab.prompts import format_chat, load_prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quants", default="fp32,fp16,bf16,8bit,4bit", help="comma-separated quant options; the first is the reference")
    parser.add_argument("--prompts", type=int, default=16, help="pairs from the test split (so twice as many prompts)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides, e.g. model=local model.path=...")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows = []
    reference: dict[str, object] | None = None
    for quant in args.quants.split(","):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose(config_name="config", overrides=[f"quant={quant}", *args.overrides])
        records = load_prompt_set(cfg.prompts.path).select(split="test", limit=args.prompts).records
        started = time.perf_counter()
        loaded = prepare_model(cfg)
        load_s = time.perf_counter() - started
        ids = refusal_token_ids(loaded.tokenizer, list(cfg.model.refusal_tokens))
        texts = [format_chat(loaded.tokenizer, r.prompt, cfg.model.get("system_prompt")) for r in records]
        started = time.perf_counter()
        generations = generate_greedy(
            loaded, texts, args.new_tokens, args.batch_size, lambda logits: refusal_score(logits, ids), description=quant
        )
        generate_s = time.perf_counter() - started
        memory_mb = loaded.model.get_memory_footprint() / 2**20
        loaded.close()
        scores = np.array([float(g.readout) for g in generations])
        completions = [g.completion for g in generations]
        if reference is None:
            reference = {"load": load_s, "generate": generate_s, "memory": memory_mb, "scores": scores, "completions": completions}
        same = np.mean([a == b for a, b in zip(completions, reference["completions"])])
        drift = np.abs(scores - reference["scores"]).mean()
        rows.append((quant, load_s, generate_s, memory_mb, generate_s / reference["generate"], memory_mb / reference["memory"], same, drift))

    print(f"\n{len(texts)} prompts, {args.new_tokens} new tokens, batch {args.batch_size}; ratios against {rows[0][0]}")
    print(f"{'quant':6} {'load s':>7} {'gen s':>7} {'MB':>7} {'gen x':>6} {'mem x':>6} {'same text':>9} {'|d score|':>9}")
    for quant, load_s, generate_s, memory_mb, speed, memory, same, drift in rows:
        print(f"{quant:6} {load_s:7.2f} {generate_s:7.1f} {memory_mb:7.0f} {speed:6.2f} {memory:6.2f} {same:9.0%} {drift:9.3f}")


if __name__ == "__main__":
    main()
