"""``python -m refusal_lab [overrides]``: compose the config, hand it to the runner."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import refusal_lab  # noqa: F401  (registers the config resolvers)
from refusal_lab.errors import ConfigError
from refusal_lab.runner import run

log = logging.getLogger("refusal_lab")


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
    except Exception:
        if multirun:
            log.exception("The job failed; the sweep goes on, and its comparison reports the job as failed")
            return None
        raise
    metric = cfg.get("optimized_metric")
    return document["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
