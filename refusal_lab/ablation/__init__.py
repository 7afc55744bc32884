"""Component ablation: whether the components patching ranks first are necessary for refusal."""

from refusal_lab.ablation.components import Component, random_like
from refusal_lab.ablation.values import MODES, ablation_hooks, reference_activations

__all__ = ["MODES", "Component", "ablation_hooks", "random_like", "reference_activations"]
