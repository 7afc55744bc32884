"""Optimised directional ablation, ``experiment=abliteration``: how little refusal is left for how little damage.

The paper's method removes one direction everywhere. This searches a parametrised, layer-weighted
ablation (``direction/weighted.py``: a direction per layer, a fractional index between layers, and a
weight kernel over layers for each residual writer) against two objectives at once, with Optuna's
multi-objective TPE: harmful refusal on the search split (the judge on short greedy generations) and
the harmless next-token KL at the first response position. Its Pareto front is drawn with the paper's
single direction (from this run's direction stage, or a direction results file) on the same axes. A
rule in the config picks one trial; on the evaluation split it is measured like the single direction:
generations judged for refusal, next-token KL, the cross-entropy of the model's own answers, and the
refusal rates on side sets (everyday requests, over-refusal bait); then it is exported by weight edit
and checked against the hooks.

The search runs in this process through Optuna's API (a Hydra multirun would reload the model for every
trial); its storage is a SQLite file under the run folder, so an interrupted search resumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from tqdm.auto import tqdm

from refusal_lab.direction.weighted import WRITERS, Kernel, WeightedAblation, edit_weights, layer_directions, pareto_front, weighted_hooks
from refusal_lab.errors import ConfigError
from refusal_lab.experiments.baseline import answer_rows
from refusal_lab.experiments.context import ExperimentContext
from refusal_lab.experiments.direction import editable_copy, harmless_cost, rates
from refusal_lab.experiments.registry import register_experiment
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.experiments.side_sets import load_side_sets, side_set_rates, side_set_rows
from refusal_lab import metric_keys as K
from refusal_lab.findings import Direction
from refusal_lab.generation import generate_greedy, next_token_logits
from refusal_lab.interventions.operations import directional_ablation
from refusal_lab.metrics.divergence import answer_kl, answer_log_probs, next_token_kl
from refusal_lab.prompts import PromptRecord
from refusal_lab.viz.abliteration import write_abliteration_dashboard

log = logging.getLogger(__name__)

STAGES = ("directions", "search", "evaluation")  # what each split of experiment.splits is used for
NONE, OPTIMISED, SINGLE = "none", "optimised", "single direction"


def check_abliteration(cfg: DictConfig) -> None:
    exp = cfg.experiment
    if cfg.prompts.get("split") is not None:
        raise ConfigError("experiment=abliteration uses three splits of the prompt set (experiment.splits); set prompts.split=null")
    splits = {stage: exp.splits.get(stage) for stage in STAGES}
    if None in splits.values() or len(set(splits.values())) != 3:
        raise ConfigError(f"experiment.splits={splits} must name three different splits for {', '.join(STAGES)}")
    if int(exp.n_trials) < 1:
        raise ConfigError(f"experiment.n_trials={exp.n_trials} must be at least 1")
    low, high = (float(x) for x in exp.space.direction_index)
    if not 0 <= low < high <= 1:
        raise ConfigError(f"experiment.space.direction_index={list(exp.space.direction_index)} must be [low, high] fractions of the depth, 0 <= low < high <= 1")
    if float(exp.select.max_kl) <= 0:
        raise ConfigError(f"experiment.select.max_kl={exp.select.max_kl} must be above 0 (nats)")
    if str(exp.select.kl) not in BOUNDED:
        raise ConfigError(f"experiment.select.kl={exp.select.kl}: use one of {', '.join(BOUNDED)}")
    if int(exp.kl_tokens) < 1:
        raise ConfigError(f"experiment.kl_tokens={exp.kl_tokens} must be at least 1")
    source = exp.get("direction_from")
    if source and not Path(str(source)).is_file():
        raise ConfigError(f"experiment.direction_from={source} is not a file; give a direction run's results/direction.json or null")
    load_side_sets(exp, str(exp.splits.evaluation))


@register_experiment("abliteration", check=check_abliteration)
def run_abliteration(context: ExperimentContext) -> ExperimentResult:
    """Directions per layer, the two-objective search, the chosen trial and the single direction measured on held-out prompts, the export."""
    exp = context.settings
    records = {stage: split_records(context, str(exp.splits[stage])) for stage in STAGES}
    n_layers = context.model.adapter.n_layers
    directions = per_layer_directions(context, records["directions"])
    objective = Objective(context, records["search"], directions)
    trials = search(context, objective)
    front = pareto_front([(t["refusal"], t["kl"]) for t in trials])
    chosen = choose(trials, float(exp.select.max_kl), str(exp.select.kl))
    single = single_direction(context)
    points = {"search": {"optimised": {k: v for k, v in trials[chosen["index"]].items() if k != "params"}}}  # the figures; params in "chosen"
    conditions: dict[str, Any] = {NONE: None, OPTIMISED: weighted_hooks(chosen["params"], directions, n_layers)}
    if single is not None:
        hooks = directional_ablation(context.model.adapter, single.vector)
        points["search"]["single direction"] = {**objective(hooks), "layer": single.layer, "position": single.position}
        conditions[SINGLE] = hooks
    measured, rows = measure(context, records["evaluation"], conditions)
    exported = export(context, chosen["params"], directions, records["evaluation"]) if exp.export else {}
    return write(context, trials, front, chosen, points, single, measured, rows, exported)


def split_records(context: ExperimentContext, split: str) -> dict[str, list[PromptRecord]]:
    limit = context.settings.get("limit_per_label")
    records = list(context.prompts.select(split=split).records)
    by_label = {label: [r for r in records if r.label == label][: limit or None] for label in ("harmful", "harmless")}
    if not by_label["harmful"] or not by_label["harmless"]:
        raise ConfigError(f"the {split} split of {context.prompts.name} needs harmful and harmless prompts")
    return by_label


def per_layer_directions(context: ExperimentContext, records: dict[str, list[PromptRecord]]) -> torch.Tensor:
    """[layers, d_model] unit directions from the means entering each layer at the last prompt token."""
    exp = context.settings
    means = [next_token_logits(context.model, context.chat_texts(records[label]), int(exp.batch_size), capture_last=1)[1]["resid_pre"]
             .float().mean(dim=0)[:, -1] for label in ("harmful", "harmless")]
    return layer_directions(means[0], means[1], bool(exp.project_harmless))


class Objective:
    """A trial's two numbers on the search split: harmful refusal (the judge on short greedy generations) and the
    harmless next-token KL at the first response position. Beside them, what the choice rule and the reader need:
    the KL's one-sided 95 % upper bound over the search prompts (a trial that looks harmless on a few prompts is
    not chosen on luck), and the mean KL along the first ``kl_tokens`` tokens of the unablated model's answers."""

    def __init__(self, context: ExperimentContext, records: dict[str, list[PromptRecord]], directions: torch.Tensor) -> None:
        self.context, self.directions = context, directions
        exp = context.settings
        self.batch, self.tokens, self.kl_tokens = int(exp.batch_size), int(exp.search_new_tokens), int(exp.kl_tokens)
        self.harmful = context.chat_texts(records["harmful"])
        self.harmless = context.chat_texts(records["harmless"])
        self.plain, _ = next_token_logits(context.model, self.harmless, self.batch)
        model = context.model
        self.answers = [a.completion for a in generate_greedy(model, self.harmless, self.kl_tokens, self.batch, progress=False)]
        self.plain_along = answer_log_probs(model.model, model.tokenizer, self.harmless, self.answers, self.kl_tokens, batch_size=self.batch)

    def __call__(self, hooks: Any) -> dict[str, float]:
        model, judge = self.context.model, self.context.judge
        answers = generate_greedy(model, self.harmful, self.tokens, self.batch, hooks=hooks, progress=False)
        ablated, _ = next_token_logits(model, self.harmless, self.batch, hooks=hooks)
        kl = next_token_kl(self.plain, ablated).numpy()
        along = answer_kl(self.plain_along, answer_log_probs(model.model, model.tokenizer, self.harmless, self.answers, self.kl_tokens,
                                                             hooks, self.batch)).numpy()
        return {"refusal": float(np.mean([judge.is_refusal(a.completion) for a in answers])), "kl": float(kl.mean()),
                "kl_upper": upper_bound(kl), "kl_tokens": float(np.nanmean(along))}

    def params(self, trial: optuna.Trial, n_layers: int) -> WeightedAblation:
        space = self.context.settings.space
        low, high = (float(x) * (n_layers - 1) for x in space.direction_index)
        index = trial.suggest_float("direction_index", low, high)
        kernels = {}
        for writer in WRITERS:
            peak = trial.suggest_float(f"{writer}.peak", 0.0, float(space.max_weight))
            kernels[writer] = Kernel(
                peak=peak,
                position=trial.suggest_float(f"{writer}.position", 0.0, n_layers - 1.0),
                floor=peak * trial.suggest_float(f"{writer}.floor_fraction", 0.0, 1.0),
                width=trial.suggest_float(f"{writer}.width", 1.0, float(space.max_width_fraction) * n_layers),
            )
        return WeightedAblation(index, kernels)


