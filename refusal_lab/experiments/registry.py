"""Experiments by name: ``experiment.name`` in the config picks one; an unknown name lists the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lab.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from refusal_lab.runner import Runner


@dataclass
class ExperimentResult:
    """What an experiment hands back; the runner writes it to disk and to W&B.

    metrics: flat scalars with ``/`` in their keys (``refusal_rate/harmful``), what a sweep compares.
    details: anything else JSON can hold (per-category tables, token ids).
    tables: named row lists, each written as ``results/<experiment>_<name>.jsonl`` and a W&B table.
    files: what the experiment wrote itself (dashboards, figures, arrays), by name; the runner lists
        them in the results file and the tracker uploads them (HTML and PNG files also as media).
    """

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


ExperimentFn = Callable[["Runner", "DictConfig"], ExperimentResult]


CheckFn = Callable[["DictConfig"], Any]


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    run: ExperimentFn
    needs_pairs: bool
    check: CheckFn | None = None  # raises ConfigError for bad settings, before the model loads


_EXPERIMENTS: dict[str, ExperimentSpec] = {}


def register_experiment(name: str, *, needs_pairs: bool = False, check: CheckFn | None = None) -> Callable[[ExperimentFn], ExperimentFn]:
    def decorate(fn: ExperimentFn) -> ExperimentFn:
        if name in _EXPERIMENTS:
            raise ValueError(f"experiment {name!r} is registered twice")
        _EXPERIMENTS[name] = ExperimentSpec(name, fn, needs_pairs, check)
        return fn

    return decorate


def known_experiments() -> list[str]:
    return sorted(_EXPERIMENTS)


def get_experiment(name: str) -> ExperimentSpec:
    if name not in _EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known experiments: {', '.join(known_experiments())}")
    return _EXPERIMENTS[name]
