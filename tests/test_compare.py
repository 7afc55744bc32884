"""The comparison of a sweep's jobs, from results files written by the real writer into a sweep folder's layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.stats import spearmanr

from refusal_lab.compare import compare_sweep
from refusal_lab.experiments.result import ExperimentResult
from refusal_lab.uncertainty import to_json
from refusal_lab.tracking.results import write_failure, write_results

N_LAYERS, N_HEADS, D_MODEL = 6, 4, 16


def job_folder(sweep: Path, num: int, quant: str) -> Path:
    folder = sweep / f"{num}_quant={quant}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(f"- quant={quant}\n- hydra.run.dir=/x\n")
    return folder


def write_job(folder: Path, quant: str, heads: np.ndarray, direction: np.ndarray, refusal: float) -> None:
    provenance = {"model": {"name": "tiny", "precision": quant}, "config": {"logger": {"name": "none"}}}
    write_results(folder, "baseline", ExperimentResult(metrics={"refusal_rate/harmful": refusal, "refusal_rate/harmless": 0.1,
                                                                "refusal_score/separation": 4.0, "refusal_score/auroc": 0.9}), provenance)
    ranked = sorted(({"component": f"L{layer}H{head}", "kind": "head", "layer": layer, "head": head, "effect": float(heads[layer, head])}
                     for layer in range(N_LAYERS) for head in range(N_HEADS)), key=lambda r: r["effect"], reverse=True)
    effects = {"harmless_to_harmful": {"head": {"mean": to_json(heads)}}}
    write_results(folder, "patching", ExperimentResult(metrics={"patching/n_pairs": 4.0},
                                                       details={"effects": effects, "ranked": {"harmless_to_harmful": ranked}, "layers": [0, N_LAYERS]}), provenance)
    candidates = np.zeros((N_LAYERS, 2, D_MODEL), dtype=np.float32)
    candidates[3, 1] = direction
    save_file({"candidates": candidates, "direction": direction.astype(np.float32)}, str(folder / "results" / "direction_vectors.safetensors"))
    details = {"selection": {"chosen": {"layer": 3, "position": -1}}}
    metrics = {"direction/harmful/none/refusal_rate": refusal, "direction/harmful/ablation/refusal_rate": 0.1,
               "direction/harmless/none/refusal_rate": 0.1, "direction/harmless/addition/refusal_rate": 0.9, "direction/harmless/ablation/kl": 0.2}
    write_results(folder, "direction", ExperimentResult(metrics=metrics, details=details,
                                                        files={"vectors": folder / "results" / "direction_vectors.safetensors"}), provenance)


def test_comparison_measures_each_precision_against_fp32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    heads = rng.normal(size=(N_LAYERS, N_HEADS))
    direction = rng.normal(size=D_MODEL)
    noisy = heads + rng.normal(scale=0.5, size=heads.shape)
    turned = direction + rng.normal(scale=0.3, size=D_MODEL)
    sweep = tmp_path / "sweep"
    write_job(job_folder(sweep, 0, "fp32"), "fp32", heads, direction, 0.9)
    write_job(job_folder(sweep, 1, "4bit"), "4bit", noisy, turned, 0.8)
    try:
        raise RuntimeError("model.path=/nowhere does not exist")
    except RuntimeError as error:
        write_failure(job_folder(sweep, 2, "8bit"), "baseline", error, {"config": {}})
    job_folder(sweep, 3, "bf16")  # killed before it wrote anything

    document = compare_sweep(sweep, wandb=False)
    fp32, four, eight, bf16 = document["jobs"]
    assert [row["status"] for row in document["jobs"]] == ["finished", "finished", "failed", "no results"]
    assert document["n_failed"] == 2 and document["varying"] == ["quant"], "path overrides never tell jobs apart"
    assert "model.path=/nowhere does not exist" in eight["failures"]["baseline"]
    assert four["reference"] == fp32["job"] == fp32["reference"]
    assert four["refusal_rate/harmful"] == 0.8 and four["precision"] == "4bit"

    expected = spearmanr(noisy.ravel(), heads.ravel()).statistic
    assert four["patching/harmless_to_harmful/spearman"] == pytest.approx(expected, abs=1e-4)
    top = lambda a: set(np.argsort(-a.ravel())[:10].tolist())  # noqa: E731
    assert four["patching/harmless_to_harmful/top_k_overlap"] == len(top(noisy) & top(heads)) / 10
    cosine = turned @ direction / np.linalg.norm(turned) / np.linalg.norm(direction)
    assert four["direction/cosine_with_reference"] == pytest.approx(cosine, abs=1e-4)
    assert four["direction/cosine_at_reference_cell"] == pytest.approx(cosine, abs=1e-4)
    assert "patching/harmless_to_harmful/spearman" not in fp32, "the reference is not compared with itself"

    saved = json.loads((sweep / "comparison.json").read_text())
    assert saved["jobs"][1]["patching/harmless_to_harmful/spearman"] == four["patching/harmless_to_harmful/spearman"]
    page = (sweep / "comparison.html").read_text()
    assert "Failed jobs" in page and "model.path=/nowhere" in page and page.count("Plotly.newPlot") >= 3

    out = subprocess.run([sys.executable, "-m", "refusal_lab.compare", str(sweep), "--no-wandb"], capture_output=True, text=True)
    assert out.returncode == 1, "failed jobs make the command exit 1, after the report"
    assert "2 of 4 jobs failed or left no results" in out.stderr


def test_comparison_of_a_folder_without_jobs_says_so(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "refusal_lab.compare", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "holds no job folders" in out.stderr and "Traceback" not in out.stderr
