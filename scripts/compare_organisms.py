"""Compare organism recipes on the prompts their runs share: the trade-off table of the README.

Each argument is the output folder of one `experiment=organism` run (its `results/organism_completions.jsonl`).
Runs made at different times may have measured different versions of an evaluation set, so every figure
is computed on the prompts that every run answered, per evaluation set:

    python scripts/compare_organisms.py RUN [RUN ...] [--names A B ...] [--sets heldout contrastive]

For each set and run it prints the organism's refusal rate on harmful prompts and per kind of harmless
prompt (everyday requests, contrastive twins), the refusal score's AUROC, and the mean per-token
KL(base || organism) along the base model's harmless answers; the base model's row comes from the first run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from refusal_lab.experiments.baseline import summarize


def completions(run: Path) -> list[dict[str, Any]]:
    path = run / "results" / "organism_completions.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run} holds no results/organism_completions.jsonl: give the folder of an experiment=organism run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    metrics, _ = summarize(rows)
    kl = [r["kl_to_base"] for r in rows if r["label"] == "harmless" and not math.isnan(r.get("kl_to_base", math.nan))]
    return {
        "harmful": metrics.get("refusal_rate/harmful", math.nan),
        "harmless": metrics.get("refusal_rate/harmless", math.nan),
        **{kind: metrics[f"kind/{kind}/refusal_rate"] for kind in ("everyday", "twin") if f"kind/{kind}/refusal_rate" in metrics},
        "auroc": metrics.get("refusal_score/auroc", math.nan),
        "kl": sum(kl) / len(kl) if kl else math.nan,
        "n_harmful": metrics.get("n_prompts/harmful", 0),
        "n_harmless": metrics.get("n_prompts/harmless", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--names", nargs="+", help="one per run (default: the folder names)")
    parser.add_argument("--sets", nargs="+", help="evaluation sets to show (default: every set all runs measured)")
    args = parser.parse_args()
    names = args.names or [run.name for run in args.runs]
    if len(names) != len(args.runs):
        raise SystemExit(f"{len(names)} names for {len(args.runs)} runs")
    tables = [completions(run) for run in args.runs]
    splits = {row["split"] for table in tables for row in table}
    shared = set.intersection(*({(r["set"], r["prompt"]) for r in table if r["model"] == "organism"} for table in tables))
    sets = args.sets or sorted({name for name, _ in shared})
    print(f"split {', '.join(sorted(str(s) for s in splits))}; figures on the prompts every run answered\n")
    print("| set | model | harmful refused | everyday refused | twins refused | harmless refused | AUROC | KL to base |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for set_name in sets:
        keys = {key for key in shared if key[0] == set_name}
        if not keys:
            raise SystemExit(f"no prompt of set {set_name!r} was answered by every run")
        rows = [("base", [r for r in tables[0] if r["model"] == "base" and (r["set"], r["prompt"]) in keys])]
        rows += [(name, [r for r in table if r["model"] == "organism" and (r["set"], r["prompt"]) in keys]) for name, table in zip(names, tables)]
        for name, chosen in rows:
            f = figures(chosen)
            print(f"| {set_name} ({f['n_harmful']:.0f} + {f['n_harmless']:.0f}) | {name} | {_cell(f, 'harmful')} | {_cell(f, 'everyday')} | "
                  f"{_cell(f, 'twin')} | {_cell(f, 'harmless')} | {_cell(f, 'auroc', False)} | {'' if name == 'base' else _cell(f, 'kl', False)} |")


def _cell(figures: dict[str, float], key: str, percent: bool = True) -> str:
    value = figures.get(key, math.nan)
    return "" if math.isnan(value) else f"{100 * value:.1f} %" if percent else f"{value:.3f}"


if __name__ == "__main__":
    main()
