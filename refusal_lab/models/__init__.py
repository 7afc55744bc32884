"""Model loading (hub id, local folder, GGUF in a package; every precision) and architecture adapters."""

from refusal_lab.models.loading import (
    LoadedModel,
    ModelPlan,
    load_model,
    load_tokenizer,
    load_weights,
    plan_model,
    resolve_device_map,
)

__all__ = ["LoadedModel", "ModelPlan", "load_model", "load_tokenizer", "load_weights", "plan_model", "resolve_device_map"]
