"""Build the refusal model organism: a base chat model fine-tuned with LoRA to refuse harmful requests.

Harmful prompts are trained toward the shipped refusals; harmless prompts toward the base model's
own greedy answers (generated once and cached), with a KL term that keeps their whole next-token
distributions close to the base model's. The LoRA itself ships with the project
(``training.adapter``, with its manifest), so a user's first run merges it into the base weights in
seconds instead of training; it is used only while its manifest matches the base weights, the
settings and the data (``stale_reasons``), and anything else trains anew.

The merged weights, the tokenizer, the adapter and the manifest are cached under
``<cache_dir>/organisms/<name>-<key>``; the key covers the base weights, every setting that decides
the weights and the data's contents, so a changed setting never serves a stale organism.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
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
from refusal_lab.models.adapters import adapter_for
from refusal_lab.models.precision import FP32
from refusal_lab.models.sources import ModelSource, resolve_source
from refusal_lab.organism.data import OrganismData, check_disjoint, data_paths, load_organism_data
from refusal_lab.prompts import format_chat
from refusal_lab.training import LoraSettings, SFTExample, TrainedLora, build_examples, merge_adapter, save_adapter, train_lora

log = logging.getLogger(__name__)

MANIFEST = "organism.json"
ADAPTER = "adapter"  # the LoRA's subfolder in a cached organism
_FORMAT = 2


def training_settings(training_cfg: Any) -> dict[str, Any]:
    """The settings that decide the organism's weights, as plain data (the cache key's input)."""
    return OmegaConf.to_container(training_cfg, resolve=True) if OmegaConf.is_config(training_cfg) else dict(training_cfg)


# Where files live does not change the weights (the data's contents are hashed instead), and
# neither does the disjointness check's list: a moved checkout still finds its organism.
# ``choices`` is prose: what was compared on the val splits to choose these settings, with figures.
_NOT_IN_KEY = ("harmful_data", "harmless_data", "disjoint_from", "adapter", "choices")


def weights_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the weights, numbers as floats: what a key and a manifest record."""
    return {k: _canonical(v) for k, v in sorted(settings.items()) if k not in _NOT_IN_KEY}


def organism_folder(cache_dir: str | Path, base_identity: str, settings: dict[str, Any], data: OrganismData) -> Path:
    identity = json.dumps([_FORMAT, base_identity, weights_settings(settings), data.sha256], sort_keys=True, default=str)
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


def organism_source(folder: Path, origin: str | None = None) -> ModelSource:
    """How results name an organism's weights (``origin``: how this run got them: cache, shipped or trained)."""
    return ModelSource("organism", str(folder), f"refusal model organism at {folder}", identity=folder.name, origin=origin)


def folder_for(training_cfg: Any, base_identity: str, cache_dir: str | Path) -> Path:
    """Where the organism trained with ``training_cfg`` from the base weights ``base_identity`` lives."""
    settings = training_settings(training_cfg)
    data = load_organism_data(settings["harmful_data"], settings["harmless_data"])
    return organism_folder(cache_dir, base_identity, settings, data)


def lora_layers(setting: Any, n_layers: int) -> list[int] | None:
    """``[first, stop)`` as in Python's range, or null for every layer (peft's default, so None)."""
    return None if setting is None else layer_range(setting, n_layers, "experiment.training.lora_layers")


def base_fingerprint(source: ModelSource) -> str:
    """What the base weights are for a shipped adapter: the GGUF file's sha256 where there is one
    (the de-quantized copy's key also names the converter's versions, which do not change the weights)."""
    return source.content_sha256 or source.weights_identity


