"""What a comparison measures, per job of a sweep, from its results files alone.

Does the mechanism survive quantization, and where does it live? Per job (one precision, one layer
band, ...): the refusal rates and the refusal-score separation; the rank correlation of the patching
effects with the reference job's and the overlap of their top-k components; the cosine of the chosen
refusal directions; the outcomes of ablation and activation addition. The reference of a job is the
full-precision (fp32) job with the same other overrides. Jobs that failed (their results file says
so) or left no results are reported as such. Everything is read through ``refusal_lab.tracking.reading``,
so folders copied from other machines compare the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refusal_lab.errors import ConfigError
from refusal_lab import metric_keys as K
from refusal_lab.uncertainty import spearman
from refusal_lab.tracking.reading import RunResults, find_results

REFERENCE_PRECISION = "fp32"
TOP_K = 10
DIRECTIONS = ("harmless_to_harmful", "harmful_to_harmless")
_PATHS = ("hydra.", "paths.")  # overrides that say where, not what: never what tells jobs apart


@dataclass
class Job:
    """One job folder of the sweep: its overrides, whether it finished, and its results by experiment."""

    folder: Path
    overrides: dict[str, str]
    results: dict[str, RunResults] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # experiment -> error message
    interrupted: dict[str, list[str]] = field(default_factory=dict)  # experiment -> the stages that had finished

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def status(self) -> str:
        if self.interrupted:
            return "interrupted"
        return "failed" if self.failures else ("finished" if self.results else "no results")

    @property
    def precision(self) -> str | None:
        for result in self.results.values():
            if "model" in result.document:
                return result.precision
        return self.overrides.get("quant")

    def get(self, experiment: str) -> RunResults | None:
        return self.results.get(experiment)


def gather(folder: str | Path) -> list[Job]:
    """Every job folder of a multirun sweep folder (``<num>_<overrides>/``), with its results files."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder} is not a folder; give a multirun sweep folder (multirun/<date>/<time>_<name>)")
    folders = sorted((p for p in root.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "results").is_dir())), key=_job_order)
    if not folders:
        raise ConfigError(f"{folder} holds no job folders (<num>_<overrides>/ with .hydra/ or results/); is it a multirun sweep folder?")
    jobs = []
    for path in folders:
        job = Job(path, _overrides(path))
        for result in find_results(path):
            if result.document.get("status") == "interrupted":
                done = list(result.document.get("finished_stages") or [])
                job.interrupted[result.experiment] = done
                job.failures[result.experiment] = f"interrupted ({result.document.get('error', {}).get('message', 'stopped')}); " \
                                                  f"finished stages: {', '.join(done) or 'none'}"
            elif result.document.get("status") == "failed":
                error = result.document.get("error", {})
                job.failures[result.experiment] = f"{error.get('type', 'Error')}: {error.get('message', '')}"
            else:
                job.results[result.experiment] = result
        jobs.append(job)
    return jobs


def compare(jobs: list[Job]) -> dict[str, Any]:
    """The comparison document: one row per job, what tells the jobs apart, and which job each is measured against."""
    varying = sorted({k for job in jobs for k in job.overrides if len({j.overrides.get(k) for j in jobs}) > 1})
    rows = []
    for job in jobs:
        reference = reference_of(job, jobs, varying)
        row: dict[str, Any] = {
            "job": job.name, "status": job.status, "failures": job.failures, "precision": job.precision,
            "setting": {k: job.overrides.get(k) for k in varying},
            "reference": reference.name if reference is not None else None,
            "experiments": sorted(job.results),
        }
        row.update(baseline_measures(job))
        row.update(patching_measures(job, reference))
        row.update(direction_measures(job, reference))
        row.update(ablation_measures(job))
        rows.append(row)
    return {
        "jobs": rows,
        "varying": varying,
        "reference_precision": REFERENCE_PRECISION,
        "top_k": TOP_K,
        "n_failed": sum(job.status != "finished" for job in jobs),
    }


def reference_of(job: Job, jobs: list[Job], varying: list[str]) -> Job | None:
    """The finished fp32 job whose other overrides are this job's (itself, for an fp32 job)."""
    others = [k for k in varying if k != "quant"]
    for candidate in jobs:
        if candidate.status == "finished" and candidate.precision == REFERENCE_PRECISION and all(
                candidate.overrides.get(k) == job.overrides.get(k) for k in others):
            return candidate
    return None


def baseline_measures(job: Job) -> dict[str, Any]:
    result = job.get("baseline")
    if result is None:
        return {}
    keys = (K.HARMFUL_REFUSAL, K.HARMLESS_REFUSAL, K.SEPARATION, K.AUROC)
    return {key: result.metrics.get(key) for key in keys}


