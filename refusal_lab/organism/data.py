"""The organism's training data: harmful requests with refusals, harmless requests to keep answering.

JSONL files in ``data/organism/``, one or several per side:
    harmful   {"prompt", "category", "subtopic", "form", "response"}  (response: the refusal to learn)
    harmless  {"prompt", "category", "subtopic", "form", "kind"}      (answers come from the base model)
They must share no prompt with the sets used for analysis; ``check_disjoint`` enforces it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from refusal_lab.errors import ConfigError
from refusal_lab.prompts import load_prompt_set


@dataclass(frozen=True)
class TrainingPrompt:
    prompt: str
    category: str
    response: str | None  # the refusal for a harmful prompt; None: the base model's own answer


@dataclass(frozen=True)
class OrganismData:
    harmful: tuple[TrainingPrompt, ...]
    harmless: tuple[TrainingPrompt, ...]
    sha256: str  # of every file, in order: names exactly what an organism was trained on


DataFiles = str | Path | Sequence[str | Path]


def data_paths(files: DataFiles) -> list[Path]:
    """One file or a list of them (a config may name either)."""
    return [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]


def load_organism_data(harmful_files: DataFiles, harmless_files: DataFiles) -> OrganismData:
    harmful_paths, harmless_paths = data_paths(harmful_files), data_paths(harmless_files)
    if not harmful_paths or not harmless_paths:
        raise ConfigError("the organism needs at least one harmful and one harmless training file")
    harmful = [r for path in harmful_paths for r in _read(path, needs_response=True)]
    harmless = [r for path in harmless_paths for r in _read(path, needs_response=False)]
    # Files of one side are joined by \x01, the sides by \0: one file a side hashes as it always has.
    digest = hashlib.sha256(_joined(harmful_paths) + b"\0" + _joined(harmless_paths)).hexdigest()
    return OrganismData(tuple(harmful), tuple(harmless), digest)


def _joined(paths: list[Path]) -> bytes:
    return b"\x01".join(path.read_bytes() for path in paths)


def _read(path: Path, needs_response: bool) -> list[TrainingPrompt]:
    if not path.is_file():
        raise ConfigError(f"organism training file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number} is not valid JSON ({error.msg})") from error
        prompt, response = item.get("prompt"), item.get("response")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{path}:{number} has no 'prompt' text")
        if needs_response and (not isinstance(response, str) or not response.strip()):
            raise ConfigError(f"{path}:{number} has no 'response': every harmful training prompt needs its refusal")
        records.append(TrainingPrompt(prompt.strip(), str(item.get("category") or "uncategorized"), response.strip() if needs_response else None))
    if not records:
        raise ConfigError(f"organism training file {path} holds no prompts")
    return records


def normalise(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def check_disjoint(data: OrganismData, analysis_paths: list[str | Path]) -> None:
    """No training prompt may also be an analysis prompt (compared after normalising case and punctuation)."""
    training = {normalise(p.prompt) for p in data.harmful + data.harmless}
    for path in analysis_paths:
        shared = [r.prompt for r in load_prompt_set(path).records if normalise(r.prompt) in training]
        if shared:
            raise ConfigError(f"{len(shared)} organism training prompts also appear in {path}, e.g. {shared[0]!r}")
