"""One small adapter per architecture family; importing this package registers them all."""

from refusal_lab.models.adapters import gemma, llama, mistral, qwen2  # noqa: F401  (registration)
from refusal_lab.models.adapters.base import ArchitectureAdapter
from refusal_lab.models.adapters.registry import adapter_for, known_model_types, register_adapter

__all__ = ["ArchitectureAdapter", "adapter_for", "known_model_types", "register_adapter"]