def upper_bound(values: np.ndarray) -> float:
    """The one-sided 95 % upper bound of the mean (normal approximation over prompts)."""
    spread = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean() + 1.645 * spread)


def search(context: ExperimentContext, objective: Objective) -> list[dict[str, Any]]:
    """Optuna's multi-objective TPE, resumed from the study file under the run folder; every finished trial."""
    exp = context.settings
    n_layers = context.model.adapter.n_layers
    storage = context.path("abliteration", "optuna.db")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=f"abliteration-{context.model.name}-{context.model.precision.name}", storage=f"sqlite:///{storage}", load_if_exists=True,
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=int(context.cfg.seed), multivariate=True, n_startup_trials=int(exp.startup_trials)),
    )
    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    remaining = max(0, int(exp.n_trials) - done)
    if done:
        log.info("Resuming the search in %s: %d trials done, %d to go", storage, done, remaining)

    def run_trial(trial: optuna.Trial) -> tuple[float, float]:
        params = objective.params(trial, n_layers)
        values = objective(weighted_hooks(params, objective.directions, n_layers))
        trial.set_user_attr("kl_upper", values["kl_upper"])
        trial.set_user_attr("kl_tokens", values["kl_tokens"])
        return values["refusal"], values["kl"]

    with tqdm(total=remaining, desc="abliteration trials", unit="trial") as bar:
        def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            best = min((t.values for t in study.best_trials), key=lambda v: (v[0], v[1]))
            bar.set_postfix(refusal=f"{best[0]:.0%}", kl=f"{best[1]:.3f}")

        study.optimize(run_trial, n_trials=remaining, callbacks=[advance])
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    older = sum("kl_upper" not in t.user_attrs for t in finished)
    if older:  # a study begun before trials recorded their bound: never chosen on a bound they were not measured against
        log.warning("%d trials of %s predate the KL upper bound: their bound counts as unknown (infinite)", older, storage)
    return [{"number": t.number, "refusal": t.values[0], "kl": t.values[1], "kl_upper": t.user_attrs.get("kl_upper", float("inf")),
             "kl_tokens": t.user_attrs.get("kl_tokens"), "params": _params(t.params)} for t in finished]


