"""Side by side with nnsight and TransformerLens: the same patching sweeps, the same numbers, each tool's time.

In one process, on the same model, pairs and precision, every tool runs the standard sweeps the way
its users write them: clean runs of the pair once, the source's activations kept (nnsight: one
``trace`` saving them; TransformerLens: ``run_with_cache``; refusal_lab: ``run_cached``), then per
sweep one forward pass of the target per patched component (nnsight: a ``trace``; TransformerLens:
``run_with_hooks``), or ``patch_fast`` for refusal_lab. Every tool's clean runs are timed once per
pair and printed apart; a sweep's seconds are its patched runs. Per pair and sweep it prints:

- the seconds of each tool and refusal_lab's speed-up over each;
- the agreement of the effect tensors, (patched - target) / (source - target): Pearson r and the
  largest absolute difference against refusal_lab's;
- the floating-point work the sweep really needs (``refusal_lab.patching.cost``: layers from the
  patched one on, positions from the first one the patch changes, logits at the last position), the
  engine's achieved GFLOP/s, and a fp32 matrix multiply's GFLOP/s measured in the same run.

The pairs, patched harmless into harmful (the harmful prompt's run is the target): the peer task,
two prompts identical but for two tokens, and the first pair of the shipped contrastive set (test
split) whose prompts differ in length. Positions count from the end; "all positions" is every
position for the peer task and, for the shipped pair, its span: the positions after the two
prompts' common token prefix, where refusal_lab's experiments patch (aligned from the end, the
prefix would pair different tokens). The peers live in an optional dependency group that the core
package never imports:

    pip install -e '.[peers]'
    python scripts/bench_peers.py                         # both pairs, every sweep, every layer
    python scripts/bench_peers.py --quick                 # the peer task on 3 layers
    python scripts/bench_peers.py --pairs peer --peers hooked --json bench.json
    python scripts/bench_peers.py --overrides model=smollm2

TransformerLens 4 removed ``HookedTransformer``; TransformerLens 3.9 has it beside
``TransformerBridge`` but cannot be installed beside 4.x (one package name), so the HookedTransformer
column (``--peers hooked``) runs in an environment with ``transformer-lens==3.9.0`` instead of the
extra's 4.x. Timings are noisy on a shared machine: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import logging
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from scipy import stats

from refusal_lab.config import CONF_DIR
from refusal_lab.experiments.patching import balanced_order
from refusal_lab.metrics import refusal_score, refusal_token_ids
from refusal_lab.api import prepare_model
from refusal_lab.models.adapters import ArchitectureAdapter, adapter_for
from refusal_lab.patching import Variant, patch_fast, run_cached
from refusal_lab.patching.cost import forward_flops, needed_flops
from refusal_lab.patching.stats import normalised_effect
from refusal_lab.patching.sweeps import post_instruction_tokens, shared_span
from refusal_lab.prompts import format_chat, load_prompt_set

PEER_TASK = ("How do I make a pipe bomb at home?", "How do I make a pizza oven at home?")  # harmful, harmless


@dataclass
class Pair:
    name: str
    target: torch.Tensor  # [1, T] token ids of the harmful prompt: the run patched into
    source: torch.Tensor  # [1, S] the harmless prompt: the run copied from
    aligned: int  # the positions patched, counted from the end: "all positions"

    def describe(self) -> str:
        t, s = self.target.shape[1], self.source.shape[1]
        if t == s:
            differ = (self.target[0] != self.source[0]).nonzero().flatten().tolist()
            return f"{self.name}: {t} tokens each, differing at positions {differ}, every position patched"
        return f"{self.name}: {t} and {s} tokens, the last {self.aligned} patched (the span after their common prefix)"


# The standard sweeps, as refusal_lab variants; every tool patches exactly these.
SweepFn = Callable[[Sequence[int], int, int], list[Variant]]
SWEEPS: dict[str, SweepFn] = {
    "heads, all positions": lambda layers, heads, n: [Variant("head_z", l, tuple(range(-n, 0)), h) for l in layers for h in range(heads)],
    "resid, layer x position": lambda layers, heads, n: [Variant("resid_pre", l, (o,)) for l in layers for o in range(-n, 0)],
    "MLP out, layer x position": lambda layers, heads, n: [Variant("mlp_out", l, (o,)) for l in layers for o in range(-n, 0)],
    "attention out, per layer": lambda layers, heads, n: [Variant("attn_out", l, tuple(range(-n, 0))) for l in layers],
}


@dataclass
class Clean:
    """A tool's clean runs of a pair: the two scores, and what it keeps to patch from."""

    target_score: float
    source_score: float
    state: Any


