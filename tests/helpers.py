"""Helpers the tests share: compose a config as Hydra would, run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from refusal_lab.api import compose

REPO_ROOT = Path(__file__).resolve().parent.parent


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config Hydra would build for ``python -m refusal_lab <overrides>`` (the Python API's compose)."""
    return compose(overrides, output_dir)


def run_cli(args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m refusal_lab`` in a subprocess, its outputs redirected under ``tmp_path``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(extra_env or {})}
    redirect = [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/multirun"]
    return subprocess.run(
        [sys.executable, "-m", "refusal_lab", *args, *redirect],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file.

    The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks with a 7-byte
    header: checksum, little-endian length, type); wandb no longer ships a Python reader for it.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(data):
        space = block - position % block
        if space < 7:  # the rest of a block too small for a chunk header is padding
            position += space
            continue
        length = int.from_bytes(data[position + 4 : position + 6], "little")
        kind = data[position + 6]
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # full record
            payloads.append(chunk)
        elif kind == 2:  # first chunk
            pending = chunk
        elif kind == 3:  # middle chunk
            pending += chunk
        elif kind == 4:  # last chunk
            payloads.append(pending + chunk)
            pending = b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records
