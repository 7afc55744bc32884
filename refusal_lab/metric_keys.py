"""The metric keys that more than one module spells: what the experiments write, the pipeline page and the
sweep comparison read. One place, so a renamed key cannot leave a dashboard showing nothing. A leaf.

Keys are flat with ``/``: ``refusal_rate/harmful``, ``direction/harmful/ablation/refusal_rate``.
"""

from __future__ import annotations

# The baseline (and every experiment that summarises completions the same way).
HARMFUL_REFUSAL = "refusal_rate/harmful"
HARMLESS_REFUSAL = "refusal_rate/harmless"
SEPARATION = "refusal_score/separation"
AUROC = "refusal_score/auroc"


def side_refusal(name: str) -> str:
    """The baseline's refusal rate on a side set (the over-refusal set)."""
    return f"side/{name}/refusal_rate"


# Patching (``stage``: patching or attribution, the experiment's name).
def patching_pairs(stage: str) -> str:
    return f"{stage}/n_pairs"


def patching_top_effect(stage: str, direction: str) -> str:
    return f"{stage}/{direction}/top_effect"


# Component ablation.
ABLATION_NONE = "ablation/k0/refusal_rate"
ABLATION_NECESSARY = "ablation/necessary"
ABLATION_BEST_GAP = "ablation/best_matched_gap"


def ablation_arm(k: int, condition: str, what: str) -> str:
    """``condition``: top or random; ``what``: refusal_rate, refusal_score, harmless_kl, broken."""
    return f"ablation/k{k}/{condition}/{what}"


def ablation_gap(k: int) -> str:
    return f"ablation/k{k}/matched_gap"


# The refusal direction.
DIRECTION_LAYER = "direction/chosen/layer"
DIRECTION_POSITION = "direction/chosen/position"
DIRECTION_ABLATION_KL = "direction/harmless/ablation/kl"


def direction_refusal(label: str, condition: str) -> str:
    """``condition``: none, ablation (harmful prompts) or addition (harmless ones)."""
    return f"direction/{label}/{condition}/refusal_rate"


# The optimised directional ablation (``condition``: none, optimised, single_direction).
ABLITERATION_TRIALS = "abliteration/n_trials"


def abliteration(condition: str, what: str) -> str:
    """``what``: harmful_refusal, harmless_refusal, kl (mean), kl_median, kl_answered (where the unablated model answered),
    kl_tokens (along the first answer tokens), cross_entropy_change, <side set>_refusal."""
    return f"abliteration/{condition.replace(' ', '_')}/{what}"


# The sweep comparison's own measures (``compare/``), per job against its fp32 job.
PATCHING_LAYERS = "patching/layers"


def compared_patching(direction: str, what: str) -> str:
    """``what``: top, spearman, top_k_overlap, n_components."""
    return f"patching/{direction}/{what}"


DIRECTION_COSINE = "direction/cosine_with_reference"
DIRECTION_COSINE_AT_CELL = "direction/cosine_at_reference_cell"
COMPARED_ABLATION_K = "ablation/k"


def compared_ablation(condition: str, what: str) -> str:
    """At the largest k: ``condition`` top or random."""
    return f"ablation/{condition}/{what}"