class Tool(ABC):
    """One way of running a pair's sweeps: the clean runs once per pair (``clean``), then patched runs per sweep (``patch``)."""

    name = ""

    @abstractmethod
    def clean(self, pair: Pair, variants: Sequence[Variant]) -> Clean:
        """The pair's clean runs, keeping what the ``variants`` will copy from the source."""

    @abstractmethod
    def patch(self, clean: Clean, pair: Pair, variants: Sequence[Variant]) -> np.ndarray:
        """The target's refusal score with each variant patched in."""


class RefusalLab(Tool):
    name = "refusal_lab"

    def __init__(self, model: torch.nn.Module, adapter: ArchitectureAdapter, refusal_ids: list[int]) -> None:
        self.model, self.adapter, self.refusal_ids = model, adapter, refusal_ids

    def clean(self, pair: Pair, variants: Sequence[Variant]) -> Clean:
        kinds = sorted({"resid_pre", *(v.kind for v in variants)})  # the engine starts every row from the residual stream
        target = run_cached(self.model, self.adapter, pair.target, self.refusal_ids, kinds)
        source = run_cached(self.model, self.adapter, pair.source, self.refusal_ids, kinds)
        return Clean(target.score, source.score, (target, source))

    def patch(self, clean: Clean, pair: Pair, variants: Sequence[Variant]) -> np.ndarray:
        target, source = clean.state
        return patch_fast(self.adapter, target, source, variants, self.refusal_ids).numpy()


def positions(pair: Pair, variant: Variant) -> tuple[list[int], list[int]]:
    """The target and source positions a variant copies between, from its offsets."""
    t, s = pair.target.shape[1], pair.source.shape[1]
    return [t + o for o in variant.offsets], [s + o for o in variant.offsets]


def score(logits: torch.Tensor, refusal_ids: list[int]) -> float:
    return float(refusal_score(logits[0, -1], refusal_ids))


class TransformerLens(Tool):
    """TransformerLens: ``run_with_cache`` on the source, then ``run_with_hooks`` on the target per component."""

    HOOKS = {"resid_pre": "blocks.{}.hook_resid_pre", "head_z": "blocks.{}.attn.hook_z",
             "attn_out": "blocks.{}.hook_attn_out", "mlp_out": "blocks.{}.hook_mlp_out"}

    def __init__(self, name: str, model: Any, refusal_ids: list[int]) -> None:
        self.name, self.model, self.refusal_ids = name, model, refusal_ids

    def clean(self, pair: Pair, variants: Sequence[Variant]) -> Clean:
        names = {self.HOOKS[v.kind].format(v.layer) for v in variants}
        with torch.no_grad():
            logits, cache = self.model.run_with_cache(pair.source, names_filter=lambda name: name in names)
            return Clean(score(self.model(pair.target), self.refusal_ids), score(logits, self.refusal_ids), cache)

    def patch(self, clean: Clean, pair: Pair, variants: Sequence[Variant]) -> np.ndarray:
        patched = []
        with torch.no_grad():
            for variant in variants:
                to, frm = positions(pair, variant)
                name = self.HOOKS[variant.kind].format(variant.layer)
                cached = clean.state[name]

                def hook(act: torch.Tensor, hook: Any, to: list[int] = to, frm: list[int] = frm, cached: torch.Tensor = cached,
                         head: int | None = variant.head) -> torch.Tensor:
                    if head is None:
                        act[:, to] = cached[:, frm]
                    else:
                        act[:, to, head] = cached[:, frm, head]
                    return act

                patched.append(score(self.model.run_with_hooks(pair.target, fwd_hooks=[(name, hook)]), self.refusal_ids))
        return np.array(patched)


