"""Results on disk: ``results/<experiment>.json`` plus one JSONL file per table.

Written before anything is sent to W&B, so a tracker failure can never lose them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lab.config import PACKAGE_DIR, redact_secrets
from refusal_lab.errors import Interrupted
from refusal_lab.experiments.result import ExperimentResult

_PACKAGES = (
    "refusal-lab", "torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "gguf",
    "hydra-core", "omegaconf", "wandb", "numpy", "peft",
)


@dataclass(frozen=True)
class ResultFiles:
    results: Path
    tables: dict[str, Path]
    files: dict[str, Path]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["refusal_lab_git_commit"] = _git_commit()
    return versions


def write_results(output_dir: Path, experiment: str, result: ExperimentResult, provenance: dict[str, Any]) -> ResultFiles:
    """Write the results file and its tables; every value passes the secret filter."""
    folder = output_dir / "results"
    folder.mkdir(parents=True, exist_ok=True)
    tables: dict[str, Path] = {}
    for name, rows in result.tables.items():
        path = folder / f"{experiment}_{name}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(redact_secrets(row), ensure_ascii=False) + "\n")
        tables[name] = path
    document = {
        "experiment": experiment,
        "status": "finished",
        "metrics": result.metrics,
        "details": result.details,
        "tables": {name: path.name for name, path in tables.items()},
        "files": {name: str(path.relative_to(output_dir)) if path.is_relative_to(output_dir) else str(path) for name, path in result.files.items()},
        **provenance,
    }
    return ResultFiles(_write_document(folder / f"{experiment}.json", document), tables, dict(result.files))


def write_failure(output_dir: Path, experiment: str, error: BaseException, provenance: dict[str, Any]) -> Path:
    """A failed or interrupted run's results file: what failed and why, beside whatever it had written, so a
    sweep's comparison reports the job as failed (or interrupted) instead of missing."""
    document = {
        "experiment": experiment,
        "status": "interrupted" if isinstance(error, Interrupted) else "failed",
        "error": {"type": type(error).__name__, "message": str(error), "traceback": traceback.format_exc(limit=-8)},
        "metrics": {},
        **provenance,
    }
    return _write_document(output_dir / "results" / f"{experiment}.json", document)


def _write_document(path: Path, document: dict[str, Any]) -> Path:
    """Written beside and renamed into place: a run stopped mid-write never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(_finite(redact_secrets(document)), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity; write them as null rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _git_commit() -> str | None:
    """The commit of a refusal_lab checkout; None for an installed copy, even one inside another git repository."""
    try:
        out = subprocess.run(
            ["git", "-C", str(PACKAGE_DIR), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if len(lines) != 2 or Path(lines[0]).resolve() != PACKAGE_DIR.parent.resolve():
        return None
    return lines[1]
