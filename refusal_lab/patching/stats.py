"""Effects of patching, normalised between the two runs of a pair."""

from __future__ import annotations

import numpy as np


def normalised_effect(patched: np.ndarray, target: float, source: float) -> np.ndarray:
    """(patched - target) / (source - target): 0 is no change, 1 moves the score all the way to the source run."""
    return (patched - target) / (source - target)