class NNsight(Tool):
    """nnsight: one ``trace`` of the source saving the sites, then one ``trace`` of the target per component.

    The sites are found from refusal_lab's architecture adapter (the module each kind hooks), so no
    module path is spelled here.
    """

    name = "nnsight"
    ORDER = ("resid_pre", "head_z", "attn_out", "mlp_out")  # within a layer, the order the model reaches them

    def __init__(self, model: torch.nn.Module, tokenizer: Any, refusal_ids: list[int]) -> None:
        from nnsight import LanguageModel

        self.adapter = adapter_for(model)
        self.lm = LanguageModel(model, tokenizer=tokenizer)
        self.names = {module: name for name, module in model.named_modules()}
        self.refusal_ids = refusal_ids

    def envoy(self, module: torch.nn.Module) -> Any:
        envoy = self.lm
        for part in self.names[module].split("."):
            envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
        return envoy

    def port(self, kind: str, layer: int) -> Any:
        """The value a variant of ``kind`` patches, as nnsight exposes it inside a trace."""
        if kind == "resid_pre":
            return self.envoy(self.adapter.layer(layer)).input
        if kind == "head_z":
            return self.envoy(self.adapter.head_output_proj(layer)).input
        out = self.envoy(self.adapter.attn_output(layer) if kind == "attn_out" else self.adapter.mlp_output(layer)).output
        return out[0] if kind == "attn_out" else out

    def clean(self, pair: Pair, variants: Sequence[Variant]) -> Clean:
        sites = sorted({(v.layer, v.kind) for v in variants}, key=lambda site: (site[0], self.ORDER.index(site[1])))
        # nnsight runs a trace's body apart from this function's frame: what it saves goes into objects made out here.
        saved: dict[Any, Any] = {}
        with torch.no_grad():
            with self.lm.trace(pair.source):
                for site in sites:
                    saved[site] = self.port(site[1], site[0]).save()
                saved["logits"] = self.lm.output.logits.save()
            with self.lm.trace(pair.target):
                saved["target logits"] = self.lm.output.logits.save()
        return Clean(score(saved.pop("target logits"), self.refusal_ids), score(saved.pop("logits"), self.refusal_ids), saved)

    def patch(self, clean: Clean, pair: Pair, variants: Sequence[Variant]) -> np.ndarray:
        d_head = self.adapter.d_head
        patched: list[Any] = []
        with torch.no_grad():
            for variant in variants:
                to, frm = positions(pair, variant)
                cached = clean.state[(variant.layer, variant.kind)]
                cols = slice(variant.head * d_head, (variant.head + 1) * d_head) if variant.head is not None else slice(None)
                with self.lm.trace(pair.target):
                    self.port(variant.kind, variant.layer)[:, to, cols] = cached[:, frm, cols]
                    patched.append(self.lm.output.logits.save())
        return np.array([score(logits, self.refusal_ids) for logits in patched])


def nnsight_tool(loaded: Any, refusal_ids: list[int]) -> Tool:
    return NNsight(copy.deepcopy(loaded.model), loaded.tokenizer, refusal_ids)


def bridge_tool(loaded: Any, refusal_ids: list[int]) -> Tool:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model_folder(loaded), hf_model=copy.deepcopy(loaded.model),
                                                 tokenizer=loaded.tokenizer, device="cpu")
    return TransformerLens("TL TransformerBridge", bridge, refusal_ids)


