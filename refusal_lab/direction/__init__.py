"""The refusal direction (Arditi et al. 2024): candidates from mean activations, selection on held-out
prompts, and the export of a model that can no longer write it."""

from refusal_lab.direction.candidates import mean_difference
from refusal_lab.direction.export import orthogonalise, save_orthogonalised
from refusal_lab.direction.selection import CandidateScores, choose, score_candidates

__all__ = ["CandidateScores", "choose", "mean_difference", "orthogonalise", "save_orthogonalised", "score_candidates"]
