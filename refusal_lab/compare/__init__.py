"""Comparing the jobs of a multirun sweep: ``python -m refusal_lab.compare multirun/<date>/<time>_<name>``, and by
itself at the end of every sweep (``refusal_lab.compare.callback.CompareCallback``, in conf/hydra/default.yaml).

It gathers the job folders' results files, measures each job against its full-precision reference
(``measures.py``), and writes ``comparison.json`` and ``comparison.html`` into the sweep folder, also
to W&B in the sweep's group where the jobs logged there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from refusal_lab import metric_keys as K
from refusal_lab.compare.measures import compare, gather
from refusal_lab.compare.report import log_to_wandb, write_comparison

__all__ = ["compare_sweep"]

log = logging.getLogger(__name__)


def compare_sweep(folder: str | Path, wandb: bool = True) -> dict[str, Any]:
    """Compare the jobs of ``folder``, write the report, and return the comparison document."""
    folder = Path(folder)
    jobs = gather(folder)
    document = compare(jobs)
    results, page = write_comparison(folder, document)
    where = log_to_wandb(jobs, document, results, page, folder) if wandb else None
    for row in document["jobs"]:
        log.info("%s", summary_line(row))
    log.info("Comparison:  %s", results)
    log.info("Report:      %s", page)
    if where:
        log.info("W&B run:     %s", where)
    if document["n_failed"]:
        log.error("%d of %d jobs failed or left no results: %s", document["n_failed"], len(jobs),
                  ", ".join(r["job"] for r in document["jobs"] if r["status"] != "finished"))
    return document


def summary_line(row: dict[str, Any]) -> str:
    """One job in a line: its status, then the figures that answer whether the mechanism survived."""
    if row["status"] != "finished":
        return f"{row['job']}: {row['status']}" + (f" ({'; '.join(row['failures'].values())})" if row["failures"] else "")
    parts = [f"{row['job']} [{row['precision']}]"]
    for key, label, form in (
        (K.HARMFUL_REFUSAL, "refused harmful", "{:.0%}"), (K.HARMLESS_REFUSAL, "harmless", "{:.0%}"),
        (K.SEPARATION, "separation", "{:.2f}"),
        (K.PATCHING_LAYERS, "layers", "{}"), (K.compared_patching("harmless_to_harmful", "top"), "top harmless->harmful", "{}"),
        (K.compared_patching("harmless_to_harmful", "spearman"), "patching rho vs fp32", "{:.3f}"),
        (K.compared_patching("harmless_to_harmful", "top_k_overlap"), "top-10 overlap", "{:.0%}"),
        (K.DIRECTION_COSINE, "direction cosine", "{:.3f}"),
        (K.direction_refusal("harmful", "ablation"), "refused when ablated", "{:.0%}"),
        (K.direction_refusal("harmless", "addition"), "refused when added", "{:.0%}"),
        (K.COMPARED_ABLATION_K, "ablated k", "{}"), (K.compared_ablation("top", "refusal_rate"), "refused, top-k ablated", "{:.0%}"),
        (K.compared_ablation("random", "refusal_rate"), "k random ablated", "{:.0%}"),
        (K.ABLATION_NECESSARY, "necessary at matched damage", "{}"),
    ):
        if row.get(key) is not None:
            broken = key == K.compared_ablation("top", "refusal_rate") and row.get(K.compared_ablation("top", "broken"))
            parts.append(f"{label} {form.format(row[key])}" + (" (model broken: not evidence of necessity)" if broken else ""))
    return ", ".join(parts)