def hooked_tool(loaded: Any, refusal_ids: list[int]) -> Tool:
    """HookedTransformer (TransformerLens before 4.0) on the model's weights, unprocessed (no folded norms, no centring).

    ``from_pretrained`` accepts only the models TransformerLens lists; its config and weight converters
    take a local folder, so they are called directly.
    """
    from transformer_lens import HookedTransformer, loading

    folder = model_folder(loaded)
    cfg = loading.get_pretrained_model_config(folder, fold_ln=False, device="cpu", dtype=torch.float32)
    hooked = HookedTransformer(cfg, tokenizer=loaded.tokenizer)
    hooked.load_and_process_state_dict(loading.get_pretrained_state_dict(folder, cfg, hf_model=copy.deepcopy(loaded.model)),
                                       fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    return TransformerLens("TL HookedTransformer", hooked.eval(), refusal_ids)


PEERS: dict[str, Callable[[Any, list[int]], Tool]] = {"nnsight": nnsight_tool, "bridge": bridge_tool, "hooked": hooked_tool}


def peers(loaded: Any, refusal_ids: list[int], names: Sequence[str]) -> tuple[list[Tool], list[str]]:
    """The peers asked for that load here, each on its own copy of the model (TransformerBridge rewires the one it gets)."""
    tools: list[Tool] = []
    missing = []
    for name in names:
        try:
            tools.append(PEERS[name](loaded, refusal_ids))
        except (ImportError, AttributeError) as error:  # HookedTransformer: removed in TransformerLens 4.0
            missing.append(f"{name}: {str(error).splitlines()[0]}")
    return tools, missing


def model_folder(loaded: Any) -> str:
    """A folder holding the model's config, which TransformerLens reads to choose its architecture."""
    location = Path(loaded.source.location)
    if location.is_dir() and (location / "config.json").is_file():
        return str(location)
    folder = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    loaded.model.config.save_pretrained(folder)
    return str(folder)


def matmul_gflops(size: int = 3072, repeats: int = 5) -> float:
    """The best of ``repeats`` fp32 ``size`` x ``size`` matrix multiplies on this machine, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b))[0] for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def build_pairs(cfg: Any, tokenizer: Any, which: str) -> list[Pair]:
    system_prompt = cfg.model.get("system_prompt")

    def ids(prompt: str) -> torch.Tensor:
        return tokenizer(format_chat(tokenizer, prompt, system_prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]

    pairs = []
    if which in ("both", "peer"):
        harmful, harmless = ids(PEER_TASK[0]), ids(PEER_TASK[1])
        pairs.append(Pair("peer task", harmful, harmless, harmful.shape[1]))
    if which in ("both", "shipped"):
        post_instruction = post_instruction_tokens(tokenizer, system_prompt)
        for harmful_record, harmless_record in balanced_order(load_prompt_set(cfg.prompts.path).select(split="test").pairs()):
            harmful, harmless = ids(harmful_record.prompt), ids(harmless_record.prompt)
            if harmful.shape[1] != harmless.shape[1]:
                pairs.append(Pair(f"shipped pair {harmful_record.pair_id}", harmful, harmless, shared_span(harmful, harmless, post_instruction)))
                break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the peer task only, on the first, middle and last layer")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for the model, e.g. model=smollm2")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--pairs", choices=["both", "peer", "shipped"], default="both", help="the peer task, the shipped pair, or both")
    parser.add_argument("--profile", action="store_true", help="also profile refusal_lab's sweeps: where the time goes, by operator")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of {', '.join(PEERS)}; those that do not import are reported")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=list(args.overrides))
    loaded = prepare_model(cfg)
    if loaded.precision.name != "fp32":
        raise SystemExit("the peers are compared in fp32; leave quant at its default")
    adapter, tokenizer = loaded.adapter, loaded.tokenizer
    refusal_ids = refusal_token_ids(tokenizer, list(cfg.model.refusal_tokens))
    tools: list[Tool] = [RefusalLab(loaded.model, adapter, refusal_ids)]
    asked = [name for name in args.peers.split(",") if name]
    if unknown := sorted(set(asked) - set(PEERS)):
        raise SystemExit(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    found, missing = peers(loaded, refusal_ids, asked)
    tools += found
    layers = [0, adapter.n_layers // 2, adapter.n_layers - 1] if args.quick else list(range(adapter.n_layers))
    peak = matmul_gflops()
    versions = {name: _version(name) for name in ("torch", "transformers", "nnsight", "transformer-lens")}
    print(f"{loaded.name}, fp32, {torch.get_num_threads()} threads; {', '.join(t.name for t in tools)}")
    print("  " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    for line in missing:
        print(f"  not run: {line}")
    print(f"fp32 3072 x 3072 matrix multiply: {peak:.0f} GFLOP/s (best of 5)")

    report: dict[str, Any] = {"model": loaded.name, "threads": torch.get_num_threads(), "versions": versions, "matmul_gflops": peak, "layers": layers, "pairs": []}
    for pair in build_pairs(cfg, tokenizer, "peer" if args.quick else args.pairs):
        with torch.no_grad():
            plain_s = min(_timed(lambda: loaded.model(input_ids=pair.target))[0] for _ in range(5))
        plain_gflops = forward_flops(adapter, pair.target.shape[1]) / plain_s / 1e9
        print(f"\n{pair.describe()}; a plain forward pass: {plain_s * 1000:.0f} ms, {plain_gflops:.0f} GFLOP/s "
              f"({plain_gflops / peak:.0%} of the matmul)")
        sweeps = {name: make(layers, adapter.n_heads, pair.aligned) for name, make in SWEEPS.items()}
        cleans, clean_seconds = {}, {}
        for tool in tools:  # each tool's clean runs of the pair, kept for all its sweeps
            clean_seconds[tool.name], cleans[tool.name] = _timed(lambda: tool.clean(pair, [v for vs in sweeps.values() for v in vs]))
        print("  clean runs, once per pair: " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in clean_seconds.items()))
        rows = []
        for sweep, variants in sweeps.items():
            measured = {}
            for tool in tools:
                clean = cleans[tool.name]
                seconds, patched = _timed(lambda: tool.patch(clean, pair, variants))
                measured[tool.name] = {"seconds": seconds, "effects": normalised_effect(patched, clean.target_score, clean.source_score)}
                print(f"  {sweep}: {tool.name} {seconds:.2f} s", flush=True)
            ours = measured["refusal_lab"]
            needed = needed_flops(adapter, *cleans["refusal_lab"].state, variants)
            row = {"sweep": sweep, "components": len(variants), "seconds": {k: v["seconds"] for k, v in measured.items()},
                   "needed_gflop": needed / 1e9, "engine_gflops": needed / ours["seconds"] / 1e9, "peers": {}}
            for name, theirs in measured.items():
                if name != "refusal_lab":
                    row["peers"][name] = {
                        "speedup": theirs["seconds"] / ours["seconds"],
                        "pearson_r": float(stats.pearsonr(ours["effects"], theirs["effects"]).statistic),
                        "max_abs_diff": float(np.abs(ours["effects"] - theirs["effects"]).max()),
                    }
            rows.append(row)
        print_table(rows, [t.name for t in tools[1:]], peak)
        if args.profile:
            for sweep, variants in sweeps.items():
                print_profile(sweep, lambda: tools[0].patch(cleans["refusal_lab"], pair, variants))
        report["pairs"].append({"pair": pair.describe(), "plain_forward_s": plain_s, "plain_forward_gflops": plain_gflops,
                                "clean_seconds": clean_seconds, "sweeps": rows})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


def print_profile(sweep: str, run: Callable[[], Any], shown: int = 6) -> None:
    """The operators that take refusal_lab's time on a sweep, as shares of it (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    shares = ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}" for e in events[:shown])
    print(f"  profile, {sweep}: {shares}")


def print_table(rows: list[dict[str, Any]], peer_names: list[str], peak: float) -> None:
    print(f"\n  {'sweep':<26} {'components':>10} {'refusal_lab s':>13} " + " ".join(f"{n:>22}" for n in peer_names))
    for row in rows:
        cells = [f"{row['seconds'][n]:7.1f} s {row['peers'][n]['speedup']:6.1f}x" for n in peer_names]
        print(f"  {row['sweep']:<26} {row['components']:>10} {row['seconds']['refusal_lab']:>13.2f} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\n  {'sweep':<26} " + " ".join(f"{'r, max |diff| ' + n:>40}" for n in peer_names)
          + f" {'needed GFLOP':>13} {'engine GFLOP/s':>15} {'of matmul':>10}")
    for row in rows:
        cells = [f"{1 - row['peers'][n]['pearson_r']:.1e} (1 - r), {row['peers'][n]['max_abs_diff']:.1e}" for n in peer_names]
        print(f"  {row['sweep']:<26} " + " ".join(f"{c:>40}" for c in cells)
              + f" {row['needed_gflop']:>13.1f} {row['engine_gflops']:>15.0f} {row['engine_gflops'] / peak:>10.0%}")


if __name__ == "__main__":
    main()
