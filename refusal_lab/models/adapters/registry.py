"""model_type -> adapter class; adding a family is adding one file and one decorator."""

from __future__ import annotations

from torch import nn

from refusal_lab.errors import ConfigError
from refusal_lab.models.adapters.base import ArchitectureAdapter, text_config

_ADAPTERS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def known_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module) -> ArchitectureAdapter:
    """The adapter of the model's family, chosen by its config's model_type."""
    config = model.config
    # Multimodal wrappers (Gemma 3) register under the outer type; others under the text type.
    for model_type in (config.model_type, text_config(config).model_type):
        if model_type in _ADAPTERS:
            return _ADAPTERS[model_type](model)
    raise ConfigError(
        f"no architecture adapter for model_type {config.model_type!r}; known: "
        f"{', '.join(known_model_types())}. Add one file under refusal_lab/models/adapters/."
    )
