"""The refusal model organism: a base chat model fine-tuned with LoRA to refuse harmful requests.

A derived artefact: ``ensure(cfg)`` makes it (or finds it cached) and hands down where its weights are;
``refusal_lab.models`` never builds it.
"""

from refusal_lab.organism.build import Organism, ensure, ensure_organism, make_organism, organism_folder, read_manifest, ship_adapter, stale_reasons
from refusal_lab.organism.data import OrganismData, check_disjoint, load_organism_data

__all__ = [
    "Organism", "OrganismData", "check_disjoint", "ensure", "ensure_organism", "load_organism_data", "make_organism", "organism_folder",
    "read_manifest", "ship_adapter", "stale_reasons",
]