def patching_measures(job: Job, reference: Job | None) -> dict[str, Any]:
    """Where the effect lives (the top component per direction), and how the effects rank against the reference's."""
    result = job.get("patching")
    if result is None:
        return {}
    out: dict[str, Any] = {K.PATCHING_LAYERS: result.details.get("layers"), K.patching_pairs("patching"): result.metrics.get(K.patching_pairs("patching"))}
    base = reference.get("patching") if reference is not None and reference is not job else None
    for direction in DIRECTIONS:
        ranked = result.details["ranked"].get(direction)
        if not ranked:
            continue
        out[K.compared_patching(direction, "top")] = f"{ranked[0]['component']} ({ranked[0]['effect']:+.3f})"
        if base is None or direction not in base.details["ranked"]:
            continue
        mine, theirs = shared_effects(result, base, direction)
        out[K.compared_patching(direction, "spearman")] = _round(spearman(mine, theirs)) if mine.size else None
        out[K.compared_patching(direction, "n_components")] = int(mine.size)
        top = lambda rows: {r["component"] for r in rows[:TOP_K]}  # noqa: E731
        out[K.compared_patching(direction, "top_k_overlap")] = len(top(ranked) & top(base.details["ranked"][direction])) / TOP_K
    return out


def shared_effects(result: RunResults, base: RunResults, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """The mean effects of every component both runs measured (all sweeps they share), as two aligned vectors."""
    mine, theirs = [], []
    for sweep, summary in result.details["effects"].get(direction, {}).items():
        other = base.details["effects"].get(direction, {}).get(sweep)
        if other is None:
            continue
        a, b = np.array(summary["mean"], dtype=float), np.array(other["mean"], dtype=float)
        if a.shape != b.shape:
            continue
        present = ~np.isnan(a) & ~np.isnan(b)
        mine.append(a[present])
        theirs.append(b[present])
    return (np.concatenate(mine), np.concatenate(theirs)) if mine else (np.array([]), np.array([]))


def direction_measures(job: Job, reference: Job | None) -> dict[str, Any]:
    """The chosen direction, its cosine with the reference's, and what ablating and adding it did."""
    result = job.get("direction")
    if result is None:
        return {}
    chosen = result.details["selection"].get("chosen")
    out: dict[str, Any] = {"direction/chosen": f"layer {chosen['layer']}, position {chosen['position']}" if chosen else "none kept"}
    for label, condition in (("harmful", "none"), ("harmful", "ablation"), ("harmless", "none"), ("harmless", "addition")):
        out[K.direction_refusal(label, condition)] = result.metrics.get(K.direction_refusal(label, condition))
    out[K.DIRECTION_ABLATION_KL] = result.metrics.get(K.DIRECTION_ABLATION_KL)
    base = reference.get("direction") if reference is not None and reference is not job else None
    if base is None or not base.details["selection"].get("chosen"):
        return out
    theirs, mine = base.arrays("vectors"), result.arrays("vectors")
    picked = base.details["selection"]["chosen"]
    cell = (picked["layer"], theirs["candidates"].shape[1] + picked["position"])  # positions count back from the end
    if chosen and "direction" in mine:
        out[K.DIRECTION_COSINE] = _round(cosine(mine["direction"], theirs["direction"]))
    if mine["candidates"].shape == theirs["candidates"].shape:
        # the candidate at the reference's chosen cell: comparable even where the selection chose another cell
        out[K.DIRECTION_COSINE_AT_CELL] = _round(cosine(mine["candidates"][cell], theirs["direction"]))
    return out


def ablation_measures(job: Job) -> dict[str, Any]:
    """The harmful refusal rate with nothing, the top-k and k random components ablated, at the largest k (and whether
    those arms broke the model), and the verdict on necessity at matched damage."""
    result = job.get("ablation")
    if result is None:
        return {}
    summary = result.details["summary"]
    out: dict[str, Any] = {K.ABLATION_NONE: result.metrics.get(K.ABLATION_NONE)}
    if summary:
        last = summary[-1]
        out[K.COMPARED_ABLATION_K] = last["k"]
        out[K.compared_ablation("top", "refusal_rate")] = last["top"]["refusal_rate"]
        out[K.compared_ablation("random", "refusal_rate")] = last["random"]["refusal_rate"] if last["random"] else None
        out[K.compared_ablation("top", "harmless_kl")] = last["top"]["harmless_kl"]
        out[K.compared_ablation("top", "broken")] = last["top"].get("broken")
    finding = result.details.get("necessity")
    if finding is not None:
        out[K.ABLATION_NECESSARY] = finding["necessary"]
        out[K.ABLATION_BEST_GAP] = finding["best_gap"]
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm else float("nan")


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def _job_order(path: Path) -> tuple[int, str]:
    number = path.name.split("_", 1)[0]
    return (int(number) if number.isdigit() else 1 << 30, path.name)


def _overrides(folder: Path) -> dict[str, str]:
    """The job's command-line overrides (``.hydra/overrides.yaml``, else its results files), path keys left out."""
    import yaml

    listed: list[str] = []
    saved = folder / ".hydra" / "overrides.yaml"
    if saved.is_file():
        listed = list(yaml.safe_load(saved.read_text(encoding="utf-8")) or [])
    else:
        for result in find_results(folder):
            listed = list(result.document.get("job", {}).get("overrides") or [])
            break
    pairs = (o.lstrip("+~").partition("=") for o in listed)
    return {key: value for key, _, value in pairs if not key.startswith(_PATHS)}
