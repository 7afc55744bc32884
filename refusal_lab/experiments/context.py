"""The experiment contract: an experiment gets an ``ExperimentContext`` and returns an ``ExperimentResult``.

The context holds what every experiment needs and nothing it must build itself: the loaded model,
the prompt set, the judge, the refusal tokens, the settings and a results path per stage. What
earlier stages of the same process found is in ``handoffs`` (typed: ``refusal_lab.findings``), and the
clean runs they made in ``clean_runs``, so a later stage reuses them instead of computing them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

from refusal_lab.generation import Generation, generate_greedy
from refusal_lab.interventions.activation_cache import ActivationCache
from refusal_lab.metrics import refusal_score
from refusal_lab.metrics.judges import Judge
from refusal_lab.models import LoadedModel
from refusal_lab.prompts import PromptRecord, PromptSet, format_chat

T = TypeVar("T")


@dataclass
class ExperimentContext:
    cfg: DictConfig
    model: LoadedModel
    prompts: PromptSet
    judge: Judge
    refusal_ids: list[int]
    output_dir: Path
    handoffs: list[Any] = field(default_factory=list)  # what earlier stages of this run handed on, oldest first
    clean_runs: ActivationCache | None = None  # shared by the stages of one process: a clean run made once serves them all

    def handoff(self, kind: type[T], **match: Any) -> T | None:
        """The latest finding of ``kind`` an earlier stage handed on whose fields equal ``match``; None if none did."""
        for found in reversed(self.handoffs):
            if isinstance(found, kind) and all(getattr(found, key) == value for key, value in match.items()):
                return found
        return None

    @property
    def settings(self) -> DictConfig:
        """``cfg.experiment``: this experiment's own settings."""
        return self.cfg.experiment

    @property
    def system_prompt(self) -> str | None:
        return self.cfg.model.get("system_prompt")

    def path(self, stage: str, what: str) -> Path:
        """``results/<stage>_<what>``, its folder made: where a stage writes a file of its own."""
        folder = self.output_dir / "results"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{stage}_{what}"

    def chat_texts(self, records: Sequence[PromptRecord]) -> list[str]:
        return [format_chat(self.model.tokenizer, r.prompt, self.system_prompt) for r in records]

    def generate(self, records: Sequence[PromptRecord], max_new_tokens: int, batch_size: int, description: str,
                 hooks: Any = None) -> list[Generation]:
        """Greedy completions, each with its refusal score as ``readout``; ``hooks`` (site -> function) apply throughout."""
        return generate_greedy(
            self.model,
            self.chat_texts(records),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            first_logits_readout=lambda logits: refusal_score(logits, self.refusal_ids),
            description=description,
            hooks=hooks,
        )
