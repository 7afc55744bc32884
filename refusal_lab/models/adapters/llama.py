"""Llama family: Llama 2/3, and families with the same module tree (Mistral, Qwen2/3).

Their attention module's output and MLP module's output are added to the residual stream
as they are, so the base names apply unchanged.
"""

from refusal_lab.models.adapters.base import ArchitectureAdapter
from refusal_lab.models.adapters.registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama",)
