"""Writing a comparison: ``comparison.json`` (the results file) and ``comparison.html`` (the report) in the
sweep folder, and, where the jobs logged to W&B, one more run in the sweep's group with both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from refusal_lab.compare.measures import Job
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.tracking.results import ResultFiles
from refusal_lab.tracking.wandb_tracker import JobInfo, WandbTracker
from refusal_lab.viz.comparison import write_comparison_page


def write_comparison(folder: Path, document: dict[str, Any]) -> tuple[Path, Path]:
    results = folder / "comparison.json"
    results.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return results, write_comparison_page(document, folder / "comparison.html")


def log_to_wandb(jobs: list[Job], document: dict[str, Any], results: Path, page: Path, folder: Path) -> str | None:
    """A ``comparison`` run in the jobs' W&B group (their project, entity and mode), through the jobs' own tracker:
    the jobs table and the report. Skipped where the jobs did not log to W&B; a W&B failure is a warning."""
    logged = [r for job in jobs for r in job.results.values() if (r.config.get("logger") or {}).get("name") == "wandb"]
    if not logged:
        return None
    job = JobInfo(output_dir=folder, sweep_name=logged[0].document.get("job", {}).get("sweep"), name="comparison")
    tracker = WandbTracker(OmegaConf.create(logged[0].config["logger"]), job, "comparison", {"sweep_folder": str(folder)})
    tracker.start()
    tracker.log("comparison", ExperimentResult(metrics={}, tables={"jobs": flat_rows(document)}, files={"report": page}),
                ResultFiles(results, {}, {"report": page}))
    where = tracker.describe()
    tracker.finish(failed=False)
    return where


def flat_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per job: the setting's keys become columns, failures one text column."""
    rows = []
    for row in document["jobs"]:
        flat = {k: v for k, v in row.items() if k not in ("setting", "failures")}
        flat.update(row["setting"])
        flat["failures"] = "; ".join(f"{k}: {v}" for k, v in row["failures"].items())
        rows.append(flat)
    return rows
