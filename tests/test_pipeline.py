"""The pipeline: every stage in one process on one model, each reusing what the earlier ones computed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from refusal_lab import api
from refusal_lab.tracking.reading import load_results
from tests.helpers import read_wandb_records

STAGES = ["baseline", "patching", "attribution", "ablation", "direction", "abliteration"]


def test_pipeline_runs_every_stage_on_one_model_and_reuses_earlier_stages(embedded_model_dir: Path, tmp_path: Path) -> None:
    pipeline = api.run(["debug=default", "logger=wandb"], output_dir=tmp_path)
    assert pipeline.experiment == "pipeline" and pipeline.document["status"] == "finished"
    rows = pipeline.details["stages"]
    assert [row["stage"] for row in rows] == STAGES
    assert abs(pipeline.metrics["pipeline/seconds"] - sum(row["seconds"] for row in rows)) < 0.05

    # each stage keeps its own results file, made with its own settings and split
    stages = {name: load_results(tmp_path, name) for name in STAGES}
    assert all(r.document["status"] == "finished" for r in stages.values())
    assert stages["baseline"].config["prompts"]["split"] == "test" and stages["baseline"].metrics["n_prompts/harmful"] == 4
    assert stages["patching"].details["split"] == "val" and stages["attribution"].details["split"] == "val"
    assert stages["attribution"].config["experiment"]["name"] == "attribution"
    assert stages["baseline"].config["experiment"]["max_new_tokens"] == 16, "debug's shared setting reached the stage"
    assert {r.document["model"]["precision"] for r in stages.values()} == {"fp32"}

    # the attribution stage reused the patching stage's clean runs; ablation ablated what patching ranked on val
    patched = stages["patching"].details["activation_cache"]
    reused = stages["attribution"].details["activation_cache"]
    assert patched["misses"] > 0 and reused["hits"] == patched["misses"]
    ranking = stages["ablation"].details["ranking"]
    assert ranking["from"] == "the patching stage of this run (val split)"
    assert ranking["at"] == "post_instruction", "ranked by the patching effect where ablation acts"
    cell = lambda r: (r["kind"], r["layer"], r["head"])  # noqa: E731
    ranked = [cell(r) for r in stages["patching"].details["ranked"]["harmless_to_harmful"] if r["at"] == "post_instruction"]
    assert [cell(r) for r in ranking["top"]] == ranked[: len(ranking["top"])]
    assert not (tmp_path / "results" / "ablation_ranking.json").exists(), "ablation did not patch again"
    # the optimised ablation searched, and marked the direction stage's single direction on its front when it chose one
    searched = stages["abliteration"].details
    assert len(searched["trials"]) == 20 and searched["pareto"]
    assert (searched["single_direction"] is not None) == (stages["direction"].details["selection"]["chosen"] is not None)

    # one dashboard links every stage's own dashboard, and the links resolve
    page = pipeline.file("dashboard").read_text(encoding="utf-8")
    links = re.findall(r"href='([^']+)'", page)
    for name in STAGES:
        assert f"{name}_dashboard.html" in links and (tmp_path / "results" / f"{name}_dashboard.html").is_file()
    assert all((pipeline.file("dashboard").parent / link).is_file() for link in links)
    assert stages["patching"].file("circuit") != stages["attribution"].file("circuit"), "each stage draws its own circuit"

    # one W&B run holds every stage's metrics, under the keys the stage runs alone would log
    [run_file] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    records = read_wandb_records(run_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.job_type == "pipeline"
    logged = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
    for result in stages.values():
        assert set(result.metrics) <= logged, result.experiment
    assert {"refusal_rate/harmful", "patching/n_pairs", "attribution/n_pairs", "ablation/k0/refusal_rate", "pipeline/seconds"} <= logged
    assert json.loads((tmp_path / "results" / "pipeline.json").read_text())["config"]["experiment"]["name"] == "pipeline"
