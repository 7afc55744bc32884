"""Qwen2 / Qwen2.5 / Qwen3: a Llama module tree (q/k/v biases, Qwen3's q/k norms sit inside attention)."""

from refusal_lab.models.adapters.base import ArchitectureAdapter
from refusal_lab.models.adapters.registry import register_adapter


@register_adapter
class Qwen2Adapter(ArchitectureAdapter):
    model_types = ("qwen2", "qwen3")
