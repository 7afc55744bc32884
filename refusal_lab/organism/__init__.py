"""The refusal model organism: a base chat model fine-tuned with LoRA to refuse harmful requests."""

from refusal_lab.organism.build import build_organism, ensure_organism, organism_folder, read_manifest
from refusal_lab.organism.data import OrganismData, check_disjoint, load_organism_data

__all__ = ["OrganismData", "build_organism", "check_disjoint", "ensure_organism", "load_organism_data", "organism_folder", "read_manifest"]
