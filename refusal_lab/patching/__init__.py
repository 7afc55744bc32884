"""Exact activation patching (and its attribution approximation) over contrastive pairs."""

from refusal_lab.patching.engine import CachedRun, Variant, patch_fast, patch_naive, run_cached

__all__ = ["CachedRun", "Variant", "patch_fast", "patch_naive", "run_cached"]
