"""One loader for every source and precision; returns the model with its tokenizer and adapter."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from refusal_lab.errors import ConfigError
from refusal_lab.quiet import cpu_4bit_notice
from refusal_lab.models.adapters import ArchitectureAdapter, adapter_for
from refusal_lab.models.adapters.base import text_config
from refusal_lab.models.quantized import keep_4bit_weights_unpacked
from refusal_lab.models.precision import Precision, resolve_precision
from refusal_lab.models.sources import ModelSource, resolve_source

log = logging.getLogger(__name__)


class _DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs its int8 fp16-cast notice on every quantized matmul: thousands per run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNotice())


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchitectureAdapter
    source: ModelSource
    precision: Precision
    name: str
    load_seconds: float = 0.0

    def describe(self) -> dict[str, Any]:
        """What a results file records about the model: enough to load the same one again."""
        return {
            "name": self.name,
            "source": self.source.kind,
            "location": self.source.description,
            "revision": self.source.revision,
            "commit": getattr(self.model.config, "_commit_hash", None),
            **self.precision.describe(),
            "devices": self.devices(),
            "memory_footprint_mb": round(self.model.get_memory_footprint() / 2**20, 1),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "load_seconds": round(self.load_seconds, 2),
            **self.adapter.describe(),
        }

    def devices(self) -> list[str]:
        return sorted({str(p.device) for p in self.model.parameters()})

    def close(self) -> None:
        """Free the weights; the basic multirun launcher runs every job in one process."""
        self.model = None  # type: ignore[assignment]
        self.adapter = None  # type: ignore[assignment]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_device_map(device_map: Any) -> tuple[Any, str]:
    """The device_map to pass to from_pretrained, and the kind of device it puts weights on.

    ``auto`` means every visible GPU (accelerate spreads a large model over them) or the CPU.
    """
    if isinstance(device_map, int):  # a bare GPU index
        device_map = f"cuda:{device_map}"
    if device_map in (None, "auto"):
        return ("auto", "cuda") if torch.cuda.is_available() else ({"": "cpu"}, "cpu")
    if isinstance(device_map, str):
        kind = device_map.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"model.device_map={device_map} but no CUDA device is visible; use model.device_map=auto or cpu")
        if kind in ("balanced", "balanced_low_0", "sequential"):
            if not torch.cuda.is_available():
                raise ConfigError(f"model.device_map={device_map} spreads over GPUs, and none is visible; use model.device_map=auto")
            return device_map, "cuda"
        return {"": device_map}, kind
    mapping = dict(device_map)
    kinds = {str(v).split(":")[0] if not isinstance(v, int) else "cuda" for v in mapping.values()}
    if "cuda" in kinds and not torch.cuda.is_available():
        raise ConfigError("model.device_map places modules on CUDA but no CUDA device is visible")
    return mapping, "cuda" if "cuda" in kinds else "cpu"


def load_tokenizer(source: ModelSource, model_cfg: Any) -> PreTrainedTokenizerBase:
    """The tokenizer, set up for batched generation (left padding, a pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.location,
            revision=source.revision,
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
        )
    except OSError as error:
        raise ConfigError(f"could not load the tokenizer of {source.description}: {error}") from error
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class ModelPlan:
    """Everything about a model short of its weights: what can be checked in seconds."""

    source: ModelSource
    tokenizer: PreTrainedTokenizerBase
    precision: Precision
    device_map: Any
    trust_remote_code: bool = False

    def n_layers(self) -> int:
        """The decoder's depth, from the model's config file alone (settings that name layers are checked with it)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.source.location, revision=self.source.revision, trust_remote_code=self.trust_remote_code)
        return int(text_config(config).num_hidden_layers)


def plan_model(model_cfg: Any, quant_cfg: Any, cache_dir: str | Path, source: ModelSource | None = None) -> ModelPlan:
    """Device, precision, source and tokenizer, in order of cost; any can stop the run.

    ``source``: where the weights are, when a step before this one found them (the organism).
    """
    device_map, device_kind = resolve_device_map(model_cfg.get("device_map", "auto"))
    precision = resolve_precision(quant_cfg, device_kind)
    source = source or resolve_source(model_cfg, cache_dir)
    return ModelPlan(source, load_tokenizer(source, model_cfg), precision, device_map, bool(model_cfg.get("trust_remote_code", False)))


def load_model(model_cfg: Any, quant_cfg: Any, cache_dir: str | Path) -> LoadedModel:
    """Load ``model`` at precision ``quant``."""
    return load_weights(model_cfg, plan_model(model_cfg, quant_cfg, cache_dir))


def load_weights(model_cfg: Any, plan: ModelPlan) -> LoadedModel:
    source, precision = plan.source, plan.precision
    started = time.perf_counter()
    kwargs = precision.from_pretrained_kwargs()
    if model_cfg.get("max_memory"):
        kwargs["max_memory"] = dict(model_cfg.max_memory)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.location,
            revision=source.revision,
            device_map=plan.device_map,
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            **kwargs,
        )
    except OSError as error:
        raise ConfigError(f"could not load {source.description}: {error}") from error
    model.eval()
    model.requires_grad_(False)
    if precision.bits == 4 and "cpu" in {p.device.type for p in model.parameters()}:
        notice = cpu_4bit_notice()
        if notice:
            log.info("%s", notice)
        keep_4bit_weights_unpacked(model)  # gradients (attribution) and the same rounding in every pass
    if precision.bits == 8 and precision.dtype == torch.float32:
        log.info("bitsandbytes int8: activations are cast to fp16 inside each quantized matmul (its per-matmul notice is silenced)")
    loaded = LoadedModel(
        model=model,
        tokenizer=plan.tokenizer,
        adapter=adapter_for(model),
        source=source,
        precision=precision,
        name=str(model_cfg.name),
        load_seconds=time.perf_counter() - started,
    )
    log.info(
        "Loaded %s at %s in %.1f s (%.0f MB on %s)",
        loaded.name,
        precision.name,
        loaded.load_seconds,
        model.get_memory_footprint() / 2**20,
        ", ".join(loaded.devices()),
    )
    return loaded
