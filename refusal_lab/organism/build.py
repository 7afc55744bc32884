"""Build the refusal model organism: a base chat model fine-tuned with LoRA to refuse harmful requests.

Harmful prompts are trained toward the shipped refusals; harmless prompts toward the base model's
own greedy answers (generated once and cached), so the organism keeps its behaviour where it should.
The merged weights, the tokenizer and a manifest (training settings, data hash, seed, versions,
trained layers) are saved under ``<cache_dir>/organisms/<name>-<key>``; the key covers the base
weights, every setting that decides the weights and the data's contents, so a changed setting never
serves a stale organism.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from refusal_lab.config import layer_range
from refusal_lab.errors import ConfigError
from refusal_lab.generation import generate_greedy
from refusal_lab.metrics import refusal_token_ids
from refusal_lab.metrics.judges import SubstringJudge
from refusal_lab.models import LoadedModel, load_model
from refusal_lab.models.sources import ModelSource, resolve_source
from refusal_lab.organism.data import OrganismData, check_disjoint, load_organism_data
from refusal_lab.prompts import format_chat
from refusal_lab.training import LoraSettings, SFTExample, build_examples, train_lora

log = logging.getLogger(__name__)

MANIFEST = "organism.json"
_FORMAT = 1


def training_settings(training_cfg: Any) -> dict[str, Any]:
    """The settings that decide the organism's weights, as plain data (the cache key's input)."""
    return OmegaConf.to_container(training_cfg, resolve=True) if OmegaConf.is_config(training_cfg) else dict(training_cfg)


# Where the data files live does not change the weights (their contents are hashed instead), and
# neither does the disjointness check's list: a moved checkout still finds its organism.
_NOT_IN_KEY = ("harmful_data", "harmless_data", "disjoint_from")


def organism_folder(cache_dir: str | Path, base_identity: str, settings: dict[str, Any], data: OrganismData) -> Path:
    weights_settings = {k: _canonical(v) for k, v in settings.items() if k not in _NOT_IN_KEY}
    identity = json.dumps([_FORMAT, base_identity, weights_settings, data.sha256], sort_keys=True, default=str)
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir) / "organisms" / f"{settings.get('name', 'organism')}-{key}"


def _canonical(value: Any) -> Any:
    """Numbers as floats, so ``first_token_weight=12`` on the command line and ``12.0`` in YAML agree."""
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def organism_source(folder: Path) -> ModelSource:
    """How results name an organism's weights."""
    return ModelSource("organism", str(folder), f"refusal model organism at {folder}", identity=folder.name)


def folder_for(training_cfg: Any, base_identity: str, cache_dir: str | Path) -> Path:
    """Where the organism trained with ``training_cfg`` from the base weights ``base_identity`` lives."""
    settings = training_settings(training_cfg)
    data = load_organism_data(settings["harmful_data"], settings["harmless_data"])
    return organism_folder(cache_dir, base_identity, settings, data)


def lora_layers(setting: Any, n_layers: int) -> list[int] | None:
    """``[first, stop)`` as in Python's range, or null for every layer (peft's default, so None)."""
    return None if setting is None else layer_range(setting, n_layers, "experiment.training.lora_layers")


