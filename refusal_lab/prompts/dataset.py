"""Prompt sets: the JSONL format, its validation, and selections (split, categories, limit).

One JSON object per line:
    {"prompt": "...", "label": "harmful" | "harmless", "category": "weapons",
     "pair_id": "weapons-01", "split": "train" | "val" | "test", "kind": "twin"}
``prompt`` and ``label`` are required; ``category`` defaults to "uncategorized"; ``pair_id``,
``split`` and ``kind`` (a finer grouping than the label, e.g. everyday requests against contrastive
twins, reported apart) are optional; any other field is ignored. A file with no pair ids still serves every
experiment that needs no pairs.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

from refusal_lab.errors import ConfigError

LABELS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
DEFAULT_CATEGORY = "uncategorized"


@dataclass(frozen=True)
class PromptRecord:
    prompt: str
    label: str
    category: str
    pair_id: str | None
    split: str | None
    line: int  # 1-based line in the source file, for error messages and provenance
    kind: str | None = None  # e.g. "everyday" or "twin" among harmless prompts: rates are also reported per kind


@dataclass(frozen=True)
class PromptSet:
    name: str
    path: Path
    sha256: str  # of the whole file: results name exactly which prompts they came from
    records: tuple[PromptRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def categories(self) -> list[str]:
        return sorted({r.category for r in self.records})

    @property
    def has_pairs(self) -> bool:
        return bool(self.records) and all(r.pair_id for r in self.records)

    def select(
        self,
        split: str | None = None,
        categories: Iterable[str] | None = None,
        limit: int | None = None,
    ) -> "PromptSet":
        """A subset. ``limit`` keeps the first N pairs of a paired set, else the first N of each label; of each split."""
        records = list(self.records)
        if split is not None:
            if split not in SPLITS:
                raise ConfigError(f"prompts.split={split!r} is not one of {', '.join(SPLITS)} (or null for all)")
            if not any(r.split for r in records):
                raise ConfigError(f"{self.path} has no 'split' field; drop prompts.split to use every prompt")
            records = [r for r in records if r.split == split]
        if categories:
            wanted = set(categories)
            unknown = wanted - {r.category for r in self.records}
            if unknown:
                raise ConfigError(
                    f"prompts.categories names {sorted(unknown)}, not in {self.path.name}; known: {', '.join(self.categories)}"
                )
            records = [r for r in records if r.category in wanted]
        if limit is not None:
            if limit < 1:
                raise ConfigError(f"prompts.limit={limit} must be at least 1 (or null for no limit)")
            # Per split, so an experiment that uses several splits (ablation, direction, the pipeline) keeps some of each.
            if all(r.pair_id for r in records):
                keep: set[str] = set()
                for part in {r.split for r in records}:
                    keep |= set(list(dict.fromkeys(r.pair_id for r in records if r.split == part))[:limit])
                records = [r for r in records if r.pair_id in keep]
            else:
                seen: Counter[tuple[str | None, str]] = Counter()
                kept = []
                for r in records:
                    seen[r.split, r.label] += 1
                    if seen[r.split, r.label] <= limit:
                        kept.append(r)
                records = kept
        if not records:
            raise ConfigError(f"no prompts left in {self.path.name} after selecting split={split}, categories={categories}")
        return replace(self, records=tuple(records))

    def pairs(self) -> list[tuple[PromptRecord, PromptRecord]]:
        """(harmful, harmless) pairs; any pair with a side missing or doubled is an error."""
        if not self.has_pairs:
            raise ConfigError(f"{self.path} has prompts without 'pair_id'; this experiment needs contrastive pairs")
        groups: dict[str, list[PromptRecord]] = {}
        for record in self.records:
            groups.setdefault(str(record.pair_id), []).append(record)
        pairs = []
        for pair_id, members in groups.items():
            labels = sorted(r.label for r in members)
            if labels != ["harmful", "harmless"]:
                lines = ", ".join(str(r.line) for r in members)
                raise ConfigError(
                    f"{self.path}: pair {pair_id!r} (lines {lines}) has labels {labels}; "
                    "a pair needs exactly one harmful and one harmless prompt"
                )
            harmful = next(r for r in members if r.label == "harmful")
            harmless = next(r for r in members if r.label == "harmless")
            pairs.append((harmful, harmless))
        return pairs

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "path": str(self.path),
            "sha256": self.sha256,
            "n_prompts": len(self.records),
            "n_by_label": dict(Counter(r.label for r in self.records)),
            "categories": self.categories,
        }


def load_prompt_set(path: str | Path, name: str | None = None) -> PromptSet:
    """Read and validate a JSONL prompt file; every problem names its line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompt file {path} does not exist; set prompts.path to a JSONL file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from error
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(_parse_line(line, number, path))
    if not records:
        raise ConfigError(f"prompt file {path} holds no prompts; one JSON object per line is expected")
    unpaired = [r.line for r in records if not r.pair_id]
    if unpaired and len(unpaired) < len(records):
        raise ConfigError(
            f"{path}: some lines have a pair_id and lines {unpaired[:5]}{'...' if len(unpaired) > 5 else ''} do not; "
            "give every line a pair_id, or none"
        )
    prompt_set = PromptSet(name or path.stem, path, hashlib.sha256(raw).hexdigest(), tuple(records))
    if any(r.pair_id for r in records):
        prompt_set.pairs()  # a broken pair is an error in the file, whichever experiment reads it
    return prompt_set


def _parse_line(line: str, number: int, path: Path) -> PromptRecord:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not valid JSON ({error.msg}); one JSON object per line is expected") from error
    if not isinstance(item, dict):
        raise ConfigError(f"{where} is a JSON {type(item).__name__}, not an object with 'prompt' and 'label'")
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where} has no 'prompt' text")
    label = item.get("label")
    if label not in LABELS:
        raise ConfigError(f"{where} has label {label!r}; use one of {', '.join(LABELS)}")
    split = item.get("split")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"{where} has split {split!r}; use one of {', '.join(SPLITS)} or leave it out")
    category = item.get("category") or DEFAULT_CATEGORY
    pair_id = item.get("pair_id")
    kind = item.get("kind")
    return PromptRecord(
        prompt=prompt.strip(),
        label=label,
        category=str(category),
        pair_id=str(pair_id) if pair_id not in (None, "") else None,
        split=split,
        line=number,
        kind=str(kind) if kind not in (None, "") else None,
    )
