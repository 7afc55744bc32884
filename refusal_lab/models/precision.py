"""quant=<name> -> from_pretrained keyword arguments, checked against the hardware first."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from refusal_lab.errors import ConfigError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# conf/quant/fp32.yaml as a dict, for code that must reload a model at full precision whatever the run's quant
# (the organism trains in fp32; a direction found at 4-bit is exported from fp32 weights).
FP32 = {"name": "fp32", "dtype": "float32", "bits": None}


@dataclass(frozen=True)
class Precision:
    """A precision resolved for one device kind ("cpu" or "cuda")."""

    name: str
    dtype: torch.dtype
    bits: int | None
    quant_type: str | None
    compute_dtype: torch.dtype | None
    double_quant: bool

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.bits is not None:
            from transformers import BitsAndBytesConfig

            if self.bits == 8:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type=self.quant_type or "nf4",
                    bnb_4bit_compute_dtype=self.compute_dtype,
                    bnb_4bit_use_double_quant=self.double_quant,
                )
        return kwargs

    def describe(self) -> dict[str, Any]:
        return {
            "precision": self.name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "bits": self.bits,
            "quant_type": self.quant_type if self.bits == 4 else None,
            "compute_dtype": str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else None,
            "double_quant": self.double_quant if self.bits == 4 else None,
        }


def resolve_precision(quant_cfg: Any, device_kind: str) -> Precision:
    """Resolve ``auto`` dtypes for the device and refuse what the hardware cannot do."""
    bits = quant_cfg.get("bits")
    if bits not in (None, 4, 8):
        raise ConfigError(f"quant.bits={bits} is not supported; use 4 or 8 (bitsandbytes), or null")
    dtype = _dtype(quant_cfg.get("dtype", "float32"), device_kind, "quant.dtype")
    compute = _dtype(quant_cfg.get("compute_dtype"), device_kind, "quant.compute_dtype") if bits == 4 else None
    for used in (dtype, compute):
        if used == torch.bfloat16 and device_kind == "cuda" and not _native_bf16():
            raise ConfigError(f"quant={quant_cfg.name}: this GPU has no bfloat16 support; use quant=fp16")
    if bits is not None:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"quant={quant_cfg.name} needs bitsandbytes: `pip install bitsandbytes`")
        if device_kind not in ("cpu", "cuda"):
            raise ConfigError(f"quant={quant_cfg.name}: bitsandbytes runs on CUDA or the CPU, not on {device_kind}")
    return Precision(
        name=str(quant_cfg.name),
        dtype=dtype,
        bits=bits,
        quant_type=quant_cfg.get("quant_type"),
        compute_dtype=compute,
        double_quant=bool(quant_cfg.get("double_quant", False)),
    )


def _native_bf16() -> bool:
    # Emulated bf16 (pre-Ampere GPUs) is slow and not what a user asking for bf16 means.
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def _dtype(name: Any, device_kind: str, key: str) -> torch.dtype:
    if name in (None, "auto"):
        # CPU kernels are fastest and exact in fp32; GPUs want half precision for speed and memory.
        if device_kind != "cuda":
            return torch.float32
        return torch.bfloat16 if _native_bf16() else torch.float16
    if name not in _DTYPES:
        raise ConfigError(f"{key}={name!r} is not a dtype; use one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[name]
