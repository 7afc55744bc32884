"""Writing a comparison: ``comparison.json`` (the results file) and ``comparison.html`` (the report) in the
sweep folder, and, where the jobs logged to W&B, one more run in the sweep's group with both."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from refusal_lab.compare.measures import Job
from refusal_lab.viz.comparison import write_comparison_page

log = logging.getLogger(__name__)


def write_comparison(folder: Path, document: dict[str, Any]) -> tuple[Path, Path]:
    results = folder / "comparison.json"
    results.write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return results, write_comparison_page(document, folder / "comparison.html")


def log_to_wandb(jobs: list[Job], document: dict[str, Any], page: Path, folder: Path) -> str | None:
    """A ``comparison`` run in the jobs' W&B group (their project, entity and mode): the table and the report.
    Skipped where the jobs did not log to W&B; a W&B failure is a warning, never a lost report."""
    logged = [r for job in jobs for r in job.results.values() if (r.config.get("logger") or {}).get("name") == "wandb"]
    if not logged:
        return None
    settings, group = logged[0].config["logger"], logged[0].document.get("job", {}).get("sweep")
    try:
        import wandb

        run = wandb.init(project=settings.get("project"), entity=settings.get("entity"), group=group, job_type="comparison",
                         name="comparison", dir=str(folder), mode=settings.get("mode") or "offline", reinit="finish_previous",
                         settings=wandb.Settings(console="off", silent=True))
        columns = table_columns(document["jobs"])
        run.log({"comparison/jobs": wandb.Table(columns=columns, data=[[_cell(row.get(c)) for c in columns] for row in flat_rows(document)]),
                 "comparison/report": wandb.Html(page.read_text(encoding="utf-8"))})
        where = run.dir
        run.finish()
        return str(Path(where).parent)
    except Exception as error:  # noqa: BLE001 - the report on disk is complete
        log.warning("W&B logging of the comparison failed (%s); %s is complete", error, page)
        return None


def flat_rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per job: the setting's keys become columns, failures one text column."""
    rows = []
    for row in document["jobs"]:
        flat = {k: v for k, v in row.items() if k not in ("setting", "failures")}
        flat.update(row["setting"])
        flat["failures"] = "; ".join(f"{k}: {v}" for k, v in row["failures"].items())
        rows.append(flat)
    return rows


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: dict[str, None] = {}
    for row in flat_rows({"jobs": rows}):
        columns.update(dict.fromkeys(row))
    return list(columns)


def _cell(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value)
