"""One module per experiment, each a function (runner, cfg) -> ExperimentResult, found by name."""

from refusal_lab.experiments import baseline, organism, patching  # noqa: F401  (registration)
from refusal_lab.experiments.registry import (
    ExperimentResult,
    ExperimentSpec,
    get_experiment,
    known_experiments,
    register_experiment,
)

__all__ = ["ExperimentResult", "ExperimentSpec", "get_experiment", "known_experiments", "register_experiment"]
