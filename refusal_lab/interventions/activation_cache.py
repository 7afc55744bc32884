"""Clean runs kept for reuse: every layer's activations at the asked sites, keys and values, last-position logits.

In memory for one run, or also on disk (one safetensors file per prompt under
``<cache>/activations/``) to be reused by later runs. The key covers everything that decides the
tensors: the weights' contents (not their path), the precision, the attention implementation, the
token ids, the site kinds and the versions of torch and transformers. A changed input gives a new
key, so a stale file is never read; files are written whole or not at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from refusal_lab.models.sources import file_sha256

_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


class ActivationCache:
    """Tensors by key, in memory and, with a ``folder``, on disk."""

    def __init__(self, model_key: str, folder: Path | None = None) -> None:
        self.model_key = model_key
        self.folder = folder / model_key[:16] if folder is not None else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, ids: torch.Tensor, kinds: list[str]) -> str:
        identity = json.dumps([_FORMAT, self.model_key, ids.flatten().tolist(), sorted(kinds)])
        return hashlib.sha256(identity.encode()).hexdigest()[:24]

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        if self.folder is not None and (self.folder / f"{key}.safetensors").is_file():
            tensors = load_file(str(self.folder / f"{key}.safetensors"))
            self._memory[key] = tensors
            self.hits += 1
            return tensors
        self.misses += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        self._memory[key] = tensors
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.safetensors"
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging), metadata={"model_key": self.model_key})
        os.replace(staging, path)

    def describe(self) -> dict[str, Any]:
        return {
            "where": str(self.folder) if self.folder is not None else "memory",
            "model_key": self.model_key,
            "hits": self.hits,
            "misses": self.misses,
        }


def model_key(loaded: Any, cache_dir: Path) -> str:
    """What decides a model's activations, as a hash: its weights' contents and how it runs them."""
    source = loaded.source
    if source.kind == "hub":
        weights = f"hub:{source.location}@{getattr(loaded.model.config, '_commit_hash', None) or source.revision}"
    else:
        folder = Path(source.location)
        files = sorted(p for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
        weights = json.dumps([[p.relative_to(folder).as_posix(), file_sha256(p, cache_dir)] for p in files])
    identity = json.dumps(
        [
            weights,
            loaded.precision.describe(),
            getattr(loaded.adapter.config, "_attn_implementation", None),
            loaded.devices(),
            {name: _version(name) for name in ("torch", "transformers", "bitsandbytes")},
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(identity.encode()).hexdigest()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
