"""Reading results back: the one loader of a run's results file, its tables and its array files.

It needs the files alone (no model, no config), so runs made on another machine, copied over, read the
same way. Paths inside a results file are relative to the run's folder where they can be, and are read
relative to where the file now lies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.errors import ConfigError


@dataclass(frozen=True)
class RunResults:
    """One run's ``results/<experiment>.json`` and what it points to."""

    path: Path
    document: dict[str, Any] = field(repr=False)

    @classmethod
    def read(cls, path: str | Path) -> RunResults:
        path = Path(path)
        return cls(path, json.loads(path.read_text(encoding="utf-8")))

    @property
    def experiment(self) -> str:
        return str(self.document["experiment"])

    @property
    def metrics(self) -> dict[str, float]:
        return self.document["metrics"]

    @property
    def details(self) -> dict[str, Any]:
        return self.document["details"]

    @property
    def precision(self) -> str:
        return str(self.document["model"]["precision"])

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was made with (secrets redacted)."""
        return self.document["config"]

    @property
    def run_folder(self) -> Path:
        """The job's folder (``results/`` sits in it)."""
        return self.path.parent.parent

    def table(self, name: str) -> list[dict[str, Any]]:
        """A table's rows (``results/<experiment>_<name>.jsonl``)."""
        tables = self.document.get("tables", {})
        if name not in tables:
            raise ConfigError(f"{self.path} has no table {name!r}; it has {', '.join(tables) or 'none'}")
        with (self.path.parent / tables[name]).open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def file(self, name: str) -> Path:
        """A file the experiment wrote (dashboard, arrays, exported model), wherever the run folder now is."""
        files = self.document.get("files", {})
        if name not in files:
            raise ConfigError(f"{self.path} lists no file {name!r}; it lists {', '.join(files) or 'none'}")
        stored = Path(files[name])
        return stored if stored.is_absolute() else self.run_folder / stored

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """A safetensors file of the run as numpy arrays (patching's ``effects``, the direction's ``vectors``)."""
        from safetensors.numpy import load_file

        return load_file(str(self.file(name)))


def load_results(where: str | Path, experiment: str | None = None) -> RunResults:
    """A run's results from its results file, its ``results/`` folder or its job folder; ``experiment``
    picks one where the folder holds several."""
    path = Path(where)
    if path.is_file():
        return RunResults.read(path)
    if not path.is_dir():
        raise ConfigError(f"{where} does not exist; give a run's folder, its results/ folder or its results file")
    folder = path / "results" if (path / "results").is_dir() else path
    found = [r for r in _results_files(folder.glob("*.json")) if experiment is None or r.experiment == experiment]
    if len(found) != 1:
        what = f"results/{experiment}.json" if experiment else "one results/<experiment>.json"
        raise ConfigError(f"{where} holds {len(found)} results files, not {what}" + (f": {', '.join(r.path.name for r in found)}" if found else ""))
    return found[0]


def find_results(folder: str | Path) -> list[RunResults]:
    """Every run's results under ``folder`` (a multirun sweep folder, say), in path order."""
    return _results_files(Path(folder).glob("**/results/*.json"))


def _results_files(candidates: Any) -> list[RunResults]:
    """Results files among the JSON files of results folders: those named for the experiment they hold, with
    metrics (an experiment may write other JSON beside its results). The ablation's ranking pass writes one
    of its own, ``ablation_ranking.json``."""
    found = []
    for path in sorted(candidates):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(document, dict) and document.get("experiment") == path.stem and "metrics" in document:
            found.append(RunResults(path, document))  # read once: a patching results file runs to megabytes
    return found
