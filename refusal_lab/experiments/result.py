"""What every experiment hands back. Imports nothing else from the package, so the tracker, the
results writer and the experiments can all depend on it without depending on each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExperimentResult:
    """What an experiment hands back; the runner writes it to disk and to W&B.

    metrics: flat scalars with ``/`` in their keys (``refusal_rate/harmful``), what a sweep compares.
    details: anything else JSON can hold (per-category tables, token ids).
    tables: named row lists, each written as ``results/<experiment>_<name>.jsonl`` and a W&B table.
    files: what the experiment wrote itself (dashboards, figures, arrays), by name; the runner lists
        them in the results file and the tracker uploads them (HTML and PNG files also as media).
    handoffs: typed findings a later stage of the same run takes (``refusal_lab.findings``: a
        ``Ranking`` per patching direction, the chosen ``Direction``); not written anywhere by themselves.
    """

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    handoffs: list[Any] = field(default_factory=list)
