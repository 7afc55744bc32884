"""The whole study in one process, ``experiment=pipeline``: the stages run in order on one loaded model.

A stage is an experiment run with its own settings (``stages.<name>.experiment``, composed from that
experiment's own config file) and its own prompt split (``stages.<name>.prompts``); it writes its own
results file, as it would alone. Later stages take what earlier ones found from ``context.handoffs``
(ablation ranks the components patching measured on the selection split) and share one in-memory
cache of clean runs (attribution reuses patching's). A setting given to the pipeline itself
(``experiment.batch_size=8``; null: each stage's own) goes to every stage that has it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from refusal_lab.config import check_positive_settings, layer_range
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.registry import ExperimentSpec, get_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.prompts import PromptSet
from refusal_lab.tracking.results import ResultFiles
from refusal_lab.viz.pipeline import write_pipeline_dashboard

PIPELINE = "pipeline"
_OWN_KEYS = ("name", "stages")  # the pipeline's own settings; any other goes to the stages


@dataclass(frozen=True)
class Stage:
    """One experiment of a run: what runs, the config it sees and its prompts, all checked before the model loads."""

    name: str
    spec: ExperimentSpec
    cfg: DictConfig
    prompts: PromptSet


def plan_stages(cfg: DictConfig, prompt_set: PromptSet) -> list[Stage]:
    """The stages of ``cfg`` (one, unless it is the pipeline), each checked; a ConfigError names what to fix."""
    name = str(cfg.experiment.name)
    if name != PIPELINE:
        return [prepare(name, single_config(cfg, name), prompt_set)]
    if cfg.prompts.get("split") is not None:
        raise ConfigError(f"prompts.split={cfg.prompts.split}: in the pipeline each stage chooses its split "
                          "(stages.<stage>.prompts.split); keep prompts.split=null, or run one experiment (experiment=baseline)")
    stages = list(cfg.experiment.get("stages") or [])
    available = list(cfg.get("stages") or {})
    if not stages or len(set(stages)) != len(stages):
        raise ConfigError(f"experiment.stages={stages} must list some of {', '.join(available)}, each once")
    unknown = [s for s in stages if s not in available]
    if unknown:
        raise ConfigError(f"experiment.stages names {unknown}, which have no settings under stages.*; known: {', '.join(available)}")
    shared = {k: v for k, v in OmegaConf.to_container(cfg.experiment, resolve=True).items() if k not in _OWN_KEYS and v is not None}
    unused = [k for k in shared if not any(k in cfg.stages[s].experiment for s in stages)]
    if unused:
        raise ConfigError(f"experiment.{unused[0]} is a setting of none of the stages ({', '.join(stages)}); set stages.<stage>.experiment.{unused[0]}")
    return [prepare(stage, stage_config(cfg, stage, shared), prompt_set) for stage in stages]


def single_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config one experiment sees: the study's settings for it (``study=quick`` sizes it as the pipeline would)
    and debug's shrink, each setting only where the experiment has it; no ``stages``."""
    derived = copy.deepcopy(cfg)
    with open_dict(derived):
        if derived.get("stages") is not None:
            node = OmegaConf.to_container(derived.stages, resolve=True).get(name) or {}
            given = _command_line_keys()
            sizes = {k: v for k, v in (node.get("experiment") or {}).items() if f"experiment.{k}" not in given}
            derived.experiment = OmegaConf.merge(derived.experiment, sizes)
            if node.get("prompts") is not None:
                derived.prompts = OmegaConf.merge(derived.prompts, node["prompts"])
            del derived["stages"]
        derived.experiment = OmegaConf.merge(derived.experiment, shrunk(cfg, derived.experiment))
    return derived


def shrunk(cfg: DictConfig, experiment: Any) -> dict[str, Any]:
    """``debug=default``'s smaller sizes (``shrink``) that this experiment's settings have (the others are not its own),
    less those the command line sets itself (``debug=default experiment.max_new_tokens=64`` keeps 64)."""
    shrink = OmegaConf.to_container(cfg.shrink, resolve=True) if cfg.get("shrink") is not None else {}
    given = _command_line_keys()
    return {k: v for k, v in shrink.items() if k in experiment and f"experiment.{k}" not in given}


def _command_line_keys() -> set[str]:
    """The keys this process's command line overrides (none when composed through the Python API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def stage_config(cfg: DictConfig, stage: str, shared: dict[str, Any]) -> DictConfig:
    """The config a stage sees: the run's, with the stage's experiment settings and prompt selection."""
    node = OmegaConf.to_container(cfg.stages[stage], resolve=True)  # resolved where ${stages.*} still exists
    derived = copy.deepcopy(cfg)
    with open_dict(derived):
        derived.experiment = OmegaConf.merge(node["experiment"], {k: v for k, v in shared.items() if k in node["experiment"]},
                                             shrunk(cfg, node["experiment"]))
        if node.get("prompts") is not None:
            derived.prompts = OmegaConf.merge(cfg.prompts, node["prompts"])
        del derived["stages"]
    return derived


def prepare(name: str, cfg: DictConfig, prompt_set: PromptSet) -> Stage:
    spec = get_experiment(name)
    prompts = prompt_set.select(split=cfg.prompts.get("split"), categories=cfg.prompts.get("categories"), limit=cfg.prompts.get("limit"))
    if spec.needs_pairs:
        prompts.pairs()
    check_positive_settings(cfg.experiment)
    if cfg.experiment.get("layers") is not None:  # any experiment's band of layers: its form now, its bounds once the depth is known
        layer_range(cfg.experiment.layers, None, "experiment.layers")
    if spec.check is not None:
        spec.check(cfg)
    return Stage(name, spec, cfg, prompts)


def summarize(stages: list[Stage], results: dict[str, ExperimentResult], files: dict[str, ResultFiles], seconds: dict[str, float],
              path: Path) -> ExperimentResult:
    """The pipeline's own results: how long each stage took, where its results are, and one dashboard linking them."""
    output_dir = path.parent.parent
    rows = []
    for stage in stages:
        written = files[stage.name]
        rows.append({
            "stage": stage.name,
            "seconds": round(seconds[stage.name], 2),
            "results": str(written.results.relative_to(output_dir)),
            "dashboard": str(written.files["dashboard"].relative_to(output_dir)) if "dashboard" in written.files else None,
            "split": stage.cfg.prompts.get("split"),
            "n_prompts": len(stage.prompts),
        })
    metrics = {f"pipeline/{row['stage']}/seconds": row["seconds"] for row in rows}
    metrics["pipeline/seconds"] = round(sum(seconds.values()), 2)
    dashboard = write_pipeline_dashboard(rows, {s.name: results[s.name].metrics for s in stages}, path)
    return ExperimentResult(metrics=metrics, details={"stages": rows}, files={"dashboard": dashboard})
