"""``python -m refusal_lab [overrides]``: compose the config, hand it to the runner."""

from __future__ import annotations

import importlib.util
import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import refusal_lab  # noqa: F401  (registers the config resolvers)
from refusal_lab.config import with_study
from refusal_lab.errors import ConfigError, Interrupted
from refusal_lab.runner import run

log = logging.getLogger("refusal_lab")


# launcher=<name> -> the Hydra plugin it runs on (module, distribution). Hydra reports a missing plugin as a
# search-path error that does not say what to install; this says it, before Hydra composes anything.
LAUNCHER_PLUGINS = {
    "processes": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
}


def missing_launcher(args: list[str]) -> str | None:
    """The one-line message for a ``launcher=`` whose Hydra plugin is not installed; None when it is (or none is asked for)."""
    for arg in args:
        if arg.startswith("launcher="):
            name = arg.split("=", 1)[1]
            module, distribution = LAUNCHER_PLUGINS.get(name, (None, None))
            if module is not None and not _importable(module):
                return (f"launcher={name} needs Hydra's launcher plugin {distribution}: pip install {distribution} "
                        "(or every launcher: pip install -e '.[launchers]' in the repository)")
    return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all: no launcher plugin is installed
        return False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        document = run(cfg)
    except ConfigError as error:
        log.error("%s", error)
        if multirun:
            return None  # recorded in the job's results file; the sweep goes on and its comparison reports it
        sys.exit(2)  # one line, no traceback: the message says what to fix
    except Interrupted as stopped:
        sys.exit(128 + stopped.signum)  # recorded as interrupted in the results file; the shell's code for a signal
    except Exception:
        if multirun:
            log.exception("The job failed; the sweep goes on, and its comparison reports the job as failed")
            return None
        raise
    metric = cfg.get("optimized_metric")
    return document["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    missing = missing_launcher(sys.argv[1:])
    if missing:
        print(f"Error: {missing}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_study(sys.argv[1:])
    main()
