"""Experiments by name: each a function (context) -> ExperimentResult, registered in its own module.

This package's import loads no experiment: the registry imports the built-in ones the first time
an experiment is looked up, so ``refusal_lab.experiments.result`` stays free of them.
"""

from refusal_lab.experiments.registry import (
    ExperimentSpec,
    get_experiment,
    known_experiments,
    register_experiment,
)
from refusal_lab.experiments.result import ExperimentResult

__all__ = ["ExperimentResult", "ExperimentSpec", "get_experiment", "known_experiments", "register_experiment"]
