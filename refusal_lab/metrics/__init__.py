"""Refusal score and judges."""

from refusal_lab.metrics.judges import REFUSAL_PHRASES, SubstringJudge, make_judge
from refusal_lab.metrics.refusal_score import refusal_score, refusal_token_ids

__all__ = ["REFUSAL_PHRASES", "SubstringJudge", "make_judge", "refusal_score", "refusal_token_ids"]
