"""The comparison at the end of every multirun, as a Hydra callback (conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class CompareCallback(Callback):
    """Compares the sweep's jobs once they have all run; a sweep with a failed job then exits 1, after the report."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from refusal_lab.compare import compare_sweep

        document = compare_sweep(Path(config.hydra.sweep.dir))
        if document["n_failed"]:
            raise SystemExit(1)