def _params(values: dict[str, float]) -> WeightedAblation:
    kernels = {w: Kernel(values[f"{w}.peak"], values[f"{w}.position"], values[f"{w}.peak"] * values[f"{w}.floor_fraction"], values[f"{w}.width"])
               for w in WRITERS}
    return WeightedAblation(values["direction_index"], kernels)


BOUNDED = {"upper": "kl_upper", "mean": "kl"}  # select.kl: which of a trial's KL figures max_kl bounds


def choose(trials: list[dict[str, Any]], max_kl: float, bounded: str = "upper") -> dict[str, Any]:
    """The fewest refusals among trials whose KL (its upper bound over the search prompts, or its mean) is at most
    ``max_kl`` (ties: the lower KL); where none is, the lowest KL."""
    key = BOUNDED[bounded]
    what = "harmless KL's 95 % upper bound" if bounded == "upper" else "mean harmless KL"
    within = [i for i, t in enumerate(trials) if t[key] <= max_kl]
    if within:
        index = min(within, key=lambda i: (trials[i]["refusal"], trials[i][key]))
        rule = f"the fewest harmful refusals among trials with {what} <= {max_kl:g}"
    else:
        index = min(range(len(trials)), key=lambda i: (trials[i][key], trials[i]["refusal"]))
        rule = f"no trial reached {what} <= {max_kl:g}: the trial with the lowest {what}"
        log.warning("No abliteration trial kept its %s at or below %g; choosing the trial with the lowest", what, max_kl)
    return {"index": index, "number": trials[index]["number"], "params": trials[index]["params"], "rule": rule, "met_bound": bool(within)}


