"""Side sets: prompt files an experiment reports a refusal rate on beside its own prompts, under each of its
conditions. The over-refusal set (safe requests that sound harmful) is the one that matters: an intervention
that lowers harmful refusal should not raise it, and the baseline says where it starts.

``experiment.side_sets`` names them (name -> file); each is cut to the experiment's evaluation split and to
``side_limit`` prompts (null: all of the split).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.prompts import PromptRecord, load_prompt_set


def load_side_sets(exp: DictConfig, split: str | None) -> dict[str, list[PromptRecord]]:
    """Every side set's prompts of ``split`` (every prompt where None), checked: a bad file fails before the model loads."""
    out = {}
    limit = exp.get("side_limit")
    for name, path in (exp.get("side_sets") or {}).items():
        try:
            records = list(load_prompt_set(str(path)).select(split=split).records)
        except ConfigError as error:
            raise ConfigError(f"experiment.side_sets.{name}: {error}") from error
        if not records:
            raise ConfigError(f"experiment.side_sets.{name}={path} has no prompts in the {split} split")
        out[name] = records[: limit or None]
    return out


def side_set_rows(context: ExperimentContext, sets: dict[str, list[PromptRecord]], condition: str, hooks: Any = None) -> list[dict[str, Any]]:
    """Each side set's prompts answered under ``hooks``, judged; rows carry ``set`` and ``condition``."""
    return [{**row, "set": name, "condition": condition}
            for name, records in sets.items()
            for row in answer_rows(context, records, context.settings, f"{name}, {condition}", hooks=hooks)]


def side_set_rates(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{condition: {set: {refusal_rate, n}}} from ``side_set_rows``' rows."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for condition in dict.fromkeys(r["condition"] for r in rows):
        for name in dict.fromkeys(r["set"] for r in rows):
            chosen = [r["refused"] for r in rows if r["condition"] == condition and r["set"] == name]
            out.setdefault(condition, {})[name] = {"refusal_rate": round(float(np.mean(chosen)), 5), "n": len(chosen)}
    return out
