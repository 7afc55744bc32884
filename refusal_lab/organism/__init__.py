"""The refusal model organism: a base chat model fine-tuned with LoRA to refuse harmful requests."""

from refusal_lab.organism.build import ensure_organism, make_organism, organism_folder, read_manifest, ship_adapter, stale_reasons
from refusal_lab.organism.data import OrganismData, check_disjoint, load_organism_data

__all__ = [
    "OrganismData", "check_disjoint", "ensure_organism", "load_organism_data", "make_organism", "organism_folder", "read_manifest",
    "ship_adapter", "stale_reasons",
]
