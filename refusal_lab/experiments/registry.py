"""Experiments by name: ``experiment.name`` in the config picks one; an unknown name lists the rest."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.result import ExperimentResult

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from refusal_lab.experiments.context import ExperimentContext


ExperimentFn = Callable[["ExperimentContext"], ExperimentResult]


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


# The modules that register the built-in experiments, imported on first look-up.
BUILTIN = ("abliteration", "ablation", "baseline", "direction", "organism", "patching")


def _load_builtin() -> None:
    import importlib

    for module in BUILTIN:
        importlib.import_module(f"refusal_lab.experiments.{module}")


def known_experiments() -> list[str]:
    _load_builtin()
    return sorted(_EXPERIMENTS)


def get_experiment(name: str) -> ExperimentSpec:
    _load_builtin()
    if name not in _EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; known experiments: {', '.join(known_experiments())}, and pipeline (several in one run)")
    return _EXPERIMENTS[name]
