"""The shared runner: config in, results out.

Order matters: everything that can be wrong with the user's input is checked before the model's
weights load, results reach disk before W&B sees them, and the tracker and the model are always
released, also when the experiment raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import set_seed

from refusal_lab.config import plain_config, redact_overrides
from refusal_lab.experiments import ExperimentResult, get_experiment
from refusal_lab.generation import Generation, generate_greedy
from refusal_lab.metrics import make_judge, refusal_score, refusal_token_ids
from refusal_lab.metrics.judges import Judge
from refusal_lab.models import LoadedModel, load_weights, plan_model
from refusal_lab.prompts import PromptRecord, PromptSet, format_chat, load_prompt_set, require_chat_template
from refusal_lab.tracking import JobInfo, make_tracker, package_versions, write_results

log = logging.getLogger(__name__)


class Runner:
    """What every experiment gets: the loaded model, the prompt set, the judge and the config."""

    def __init__(
        self,
        cfg: DictConfig,
        model: LoadedModel,
        prompts: PromptSet,
        judge: Judge,
        refusal_ids: list[int],
        output_dir: Path,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.prompts = prompts
        self.judge = judge
        self.refusal_ids = refusal_ids
        self.output_dir = output_dir
        self.system_prompt: str | None = cfg.model.get("system_prompt")

    def chat_texts(self, records: Sequence[PromptRecord]) -> list[str]:
        return [format_chat(self.model.tokenizer, r.prompt, self.system_prompt) for r in records]

    def generate(self, records: Sequence[PromptRecord], max_new_tokens: int, batch_size: int, description: str) -> list[Generation]:
        """Greedy completions, each with its refusal score as ``readout``."""
        return generate_greedy(
            self.model,
            self.chat_texts(records),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            first_logits_readout=lambda logits: refusal_score(logits, self.refusal_ids),
            description=description,
        )


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
    if spec.check is not None:
        spec.check(cfg)
    judge = make_judge(cfg.get("judge"))
    config = plain_config(cfg)
    tracker = make_tracker(cfg.get("logger"), job, spec.name, config)
    plan = plan_model(cfg.model, cfg.quant, cfg.paths.cache_dir)
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
        runner = Runner(cfg, loaded, prompts, judge, refusal_ids, job.output_dir)
        result: ExperimentResult = spec.run(runner, cfg)
        loaded = runner.model  # an experiment may replace the model (the organism does)
        provenance = {
            "model": loaded.describe(),
            "prompts": prompts.describe(),
            "judge": judge.describe(),
            "chat_template": chat_template,
            "system_prompt": runner.system_prompt,
            "refusal_tokens": {
                "strings": list(cfg.model.refusal_tokens),
                "ids": refusal_ids,
                "decoded": [tokenizer.decode([i]) for i in refusal_ids],
            },
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


def current_job(cfg: DictConfig) -> JobInfo:
    """This job's output folder and sweep, from Hydra when it runs us, else from the config."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed without Hydra's runtime (tests, notebooks)
        return JobInfo(output_dir=Path(cfg.paths.output_dir))
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return JobInfo(
        output_dir=Path(hydra_cfg.runtime.output_dir),
        # <date>_<time>_<experiment>: unique per sweep, readable as a W&B group name
        sweep_name="_".join(Path(hydra_cfg.sweep.dir).parts[-2:]) if multirun else None,
        job_num=int(hydra_cfg.job.num) if multirun else None,
        overrides=redact_overrides(list(hydra_cfg.overrides.task)),
    )
