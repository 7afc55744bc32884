"""Mistral: a Llama module tree (sliding-window attention changes no module names)."""

from refusal_lab.models.adapters.base import ArchitectureAdapter
from refusal_lab.models.adapters.registry import register_adapter


@register_adapter
class MistralAdapter(ArchitectureAdapter):
    model_types = ("mistral",)
