"""The shared runner: config in, results out.

Order matters: everything that can be wrong with the user's input is checked before the model's
weights load, results reach disk before W&B sees them, and the tracker and the model are always
released, also when the experiment raises.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig
from transformers import set_seed

from refusal_lab.config import layer_range, plain_config, redact_overrides
from refusal_lab.errors import Interrupted
from refusal_lab import organism
from refusal_lab.experiments import ExperimentResult
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.pipeline import PIPELINE, plan_stages, summarize
from refusal_lab.interventions.activation_cache import ActivationCache
from refusal_lab.metrics import make_judge, refusal_token_ids
from refusal_lab.models import LoadedModel, load_weights, plan_model
from refusal_lab.models.sources import ModelSource
from refusal_lab.prompts import load_prompt_set, require_chat_template
from refusal_lab.tracking import JobInfo, make_tracker, package_versions, write_results
from refusal_lab.tracking.results import ResultFiles, write_failure

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.experiment`` (one experiment, or the pipeline's stages) and return its results document (also
    written to disk). A failure is written too, as the results file of what was run, and then raised."""
    started = time.perf_counter()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    job = current_job(cfg)
    name = str(cfg.experiment.name)
    record = {"job": describe_job(job), "started_at": started_at, "config": plain_config(cfg)}
    finished: list[str] = []  # the stages whose results are on disk
    try:
        with sigterm_interrupts():
            return _run(cfg, job, record, started, finished)
    except BaseException as error:
        if name in finished:  # its results were written whole before the stop: they stand
            raise
        record["runtime_s"] = round(time.perf_counter() - started, 2)
        path = write_failure(job.output_dir, name, error, {**record, "finished_stages": finished})
        if isinstance(error, Interrupted):
            log.error("%s was %s after %.0f s; finished stages: %s; recorded in %s", name, error, record["runtime_s"],
                      ", ".join(finished) or "none", path)
        else:
            log.error("%s failed (%s: %s); the failure is recorded in %s", name, type(error).__name__, error, path)
        raise


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While a run is on, SIGTERM raises ``Interrupted`` (so the results file says so) instead of killing the
    process silently. Only where nothing else handles SIGTERM (submitit's requeueing handler stays) and in the
    main thread, the only one that takes signals."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(cfg: DictConfig, job: JobInfo, record: dict[str, Any], started: float, finished: list[str]) -> dict[str, Any]:
    set_seed(int(cfg.seed))
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))  # jobs in parallel processes share the cores
    name = str(cfg.experiment.name)
    # Cheap checks first (prompts, every stage's settings, judge, tracker settings), then the model short of its weights.
    prompt_set = load_prompt_set(cfg.prompts.path, cfg.prompts.get("name"))
    stages = plan_stages(cfg, prompt_set)
    judge = make_judge(cfg.get("judge"))
    tracker = make_tracker(cfg.get("logger"), job, name, record["config"])
    source, steps = model_source(cfg)
    plan = plan_model(cfg.model, cfg.quant, cfg.paths.cache_dir, source=source)
    for stage in stages:
        if stage.cfg.experiment.get("layers") is not None:
            layer_range(stage.cfg.experiment.layers, plan.n_layers(), "experiment.layers")
    tokenizer = plan.tokenizer
    chat_template = require_chat_template(tokenizer, str(cfg.model.name))
    refusal_ids = refusal_token_ids(tokenizer, list(cfg.model.refusal_tokens))
    log.info(
        "Experiment %s on %s at %s: %s from %s",
        name, cfg.model.name, plan.precision.name, ", ".join(f"{s.name} {len(s.prompts)} prompts" for s in stages), prompt_set.path.name,
    )

    loaded: LoadedModel | None = None
    failed = True
    written: dict[str, ResultFiles] = {}
    tracker.start()
    try:
        loaded = load_weights(cfg.model, plan)
        results: dict[str, ExperimentResult] = {}
        seconds: dict[str, float] = {}
        clean_runs = ActivationCache("this process") if len(stages) > 1 else None  # later stages reuse earlier clean runs
        facts = {  # what every results file of this run records, beside what differs per stage
            "judge": judge.describe(), "chat_template": chat_template, "system_prompt": cfg.model.get("system_prompt"),
            "refusal_tokens": {"strings": list(cfg.model.refusal_tokens), "ids": refusal_ids, "decoded": [tokenizer.decode([i]) for i in refusal_ids]},
            "steps": steps, "seed": int(cfg.seed), "versions": package_versions(), **record,
        }
        for stage in stages:
            clock = time.perf_counter()
            handoffs = [found for earlier in results.values() for found in earlier.handoffs]
            context = ExperimentContext(stage.cfg, loaded, stage.prompts, judge, refusal_ids, job.output_dir, handoffs, clean_runs)
            result = stage.spec.run(context)
            result.metrics.update({f"steps/{step}/seconds": value["seconds"] for step, value in steps.items()})
            seconds[stage.name] = time.perf_counter() - clock
            results[stage.name] = result
            alone = len(stages) == 1
            provenance = {**facts, "model": loaded.describe(), "prompts": stage.prompts.describe(), "process": process_now(),
                          "runtime_s": round(time.perf_counter() - started if alone else seconds[stage.name], 2),
                          "config": plain_config(stage.cfg)}  # as the stage ran: its study sizes and debug shrink applied
            written[stage.name] = write_results(job.output_dir, stage.name, result, provenance)
            finished.append(stage.name)
            tracker.log(stage.name, result, written[stage.name])
        if name == PIPELINE:
            result = summarize(stages, results, written, seconds, job.output_dir / "results" / "pipeline_dashboard.html")
            provenance = {**provenance, "prompts": prompt_set.describe(), "runtime_s": round(time.perf_counter() - started, 2), "config": record["config"]}
            written[name] = write_results(job.output_dir, name, result, provenance)
            finished.append(name)
            tracker.log(name, result, written[name])
        failed = False
    finally:
        tracker.finish(failed)
        if loaded is not None:
            loaded.close()

    for stage_name, files in written.items():
        log.info("Results:     %s", files.results)
        for table, path in files.tables.items():
            log.info("Table %-6s %s", table + ":", path)
        for what, path in files.files.items():
            log.info("%-12s %s", what.capitalize() + ":", path)
    where = tracker.describe()
    if where:
        log.info("W&B run:     %s", where)
    every_metric = {key: value for stage_result in results.values() for key, value in stage_result.metrics.items()} | result.metrics
    return {"metrics": every_metric, "results_path": str(written[name].results), **provenance}


def process_now() -> dict[str, Any]:
    """This process and its resident memory: jobs that share a process (a multirun) show a leak here."""
    return {"pid": os.getpid(), "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1)}


def describe_job(job: JobInfo) -> dict[str, Any]:
    return {"output_dir": str(job.output_dir), "sweep": job.sweep_name, "num": job.job_num, "overrides": job.overrides}


def model_source(cfg: DictConfig) -> tuple[ModelSource, dict[str, Any]]:
    """Where the model's weights are. An organism is made first when the cache lacks it (merged from the
    shipped adapter, or trained): a step of its own, timed and recorded, before the model is planned and loaded."""
    started = time.perf_counter()
    source = organism.ensure(cfg)
    if source.origin is None:
        return source, {}
    seconds = round(time.perf_counter() - started, 2)
    log.info("Organism step: %s organism at %s (%.1f s)", source.origin, source.location, seconds)
    return source, {"organism": {"origin": source.origin, "folder": source.location, "seconds": seconds}}


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