def single_direction(context: ExperimentContext) -> Direction | None:
    """The paper's direction: this run's direction stage, or a direction results file; None (with a note) without one."""
    found = context.handoff(Direction, model=context.model.name)
    if found is not None:
        return found
    source = context.settings.get("direction_from")
    if not source:
        log.info("No single direction to compare with (run experiment=direction first and give experiment.direction_from, "
                 "or run both in the pipeline)")
        return None
    document = json.loads(Path(str(source)).read_text(encoding="utf-8"))
    chosen = document["details"]["selection"].get("chosen")
    if chosen is None:
        log.warning("%s chose no direction; nothing to compare with", source)
        return None
    vector = load_file(str(Path(str(source)).with_name("direction_vectors.safetensors")))["direction"]
    return Direction(vector, int(chosen["layer"]), int(chosen["position"]), str(document["model"]["name"]),
                     str(document["details"]["splits"]["selection"]), float(chosen["bypass"]), float(chosen["induce"]), float(chosen["kl"]))


def measure(context: ExperimentContext, records: dict[str, list[PromptRecord]], conditions: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Each condition on the evaluation split: generations judged (harmful and harmless), the harmless cost, and the
    side sets' refusal rates."""
    exp = context.settings
    rows: list[dict[str, Any]] = []
    side = load_side_sets(exp, str(exp.splits.evaluation))
    out: dict[str, Any] = {}
    for condition, hooks in conditions.items():
        for label in ("harmful", "harmless"):
            rows += [{**row, "condition": condition, "set": "main"}
                     for row in answer_rows(context, records[label], exp, f"{label}, {condition}", hooks=hooks)]
        rows += side_set_rows(context, side, condition, hooks=hooks)
    side_rates = side_set_rates([r for r in rows if r["set"] != "main"])
    main = [r for r in rows if r["set"] == "main"]
    refusal = rates(main, exp.bootstrap, int(context.cfg.seed))
    before = [r for r in main if r["label"] == "harmless" and r["condition"] == NONE]
    for condition, hooks in conditions.items():
        out[condition] = {
            "harmful_refusal": refusal[f"harmful/{condition}"]["refusal_rate"],
            "harmless_refusal": refusal[f"harmless/{condition}"]["refusal_rate"],
            "side_sets": side_rates.get(condition, {}),
        }
        if hooks is not None:
            out[condition]["cost"] = harmless_cost(context, records["harmless"], [dict(r) for r in before], hooks)
    return out, rows


def export(context: ExperimentContext, params: WeightedAblation, directions: torch.Tensor,
           records: dict[str, list[PromptRecord]]) -> dict[str, Any]:
    """The writers' weights of a full-precision copy edited as the chosen trial ablates; saved, and checked against the hooks."""
    loaded, exp = context.model, context.settings
    full = editable_copy(loaded, context.cfg.paths.cache_dir)
    if loaded.precision.bits is not None:
        how = f"this run's model is {loaded.precision.name}; the export reloads its weights at fp32 from {loaded.source.location} and edits those"
    else:
        how = f"the run's own weights at {loaded.precision.name}, edited"
    chats = context.chat_texts(records["harmful"] + records["harmless"])
    hooked, _ = next_token_logits(loaded, chats, int(exp.batch_size), hooks=weighted_hooks(params, directions, loaded.adapter.n_layers))
    edited = edit_weights(full.adapter, params, directions)
    folder = context.path("abliteration", "model")
    folder.mkdir(parents=True, exist_ok=True)
    full.model.save_pretrained(folder, safe_serialization=True)
    loaded.tokenizer.save_pretrained(folder)
    exported, _ = next_token_logits(full, chats, int(exp.batch_size))
    full.close()
    exact = not loaded.adapter.writes_through_norm
    report = {
        "folder": str(folder), "how": how, "edited": edited, "exact": exact,
        "check": {"max_abs_logit_diff": float((exported - hooked).abs().max()), "prompts": len(chats),
                  "against": f"the weighted ablation through hooks on this run's {loaded.precision.name} model, first response position"},
        "load_with": f"python -m refusal_lab model=local model.path={folder}",
        "ablation": params.describe(loaded.adapter.n_layers),
    }
    (folder / "abliteration.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("Exported the edited model to %s (largest logit difference from the hooks: %.2e)", folder, report["check"]["max_abs_logit_diff"])
    return report


def write(context: ExperimentContext, trials: list[dict[str, Any]], front: list[int], chosen: dict[str, Any], points: dict[str, Any],
          single: Direction | None, measured: dict[str, Any], rows: list[dict[str, Any]], exported: dict[str, Any]) -> ExperimentResult:
    exp, n_layers = context.settings, context.model.adapter.n_layers
    trial_rows = [{"number": t["number"], "refusal": t["refusal"], "kl": t["kl"], "kl_upper": t["kl_upper"], "kl_tokens": t["kl_tokens"],
                   "pareto": i in front, **t["params"].describe(n_layers)}
                  for i, t in enumerate(trials)]
    metrics: dict[str, float] = {K.ABLITERATION_TRIALS: float(len(trials)), "abliteration/pareto_size": float(len(front)),
                                 "abliteration/search/refusal": trials[chosen["index"]]["refusal"], "abliteration/search/kl": trials[chosen["index"]]["kl"]}
    for condition, values in measured.items():
        metrics[K.abliteration(condition, "harmful_refusal")] = values["harmful_refusal"]["mean"]
        metrics[K.abliteration(condition, "harmless_refusal")] = values["harmless_refusal"]["mean"]
        for name, side in values["side_sets"].items():
            metrics[K.abliteration(condition, f"{name}_refusal")] = side["refusal_rate"]
        if "cost" in values:
            metrics[K.abliteration(condition, "kl")] = values["cost"]["kl"]["mean"]
            metrics[K.abliteration(condition, "cross_entropy_change")] = values["cost"]["cross_entropy"]["change"]["mean"]
            metrics[K.abliteration(condition, "kl_tokens")] = values["cost"]["kl_tokens"]["mean"]
            metrics[K.abliteration(condition, "kl_median")] = values["cost"]["kl_median"]
            answered = values["cost"]["kl_by_unablated_decision"]["answered"]
            if answered["n"]:
                metrics[K.abliteration(condition, "kl_answered")] = answered["mean"]
    if exported:
        metrics["abliteration/export/max_abs_logit_diff"] = exported["check"]["max_abs_logit_diff"]
    details = {
        "precision": context.model.precision.name, "splits": dict(exp.splits),
        "search": {"objectives": ["harmful refusal (judge, greedy, search_new_tokens)", "harmless next-token KL (first response position)"],
                   "recorded": {"kl_upper": "one-sided 95 % upper bound of the harmless KL over the search prompts",
                                "kl_tokens": f"mean harmless KL along the first {int(exp.kl_tokens)} tokens of the unablated model's answers"},
                   "sampler": "optuna TPESampler(multivariate=True), multi-objective", "n_trials": len(trials),
                   "storage": str(context.path("abliteration", "optuna.db")), "space": OmegaConf.to_container(exp.space, resolve=True)},
        "trials": trial_rows, "pareto": [trials[i]["number"] for i in front],
        "chosen": {"number": chosen["number"], "rule": chosen["rule"], "met_bound": chosen["met_bound"], "ablation": chosen["params"].describe(n_layers)},
        "points": points, "single_direction": None if single is None else {"layer": single.layer, "position": single.position, "kl_at_selection": single.kl},
        "measured": measured, "export": exported,
        "bootstrap": {"resamples": int(exp.bootstrap.resamples), "level": float(exp.bootstrap.level), "over": "prompts"},
    }
    _log_summary(details)
    header = {"title": f"Optimised directional ablation: {context.model.name} at {context.model.precision.name}", "prompts": context.prompts.name}
    files = {"dashboard": write_abliteration_dashboard(details, header, context.path("abliteration", "dashboard.html")),
             "study": context.path("abliteration", "optuna.db")}
    return ExperimentResult(metrics=metrics, details=details, tables={"completions": rows, "trials": trial_rows}, files=files)


def _log_summary(details: dict[str, Any]) -> None:
    log.info("Search: %d trials, %d on the Pareto front; chosen trial %d (%s)", details["search"]["n_trials"], len(details["pareto"]),
             details["chosen"]["number"], details["chosen"]["rule"])
    for condition, values in details["measured"].items():
        cost = values.get("cost")
        side = ", ".join(f"{name} {v['refusal_rate']:.0%}" for name, v in values["side_sets"].items())
        kl = "" if not cost else (f", harmless KL {cost['kl']['mean']:.3f} (median {cost['kl_median']:.3f}; "
                                  f"{cost['kl_by_unablated_decision']['answered']['mean']:.3f} where it answered unablated; "
                                  f"{cost['kl_tokens']['mean']:.3f} along the first {cost['kl_tokens']['tokens']} answer tokens)")
        log.info("%-16s harmful refused %.0f%%, harmless refused %.0f%%%s%s", condition, 100 * values["harmful_refusal"]["mean"],
                 100 * values["harmless_refusal"]["mean"], kl, f"; {side}" if side else "")
