"""The runs of ``python -m refusal_lab`` from Python (a notebook, a script): compose the config from the
same overrides, run it, and read the results back.

    from refusal_lab import api
    results = api.run(["experiment=patching", "debug=default"])
    results.metrics, results.table("pairs"), results.arrays("effects")
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, open_dict

from refusal_lab.config import CONF_DIR, with_study
from refusal_lab.tracking.reading import RunResults, find_results, load_results

if TYPE_CHECKING:
    from refusal_lab.models import LoadedModel

__all__ = ["RunResults", "compose", "find_results", "load_results", "prepare_model", "run"]


def compose(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The config ``python -m refusal_lab <overrides>`` would run. Outputs go to ``output_dir``, by default
    ``outputs/<date>/<time>_<experiment>/`` under the current folder, as on the command line."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra_compose(config_name="config", overrides=with_study(overrides))
    if output_dir is None:
        now = datetime.now()
        output_dir = Path.cwd() / "outputs" / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{cfg.experiment.name}"
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run(overrides: Sequence[str] | DictConfig = (), output_dir: str | Path | None = None) -> RunResults:
    """Run one job from overrides (or a composed config) and return its results, read back from disk."""
    from refusal_lab.runner import run as run_job

    cfg = overrides if isinstance(overrides, DictConfig) else compose(overrides, output_dir)
    _show_progress_messages()
    document = run_job(cfg)
    return RunResults.read(document["results_path"])


def prepare_model(cfg: DictConfig) -> "LoadedModel":
    """The model ``cfg`` names, loaded at ``cfg.quant``, as a run would load it: an organism is made first
    (cached, merged from its shipped adapter, or trained) when the cache lacks it."""
    from refusal_lab import organism
    from refusal_lab.models import load_weights, plan_model

    source = organism.ensure(cfg)
    return load_weights(cfg.model, plan_model(cfg.model, cfg.quant, cfg.paths.cache_dir, source=source))


def _show_progress_messages() -> None:
    """Hydra sets up logging on the command line; in a notebook nobody has, and the runner's messages
    (what was loaded, the figures, where the results are) would be dropped."""
    package = logging.getLogger("refusal_lab")
    if not logging.getLogger().handlers and not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