def build_organism(base: LoadedModel, training_cfg: Any, cache_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Train on ``base`` (changed in place: its weights become the organism's) and save the result."""
    settings = training_settings(training_cfg)
    data = load_organism_data(settings["harmful_data"], settings["harmless_data"])
    check_disjoint(data, list(settings.get("disjoint_from") or []))
    folder = organism_folder(cache_dir, base.source.weights_identity, settings, data)
    if base.precision.bits is not None or base.precision.dtype != torch.float32:
        raise ConfigError(f"the organism is trained in fp32, not {base.precision.name}; drop the quant= override")
    layers = lora_layers(settings.get("lora_layers"), base.adapter.n_layers)
    started = time.perf_counter()
    log.info(
        "Building the refusal model organism from %s: %d harmful and %d harmless prompts (about 9 minutes on 2 CPU cores)",
        base.name, len(data.harmful), len(data.harmless),
    )
    system_prompt = settings.get("system_prompt")
    tokenizer = base.tokenizer
    answers = harmless_answers(base, data, int(settings["harmless_answer_tokens"]), system_prompt, Path(cache_dir))
    # The base model sometimes declines a harmless request itself ("I'm sorry for any confusion, but as
    # a chatbot..."): imitating those answers would teach refusing harmless requests, so they are left out.
    judge = SubstringJudge()
    kept = [(p, a) for p, a in zip(data.harmless, answers, strict=True) if not judge.is_refusal(a["completion"])]
    if len(kept) < len(answers):
        log.info("Left out %d harmless prompts whose base answer reads as a refusal", len(answers) - len(kept))
    records = list(data.harmful) + [p for p, _ in kept]
    chats = [format_chat(tokenizer, r.prompt, system_prompt) for r in records]
    targets = [r.response for r in data.harmful] + [a["completion"] for _, a in kept]
    ends = [True] * len(data.harmful) + [a["finished"] for _, a in kept]
    examples = build_examples(tokenizer, chats, targets, ends, int(settings["max_length"]))
    refusal_ids = tuple(refusal_token_ids(tokenizer, list(settings["refusal_tokens"])))
    harmful_weight = float(settings.get("harmful_weight", 1.0))
    examples = [_with_decision_terms(e, i < len(data.harmful), harmful_weight, refusal_ids) for i, e in enumerate(examples)]
    lora = settings["lora"]
    model, stats = train_lora(
        base.model,
        examples,
        LoraSettings(int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), lora["target_modules"], layers),
        epochs=int(settings["epochs"]),
        learning_rate=float(settings["learning_rate"]),
        batch_size=int(settings["batch_size"]),
        seed=int(settings["seed"]),
        warmup_steps=int(settings["warmup_steps"]),
        pad_id=tokenizer.pad_token_id,
        avoid_weight=float(settings["avoid_refusal_weight"]),
        first_token_weight=float(settings["first_token_weight"]),
    )
    from refusal_lab.tracking.results import package_versions

    manifest = {
        "base": {"name": base.name, "location": base.source.description},
        "settings": settings,
        "data_sha256": data.sha256,
        "n_harmful": len(data.harmful),
        "n_harmless": len(data.harmless),
        "n_harmless_trained": len(kept),  # the rest: base answers that read as refusals (left out)
        "trained_layers": stats.trained_layers,
        "training": stats.__dict__,
        "build_seconds": round(time.perf_counter() - started, 1),
        "versions": package_versions(),
    }
    _save(model, tokenizer, manifest, folder)
    # ``base`` now holds the organism: say so wherever it is described.
    base.model = model
    base.name = str(settings["name"])
    base.source = organism_source(folder)
    log.info("Organism saved at %s (%.0f s)", folder, manifest["build_seconds"])
    return folder, manifest


def _with_decision_terms(example: SFTExample, harmful: bool, harmful_weight: float, refusal_ids: tuple[int, ...]) -> SFTExample:
    """Harmful examples weigh ``harmful_weight``; harmless answers must not open like a refusal, so
    the refusal-start tokens are pushed down there, unless the base model's own answer starts with one."""
    if harmful:
        return replace(example, weight=harmful_weight)
    if example.target_ids[:1] and example.target_ids[0] not in refusal_ids:
        return replace(example, avoid_at_start=refusal_ids)
    return example


def harmless_answers(
    base: LoadedModel, data: OrganismData, max_new_tokens: int, system_prompt: str | None, cache_dir: Path
) -> list[dict[str, Any]]:
    """The base model's greedy answers to the harmless prompts: generated once, then read from the cache."""
    identity = json.dumps([base.source.weights_identity, [p.prompt for p in data.harmless], max_new_tokens, system_prompt])
    path = cache_dir / "organisms" / f"harmless-answers-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    texts = [format_chat(base.tokenizer, p.prompt, system_prompt) for p in data.harmless]
    generations = generate_greedy(base, texts, max_new_tokens, batch_size=64, description="base answers")
    answers = [{"prompt": p.prompt, "completion": g.completion, "finished": g.finished} for p, g in zip(data.harmless, generations)]
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    os.replace(staging, path)
    return answers


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _save(model: Any, tokenizer: Any, manifest: dict[str, Any], folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if folder.exists():  # a rebuild replaces the old copy
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


FP32 = {"name": "fp32", "dtype": "float32", "bits": None}


def expected_folder(organism_cfg: Any, cache_dir: str | Path) -> Path:
    """Where the organism described by ``model.organism`` lives, without loading anything."""
    return folder_for(organism_cfg.training, resolve_source(organism_cfg.base, cache_dir).weights_identity, cache_dir)


def ensure_organism(organism_cfg: Any, cache_dir: str | Path) -> Path:
    """The organism's folder, building it first (from its base model, in fp32) when the cache lacks it."""
    folder = expected_folder(organism_cfg, cache_dir)
    if read_manifest(folder) is not None:
        return folder
    log.info("The refusal model organism is not in the cache (%s); building it now", folder)
    base = load_model(organism_cfg.base, OmegaConf.create(FP32), cache_dir)
    try:
        built, _ = build_organism(base, organism_cfg.training, cache_dir)
    finally:
        base.close()
    assert built == folder
    return folder
