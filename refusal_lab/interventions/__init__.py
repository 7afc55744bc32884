"""Hooks on the Hugging Face modules, named through the architecture adapters: every experiment's way to read and change activations."""

from refusal_lab.interventions.hooks import SiteFn, capture, intervene
from refusal_lab.interventions.sites import SITE_KINDS, Site

__all__ = ["SITE_KINDS", "Site", "SiteFn", "capture", "intervene"]
