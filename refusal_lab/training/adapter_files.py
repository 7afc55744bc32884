"""A trained LoRA on disk, in peft's own format, and merged back into a base model.

peft's format (``adapter_config.json`` and ``adapter_model.safetensors``) so that a researcher can
also load the shipped adapter with ``PeftModel.from_pretrained`` alone. Saved from the tensors the
trainer handed back, and merged with peft's own ``merge_and_unload``, so a merged copy made from
the file is bit for bit the model the training produced.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import save_file

from refusal_lab.training.sft import TrainedLora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter(trained: TrainedLora, folder: Path, base_name: str) -> None:
    """Write the LoRA; ``base_name`` says in words what it applies to (no machine's path)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.adapter_weights.items()}, str(folder / ADAPTER_WEIGHTS))
    config = copy.deepcopy(trained.config)
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))


def merge_adapter(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """``model`` with the LoRA in ``folder`` merged into its weights (changed in place)."""
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{folder} holds no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return merged
