"""The shared runner: config in, results out.

Order matters: everything that can be wrong with the user's input is checked before the model's
weights load, results reach disk before W&B sees them, and the tracker and the model are always
released, also when the experiment raises.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import set_seed

from refusal_lab.config import check_positive_settings, layer_range, plain_config, redact_overrides
from refusal_lab.experiments import ExperimentResult, get_experiment
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.metrics import make_judge, refusal_token_ids
from refusal_lab.models import LoadedModel, load_weights, plan_model
from refusal_lab.models.sources import ModelSource
from refusal_lab.prompts import load_prompt_set, require_chat_template
from refusal_lab.tracking import JobInfo, make_tracker, package_versions, write_results

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.experiment`` and return its results document (also written to disk)."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    set_seed(int(cfg.seed))
    job = current_job(cfg)
    spec = get_experiment(str(cfg.experiment.name))

    # Cheap checks first (prompts, judge, tracker settings), then the model short of its weights.
    prompts = load_prompt_set(cfg.prompts.path, cfg.prompts.get("name")).select(
        split=cfg.prompts.get("split"), categories=cfg.prompts.get("categories"), limit=cfg.prompts.get("limit")
    )
    if spec.needs_pairs:
        prompts.pairs()
    check_positive_settings(cfg.experiment)
    if spec.check is not None:
        spec.check(cfg)
    judge = make_judge(cfg.get("judge"))
    config = plain_config(cfg)
    tracker = make_tracker(cfg.get("logger"), job, spec.name, config)
    source, steps = organism_step(cfg)
    plan = plan_model(cfg.model, cfg.quant, cfg.paths.cache_dir, source=source)
    if cfg.experiment.get("layers") is not None:
        layer_range(cfg.experiment.layers, plan.n_layers(), "experiment.layers")
    tokenizer = plan.tokenizer
    chat_template = require_chat_template(tokenizer, str(cfg.model.name))
    refusal_ids = refusal_token_ids(tokenizer, list(cfg.model.refusal_tokens))
    log.info(
        "Experiment %s on %s at %s: %d prompts from %s",
        spec.name, cfg.model.name, plan.precision.name, len(prompts), prompts.path.name,
    )

    loaded: LoadedModel | None = None
    failed = True
    tracker.start()
    try:
        loaded = load_weights(cfg.model, plan)
        context = ExperimentContext(cfg, loaded, prompts, judge, refusal_ids, job.output_dir)
        result: ExperimentResult = spec.run(context)
        loaded = context.model  # an experiment may replace the model (the organism does)
        result.metrics.update({f"steps/{name}/seconds": step["seconds"] for name, step in steps.items()})
        provenance = {
            "model": loaded.describe(),
            "prompts": prompts.describe(),
            "judge": judge.describe(),
            "chat_template": chat_template,
            "system_prompt": context.system_prompt,
            "refusal_tokens": {
                "strings": list(cfg.model.refusal_tokens),
                "ids": refusal_ids,
                "decoded": [tokenizer.decode([i]) for i in refusal_ids],
            },
            "steps": steps,
            "seed": int(cfg.seed),
            "versions": package_versions(),
            "job": {"output_dir": str(job.output_dir), "sweep": job.sweep_name, "num": job.job_num, "overrides": job.overrides},
            "started_at": started_at,
            "runtime_s": round(time.perf_counter() - started, 2),
            "config": config,
        }
        files = write_results(job.output_dir, spec.name, result, provenance)
        tracker.log(result, files)
        failed = False
    finally:
        tracker.finish(failed)
        if loaded is not None:
            loaded.close()

    log.info("Results:     %s", files.results)
    for name, path in files.tables.items():
        log.info("Table %-6s %s", name + ":", path)
    for name, path in files.files.items():
        log.info("%-12s %s", name.capitalize() + ":", path)
    where = tracker.describe()
    if where:
        log.info("W&B run:     %s", where)
    return {"metrics": result.metrics, "results_path": str(files.results), **provenance}


def organism_step(cfg: DictConfig) -> tuple[ModelSource | None, dict[str, Any]]:
    """Make sure the organism the config names exists (cached, merged from the shipped adapter, or
    trained): a step of its own, timed and recorded, before the model is planned and loaded."""
    if not cfg.model.get("organism") or cfg.model.get("path"):
        return None, {}
    from refusal_lab.organism.build import ensure_organism, organism_source

    started = time.perf_counter()
    folder, origin = ensure_organism(cfg.model.organism, cfg.paths.cache_dir)
    seconds = round(time.perf_counter() - started, 2)
    log.info("Organism step: %s organism at %s (%.1f s)", origin, folder, seconds)
    return organism_source(folder), {"organism": {"origin": origin, "folder": str(folder), "seconds": seconds}}


def current_job(cfg: DictConfig) -> JobInfo:
    """This job's output folder and sweep, from Hydra when it runs us, else from the config."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        return JobInfo(output_dir=Path(cfg.paths.output_dir))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = redact_overrides(list(hydra_cfg.overrides.task))
    return JobInfo(
        output_dir=Path(hydra_cfg.runtime.output_dir),
        # <date>_<time>_<experiment>: unique per sweep, readable as a W&B group name
        sweep_name="_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None,
        job_num=int(hydra_cfg.job.num) if multirun else None,
        overrides=overrides,
        name=job_name(int(hydra_cfg.job.num), overrides, hydra_cfg.job.config.override_dirname.exclude_keys) if multirun else None,
    )


def job_name(num: int, overrides: list[str], exclude_keys: Any) -> str:
    """``<num>_<overrides>`` as Hydra names a multirun job's folder (sorted, the path keys left out), from
    overrides whose secrets are already redacted: what the job's W&B run is called."""
    excluded = set(exclude_keys or [])
    return f"{num}_" + ",".join(sorted(o for o in overrides if o.partition("=")[0].lstrip("+~") not in excluded))