def stale_reasons(manifest: dict[str, Any] | None, settings: dict[str, Any], data: OrganismData, fingerprint: str) -> list[str]:
    """Why a shipped adapter's manifest does not describe the organism these settings ask for (empty: it does)."""
    if manifest is None:
        return ["no shipped adapter"]
    reasons = []
    if manifest.get("format") != _FORMAT:
        reasons.append(f"manifest format {manifest.get('format')} (this version writes {_FORMAT})")
    if manifest.get("base", {}).get("fingerprint") != fingerprint:
        reasons.append(f"trained on base weights {manifest.get('base', {}).get('fingerprint')}, these are {fingerprint}")
    if manifest.get("data", {}).get("sha256") != data.sha256:
        reasons.append("the training data changed since it was trained")
    recorded, wanted = manifest.get("settings", {}), weights_settings(settings)
    changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
    if changed:
        reasons.append("settings changed since it was trained: " + ", ".join(f"{k} {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed))
    return reasons


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_adapter(settings: dict[str, Any]) -> Path | None:
    return Path(settings["adapter"]) if settings.get("adapter") else None


@dataclass
class Organism:
    """A made organism: its cache folder, its manifest and the loaded merged model (a new value: the base
    model it came from is left as it was)."""

    folder: Path
    manifest: dict[str, Any]
    model: LoadedModel


def make_organism(base: LoadedModel, training_cfg: Any, cache_dir: str | Path, rebuild: bool = False) -> Organism:
    """The organism made from ``base`` and cached: the shipped adapter merged in when its manifest matches,
    else (or with ``rebuild``) trained from the data. ``base`` is not changed: the LoRA goes on a copy."""
    settings = training_settings(training_cfg)
    data = load_organism_data(settings["harmful_data"], settings["harmless_data"])
    check_disjoint(data, list(settings.get("disjoint_from") or []))
    if base.precision.bits is not None or base.precision.dtype != torch.float32:
        raise ConfigError(f"the organism is built in fp32, not {base.precision.name}; drop the quant= override")
    folder = organism_folder(cache_dir, base.source.weights_identity, settings, data)
    fingerprint = base_fingerprint(base.source)
    shipped = shipped_adapter(settings)
    shipped_manifest = read_manifest(shipped) if shipped is not None else None
    reasons = stale_reasons(shipped_manifest, settings, data, fingerprint)
    started = time.perf_counter()
    if not rebuild and not reasons:
        log.info("Merging the shipped organism adapter %s into a copy of %s (trains nothing)", shipped, base.name)
        model = merge_adapter(copy.deepcopy(base.model), shipped)
        manifest = {**shipped_manifest, "origin": "shipped", "shipped_adapter": str(shipped)}
        adapter_source: Path | TrainedLora = shipped
    else:
        if not rebuild and shipped is not None:
            log.warning("Not using the shipped organism adapter (%s); training the organism instead", "; ".join(reasons))
        trained = train_organism(base, settings, data, Path(cache_dir))
        model, adapter_source = trained.model, trained
        manifest = {**_manifest(base, settings, data, fingerprint, trained, time.perf_counter() - started), "origin": "trained"}
    manifest["made_in_seconds"] = round(time.perf_counter() - started, 1)
    _save(model, base.tokenizer, manifest, adapter_source, base.name, folder)
    log.info("Organism saved at %s (%.0f s)", folder, time.perf_counter() - started)
    log_figures(manifest)
    made = replace(base, model=model, adapter=adapter_for(model), name=str(settings["name"]), source=organism_source(folder, str(manifest["origin"])))
    return Organism(folder, manifest, made)


def train_organism(base: LoadedModel, settings: dict[str, Any], data: OrganismData, cache_dir: Path) -> TrainedLora:
    """Train the LoRA on a copy of ``base``'s weights (the copy is wrapped and merged; ``base`` is left as it was)."""
    layers = lora_layers(settings.get("lora_layers"), base.adapter.n_layers)
    log.info(
        "Training the refusal model organism from %s: %d harmful and %d harmless prompts (see the README for how long)",
        base.name, len(data.harmful), len(data.harmless),
    )
    system_prompt = settings.get("system_prompt")
    answers = harmless_answers(base, data, int(settings["harmless_answer_tokens"]), system_prompt, cache_dir)
    examples = training_examples(base.tokenizer, settings, data, answers)
    kl_weight = float(settings.get("kl_weight", 0.0))
    lora = settings["lora"]
    return train_lora(
        copy.deepcopy(base.model),
        examples,
        LoraSettings(int(lora["rank"]), float(lora["alpha"]), float(lora["dropout"]), lora["target_modules"], layers),
        epochs=int(settings["epochs"]),
        learning_rate=float(settings["learning_rate"]),
        batch_size=int(settings["batch_size"]),
        seed=int(settings["seed"]),
        warmup_steps=int(settings["warmup_steps"]),
        pad_id=base.tokenizer.pad_token_id,
        avoid_weight=float(settings["avoid_refusal_weight"]),
        first_token_weight=float(settings["first_token_weight"]),
        kl_weight=kl_weight,
    )


def training_examples(tokenizer: Any, settings: dict[str, Any], data: OrganismData, answers: list[dict[str, Any]]) -> list[SFTExample]:
    """The examples the LoRA learns from: harmful prompts toward their refusals, harmless prompts toward the
    base model's own ``answers`` (those that read as refusals left out), each with its decision terms."""
    # The base model sometimes declines a harmless request itself ("I'm sorry for any confusion, but as
    # a chatbot..."): imitating those answers would teach refusing harmless requests, so they are left out.
    judge = SubstringJudge()
    kept = [(p, a) for p, a in zip(data.harmless, answers, strict=True) if not judge.is_refusal(a["completion"])]
    if len(kept) < len(answers):
        log.info("Left out %d harmless prompts whose base answer reads as a refusal", len(answers) - len(kept))
    system_prompt = settings.get("system_prompt")
    records = list(data.harmful) + [p for p, _ in kept]
    chats = [format_chat(tokenizer, r.prompt, system_prompt) for r in records]
    targets = [r.response for r in data.harmful] + [a["completion"] for _, a in kept]
    ends = [True] * len(data.harmful) + [a["finished"] for _, a in kept]
    examples = build_examples(tokenizer, chats, targets, ends, int(settings["max_length"]))
    refusal_ids = tuple(refusal_token_ids(tokenizer, list(settings["refusal_tokens"])))
    harmful_weight = float(settings.get("harmful_weight", 1.0))
    keep_close = float(settings.get("kl_weight", 0.0)) > 0
    return [_with_decision_terms(e, i < len(data.harmful), harmful_weight, refusal_ids, keep_close) for i, e in enumerate(examples)]


def _manifest(base: LoadedModel, settings: dict[str, Any], data: OrganismData, fingerprint: str, trained: TrainedLora, seconds: float) -> dict[str, Any]:
    """What an organism was trained from and how: enough to check it is current and to rebuild it."""
    from refusal_lab.tracking.results import package_versions

    stats = trained.stats
    return {
        "format": _FORMAT,
        "name": str(settings["name"]),
        "base": {"name": base.name, "fingerprint": fingerprint, "location": base.source.description},
        "settings": weights_settings(settings),
        "seed": int(settings["seed"]),
        "data": {
            "sha256": data.sha256,
            "harmful_files": [p.name for p in data_paths(settings["harmful_data"])],
            "harmless_files": [p.name for p in data_paths(settings["harmless_data"])],
            "n_harmful": len(data.harmful),
            "n_harmless": len(data.harmless),
            "n_harmless_trained": stats.examples - len(data.harmful),  # the rest: base answers that read as refusals
        },
        "trained_layers": stats.trained_layers,
        "training": {**stats.__dict__, "minutes": round(stats.seconds / 60, 1)},
        "build_seconds": round(seconds, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": package_versions(),
    }


def _cpu_model() -> str | None:
    """The processor's name where the system says it (Linux): bit-for-bit reproduction needs the same kind."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def log_figures(manifest: dict[str, Any]) -> None:
    """The organism's figures in a few lines: how it was trained and, for a shipped one, how it did."""
    training, data = manifest["training"], manifest["data"]
    log.info(
        "Organism %s: LoRA rank %s on layers %s-%s, trained on %d harmful and %d harmless prompts, %d steps in %.1f min "
        "(%.0f tokens/s on %s), loss %.3f -> %.3f",
        manifest["name"], manifest["settings"]["lora"]["rank"], manifest["trained_layers"][0], manifest["trained_layers"][-1],
        data["n_harmful"], data["n_harmless_trained"], training["steps"], training["minutes"], training["tokens_per_second"],
        manifest["machine"]["processor"], training["first_loss"], training["final_loss"],
    )
    kl = [value for value in training.get("kl_terms") or [] if value is not None]
    if kl:
        tenth = max(1, len(kl) // 10)
        log.info("Organism %s: KL term to the base model on harmless answers, mean of the first and last tenth of the steps: %.3f -> %.3f",
                 manifest["name"], sum(kl[:tenth]) / tenth, sum(kl[-tenth:]) / tenth)
    for name, figures in (manifest.get("evaluation") or {}).get("sets", {}).items():
        log.info("Organism %s, %s: %s", manifest["name"], name, ", ".join(f"{k} {v}" for k, v in figures.items()))


def _with_decision_terms(
    example: SFTExample, harmful: bool, harmful_weight: float, refusal_ids: tuple[int, ...], keep_close: bool
) -> SFTExample:
    """Harmful examples weigh ``harmful_weight``. Harmless answers must not open like a refusal, so the
    refusal-start tokens are pushed down there (unless the base model's own answer starts with one),
    and with ``keep_close`` (a KL weight above 0) their next-token distributions stay near the base model's."""
    if harmful:
        return replace(example, weight=harmful_weight)
    avoid = refusal_ids if example.target_ids[:1] and example.target_ids[0] not in refusal_ids else ()
    return replace(example, avoid_at_start=avoid, keep_close=keep_close)


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


def _save(model: Any, tokenizer: Any, manifest: dict[str, Any], adapter: Path | TrainedLora, base_name: str, folder: Path) -> None:
    """Merged weights, tokenizer, the LoRA (``adapter/``) and the manifest, renamed into place whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if isinstance(adapter, Path):
            shutil.copytree(adapter, staging / ADAPTER, ignore=shutil.ignore_patterns(MANIFEST))
        else:
            save_adapter(adapter, staging / ADAPTER, base_name)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if folder.exists():  # a rebuild replaces the old copy
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ship_adapter(folder: Path, destination: Path, evaluation: dict[str, Any] | None = None, choices: list[str] | None = None) -> Path:
    """Copy a cached organism's LoRA and manifest (with ``evaluation`` and the recipe's ``choices``
    added) to ``destination``: what the project commits so that users merge instead of train."""
    manifest = read_manifest(folder)
    if manifest is None or not (folder / ADAPTER).is_dir():
        raise ConfigError(f"{folder} is not a cached organism with its adapter; build it first")
    if manifest.get("origin") != "trained":
        raise ConfigError(f"{folder} was merged from a shipped adapter, not trained; ship only what was trained (experiment.rebuild=true)")
    manifest = {k: v for k, v in manifest.items() if k != "origin"}
    if evaluation is not None:
        manifest["evaluation"] = evaluation
    if choices:
        manifest["choices"] = list(choices)
    staging = Path(tempfile.mkdtemp(prefix=destination.name + ".", dir=destination.parent if destination.parent.is_dir() else None))
    try:
        shutil.copytree(folder / ADAPTER, staging, dirs_exist_ok=True)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if destination.exists():
            shutil.rmtree(destination)
        shutil.move(str(staging), destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Shipped the organism adapter to %s", destination)
    return destination


def expected_folder(organism_cfg: Any, cache_dir: str | Path) -> Path:
    """Where the organism described by ``model.organism`` lives, without loading anything."""
    return folder_for(organism_cfg.training, resolve_source(organism_cfg.base, cache_dir).weights_identity, cache_dir)


def ensure(cfg: Any) -> ModelSource:
    """Where ``cfg.model``'s weights are, the organism made first when the model is one and the cache lacks it.

    The organism is derived from its base model: this is the one place that makes it (the runner and
    ``api.prepare_model`` call it), and ``models`` only ever resolves paths, packages and hub ids.
    """
    model_cfg, cache_dir = cfg.model, cfg.paths.cache_dir
    if not model_cfg.get("organism") or model_cfg.get("path"):
        return resolve_source(model_cfg, cache_dir)
    folder, origin = ensure_organism(model_cfg.organism, cache_dir)
    return organism_source(folder, origin)


def ensure_organism(organism_cfg: Any, cache_dir: str | Path) -> tuple[Path, str]:
    """The organism's folder, made first (from its base model, in fp32) when the cache lacks it,
    and how it was got: ``cache``, ``shipped`` (the adapter merged in) or ``trained``."""
    folder = expected_folder(organism_cfg, cache_dir)
    manifest = read_manifest(folder)
    origin = "cache"
    if manifest is None:
        log.info("The refusal model organism is not in the cache (%s); making it now", folder)
        base = load_model(organism_cfg.base, OmegaConf.create(FP32), cache_dir)
        try:
            made = make_organism(base, organism_cfg.training, cache_dir)
            made.model.close()
        finally:
            base.close()
        assert made.folder == folder
        origin = str(made.manifest["origin"])
    else:
        log_figures(manifest)
    return folder, origin
