"""One W&B run per Hydra job; offline by default, and never fatal to the run's results.

Every call into wandb is guarded: a W&B failure is logged as a warning and the experiment's
files on disk stay as they are.
"""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from refusal_lab.config import redact_secrets
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.tracking.results import ResultFiles

log = logging.getLogger(__name__)

_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class JobInfo:
    """Where this job sits: its output folder and, in a multirun, its sweep."""

    output_dir: Path
    sweep_name: str | None = None  # shared by every job of one multirun
    job_num: int | None = None
    overrides: list[str] | None = None  # the command line's overrides, secrets redacted
    name: str | None = None  # in a multirun, the job's folder name (``2_quant=4bit``), secrets redacted


class NullTracker:
    """``logger=none``: results go to disk only."""

    def start(self) -> None:
        pass

    def log(self, stage: str, result: ExperimentResult, files: ResultFiles) -> None:
        pass

    def finish(self, failed: bool) -> None:
        pass

    def describe(self) -> str | None:
        return None


class WandbTracker:
    def __init__(self, logger_cfg: Any, job: JobInfo, experiment: str, config: dict[str, Any]) -> None:
        self.cfg = logger_cfg
        self.job = job
        self.experiment = experiment
        self.config = config
        self.mode = str(logger_cfg.get("mode") or "offline")
        self.run: Any = None

    def validate(self) -> None:
        """Problems the user must fix; checked before the model loads."""
        if self.mode not in _MODES:
            raise ConfigError(f"logger.mode={self.mode!r}; use one of {', '.join(_MODES)}")
        if self.mode == "online" and not _has_wandb_key():
            raise ConfigError(
                "logger.mode=online needs a W&B API key: set WANDB_API_KEY or run `wandb login`; "
                "or keep the default offline mode and `wandb sync` the run later"
            )

    def start(self) -> None:
        try:
            import wandb

            self.run = wandb.init(
                project=str(self.cfg.project),
                entity=self.cfg.get("entity"),
                group=self.cfg.get("group") or self.job.sweep_name,
                job_type=self.experiment,
                name=self.job.name or self.experiment,  # a multirun's jobs are told apart by their overrides
                tags=list(self.cfg.get("tags") or []),
                config=self.config,
                dir=str(self.job.output_dir),
                mode=self.mode,
                reinit="finish_previous",
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as error:  # noqa: BLE001 - a tracker must never stop the experiment
            log.warning("W&B could not start (%s); results are still written to disk", error)
            self.run = None

    def log(self, stage: str, result: ExperimentResult, files: ResultFiles) -> None:
        """One experiment's (or pipeline stage's) metrics, tables, pages and files, its tables and pages named for it."""
        if self.run is None:
            return
        try:
            import wandb

            self.run.log(dict(result.metrics))
            self.run.summary.update(dict(result.metrics))
            for name, rows in result.tables.items():
                if rows:
                    columns = table_columns(rows)
                    data = [[_cell(row.get(c)) for c in columns] for row in redact_secrets(rows)]
                    self.run.log({f"{stage}/{name}": wandb.Table(columns=columns, data=data)})
            for name, path in files.files.items():
                if path.suffix == ".html":
                    self.run.log({f"{stage}/{name}": wandb.Html(path.read_text(encoding="utf-8"))})
                elif path.suffix == ".png":
                    self.run.log({f"{stage}/{name}": wandb.Image(str(path))})
            artifact = wandb.Artifact(f"{stage}-results", type="results")
            artifact.add_file(str(files.results))
            for path in [*files.tables.values(), *files.files.values()]:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B logging failed (%s); the results on disk are complete", error)

    def finish(self, failed: bool) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as error:  # noqa: BLE001
            log.warning("W&B run did not close cleanly (%s)", error)

    def describe(self) -> str | None:
        if self.run is None:
            return None
        if self.mode == "offline":
            folder = Path(self.run.dir).parent
            return f"{folder} (offline; upload with `wandb sync {folder}`)"
        return getattr(self.run, "url", None) or self.run.dir


def make_tracker(logger_cfg: Any, job: JobInfo, experiment: str, config: dict[str, Any]) -> WandbTracker | NullTracker:
    name = logger_cfg.get("name") if logger_cfg else "none"
    if name in (None, "none"):
        return NullTracker()
    if name != "wandb":
        raise ConfigError(f"unknown logger {name!r}; use logger=wandb or logger=none")
    tracker = WandbTracker(logger_cfg, job, experiment, config)
    tracker.validate()
    return tracker


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key any row has, in the order they first appear: a column only later rows have is kept."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _cell(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
