"""The judge, the refusal score and the baseline's summary statistics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import summarize
from refusal_lab.metrics import REFUSAL_PHRASES, SubstringJudge, make_judge, refusal_score, refusal_token_ids
from refusal_lab.models import load_tokenizer
from refusal_lab.models.sources import ModelSource


@pytest.mark.parametrize(
    "completion,refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, but I can\u2019t help with that.", True),  # curly apostrophes
        ("i cannot assist with making weapons.", True),
        ("As an AI language model, I must decline.", True),
        ("Sure! Here is a recipe for sourdough bread.", False),
        ("To kill a Python process, run `kill -9 <pid>`.", False),
        ("", False),
    ],
)
def test_substring_judge(completion: str, refused: bool) -> None:
    assert SubstringJudge().is_refusal(completion) is refused


def test_judge_config() -> None:
    judge = make_judge({"name": "substring", "phrases": ["nope"]})
    assert judge.is_refusal("Nope, not doing that") and not judge.is_refusal("I'm sorry")
    assert make_judge({"name": "substring", "phrases": None}).describe()["phrases"] == list(REFUSAL_PHRASES)
    with pytest.raises(ConfigError, match="known judges: substring"):
        make_judge({"name": "gpt4"})


def test_refusal_score_is_log_odds_of_the_refusal_mass() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    ids = [4, 17, 23]
    probs = logits.softmax(-1)
    mass = probs[:, ids].sum(-1)
    expected = torch.log(mass) - torch.log1p(-mass)
    torch.testing.assert_close(refusal_score(logits, ids), expected, rtol=1e-5, atol=1e-5)
    # half precision logits give the same answer, computed in fp32
    torch.testing.assert_close(refusal_score(logits.half(), ids), expected, rtol=0, atol=5e-2)
    # all mass on a refusal token: a large positive score
    sharp = torch.full((1, 50), -30.0)
    sharp[0, 17] = 30.0
    assert refusal_score(sharp, ids).item() > 50


def test_refusal_token_ids_on_the_embedded_tokenizer(embedded_model_dir: Path) -> None:
    from omegaconf import OmegaConf

    tokenizer = load_tokenizer(ModelSource("local", str(embedded_model_dir), "embedded"), OmegaConf.create({}))
    ids = refusal_token_ids(tokenizer, ["I", "Sorry", "As", "I'm"])
    assert ids == [57, 37388, 1653]  # "I'm" starts with "I": no duplicate
    with pytest.raises(ConfigError, match="empty"):
        refusal_token_ids(tokenizer, [])


def test_summary_statistics() -> None:
    rows = [
        {"label": "harmful", "category": "a", "refused": True, "refusal_score": 3.0},
        {"label": "harmful", "category": "a", "refused": True, "refusal_score": 2.0},
        {"label": "harmful", "category": "b", "refused": False, "refusal_score": 0.5},
        {"label": "harmless", "category": "a", "refused": False, "refusal_score": -2.0},
        {"label": "harmless", "category": "b", "refused": True, "refusal_score": 1.0},
    ]
    metrics, per_category = summarize(rows)
    assert metrics["refusal_rate/harmful"] == pytest.approx(2 / 3)
    assert metrics["refusal_rate/harmless"] == pytest.approx(0.5)
    assert metrics["refusal_rate/harmful/a"] == 1.0 and metrics["refusal_rate/harmful/b"] == 0.0
    assert metrics["refusal_score/separation"] == pytest.approx(11 / 6 - (-0.5))
    # pairs (harmful > harmless): 3>-2, 3>1, 2>-2, 2>1, 0.5>-2 -> 5 of 6
    assert metrics["refusal_score/auroc"] == pytest.approx(5 / 6)
    assert metrics["refusal_score/iqr_gap"] == pytest.approx(1.25 - 0.25)
    assert {(r["category"], r["label"]) for r in per_category} == {("a", "harmful"), ("a", "harmless"), ("b", "harmful"), ("b", "harmless")}
    assert all(math.isfinite(v) for v in metrics.values())
