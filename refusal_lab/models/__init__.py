"""Model loading (hub id, local folder, GGUF in a package; every precision) and architecture adapters."""

from refusal_lab.models.loading import LoadedModel, load_model, load_tokenizer, resolve_device_map

__all__ = ["LoadedModel", "load_model", "load_tokenizer", "resolve_device_map"]
