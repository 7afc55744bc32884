"""End to end: the CLI, the results file, the W&B offline run read back from disk, sweeps, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from refusal_lab.compare.measures import compare, gather
from refusal_lab.experiments.registry import _EXPERIMENTS, register_experiment
from refusal_lab.runner import run
from tests.helpers import REPO_ROOT, compose_config, read_wandb_records, run_cli

SECRET = "hf_SENTINEL_never_write_me_0123456789"


def wandb_run_file(job_dir: Path) -> Path:
    [path] = list(job_dir.glob("wandb/offline-run-*/run-*.wandb"))
    return path


def logged_history(records: list) -> dict[str, float]:
    values = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def record_of(records: list, kind: str):
    return next(r for r in records if r.WhichOneof("record_type") == kind)


def test_main_command_writes_results_and_an_offline_wandb_run(embedded_model_dir: Path, tmp_path: Path) -> None:
    out = run_cli(["experiment=baseline", "model=smollm2", "debug=default", "logger=wandb"], tmp_path, extra_env={"HF_TOKEN": SECRET})
    assert out.returncode == 0, out.stderr[-3000:]
    job_dir = tmp_path / "run"
    results = json.loads((job_dir / "results" / "baseline.json").read_text())
    log = out.stdout + out.stderr
    assert str(job_dir / "results" / "baseline.json") in log
    assert str(job_dir / "results" / "baseline_completions.jsonl") in log
    assert str(job_dir / "results" / "baseline_dashboard.html") in log
    assert "W&B run:" in log and "wandb sync" in log
    page = (job_dir / "results" / "baseline_dashboard.html").read_text()
    assert "<script src=" not in page and page.count("Plotly.newPlot") == 2  # rates and scores, plotly.js inside
    assert results["files"] == {"dashboard": "results/baseline_dashboard.html"}

    # the results file: metrics and everything needed to reproduce them
    metrics = results["metrics"]
    assert metrics["n_prompts/harmful"] == 4 and metrics["n_prompts/harmless"] == 4
    assert 0.0 <= metrics["refusal_rate/harmful"] <= 1.0
    assert results["model"]["precision"] == "fp32" and results["model"]["n_layers"] == 30
    assert results["seed"] == 0
    assert "<|im_start|>" in results["chat_template"]
    assert results["judge"]["name"] == "substring" and "I'm sorry" in results["judge"]["phrases"]
    assert results["refusal_tokens"]["ids"] == [57, 37388, 1653]
    assert results["versions"]["torch"] and results["versions"]["transformers"]
    assert results["config"]["experiment"]["max_new_tokens"] == 16
    assert results["prompts"]["sha256"] and results["prompts"]["n_prompts"] == 8
    rows = [json.loads(line) for line in (job_dir / "results" / "baseline_completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(row["completion"] for row in rows)
    assert len({row["refusal_score"] for row in rows}) > 1, "every prompt has its own refusal score"

    # the W&B run, read back from its file: config, job type, every metric with its value
    records = read_wandb_records(wandb_run_file(job_dir))
    run_record = record_of(records, "run")
    assert run_record.run.project == "refusal_lab" and run_record.run.job_type == "baseline"
    config_keys = {item.key for item in run_record.run.config.update}
    assert {"model", "quant", "experiment", "prompts"} <= config_keys
    history = logged_history(records)
    for key, value in metrics.items():
        assert history[key] == pytest.approx(value), key
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    results_artifact = next(a for a in artifacts if a.type == "results")
    assert {m.path for m in results_artifact.manifest.contents} == {"baseline.json", "baseline_completions.jsonl", "baseline_side_sets.jsonl",
                                                                     "baseline_dashboard.html"}
    assert any(a.type == "run_table" for a in artifacts), "the completions table was not logged"
    assert record_of(records, "exit").exit.exit_code == 0

    # the token never reaches any file the run wrote
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_multirun_over_precisions_shares_one_wandb_group(embedded_model_dir: Path, tmp_path: Path) -> None:
    out = run_cli(["-m", "sweep=precision", "experiment=baseline", "model=smollm2", "debug=default", "logger=wandb"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    job_dirs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir() and (p / "results").is_dir())
    assert [p.name.split("_", 1)[0] for p in job_dirs] == ["0", "1", "2", "3"]
    precisions, groups, names = [], set(), []
    for job_dir in job_dirs:
        results = json.loads((job_dir / "results" / "baseline.json").read_text())
        precisions.append(results["model"]["precision"])
        assert results["job"]["sweep"] == f"{tmp_path.name}_multirun"
        run_record = record_of(read_wandb_records(wandb_run_file(job_dir)), "run").run
        groups.add(run_record.run_group)
        names.append(run_record.display_name)
    assert precisions == ["fp32", "bf16", "8bit", "4bit"]
    assert groups == {f"{tmp_path.name}_multirun"}, "all jobs of one sweep share one W&B group"
    assert names == [p.name for p in job_dirs], "each job's W&B run is named by its overrides, as its folder is"

    # the comparison ran at the sweep's end: its results file, and one more W&B run in the sweep's group
    comparison = json.loads((tmp_path / "multirun" / "comparison.json").read_text())
    assert [(row["precision"], row["reference"]) for row in comparison["jobs"]] == [(p, job_dirs[0].name) for p in precisions]
    assert all(row["refusal_rate/harmful"] is not None for row in comparison["jobs"]) and comparison["n_failed"] == 0
    compare_run = record_of(read_wandb_records(wandb_run_file(tmp_path / "multirun")), "run").run
    assert compare_run.job_type == "comparison" and compare_run.run_group == f"{tmp_path.name}_multirun"
    assert (tmp_path / "multirun" / "comparison.html").read_text().count("Plotly.newPlot") >= 1


def test_four_jobs_in_one_process_release_what_they_loaded(embedded_model_dir: Path, tmp_path: Path) -> None:
    """Hydra's basic launcher runs a sweep's jobs in one process: each finishes its W&B run and releases its model
    and hooks, so resident memory after every later job stays within 10 % of what it was after the first."""
    out = run_cli(["-m", "experiment=baseline", "seed=0,1,2,3", "model=smollm2", "debug=default", "logger=wandb"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    documents = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").glob("*/results/baseline.json"))]
    assert len(documents) == 4 and len({d["process"]["pid"] for d in documents}) == 1, "one process ran all four"
    rss = [d["process"]["rss_mb"] for d in documents]
    assert max(rss[1:]) <= 1.10 * rss[0], f"resident memory after each job (MB): {rss}"
    for document in documents:
        records = read_wandb_records(wandb_run_file(Path(document["job"]["output_dir"])))
        assert record_of(records, "exit").exit.exit_code == 0, "each job finishes its own W&B run"


PLUGINS = {"processes": "hydra_joblib_launcher", "submitit_local": "hydra_submitit_launcher", "ray": "hydra_ray_launcher"}


@pytest.mark.parametrize("launcher", ["processes", "submitit_local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_multirun_on_a_launcher_runs_its_jobs_in_processes_of_their_own(launcher: str, embedded_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip(f"hydra_plugins.{PLUGINS[launcher]}", reason="pip install -e '.[launchers]'")
    out = run_cli(["-m", "experiment=baseline", "seed=0,1", "model=smollm2", "debug=default", "logger=wandb", f"launcher={launcher}"], tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    documents = [json.loads(p.read_text()) for p in sorted((tmp_path / "multirun").glob("*/results/baseline.json"))]
    assert [d["status"] for d in documents] == ["finished", "finished"] and [d["seed"] for d in documents] == [0, 1]
    if launcher != "ray":  # Ray may run both tasks in one worker
        assert len({d["process"]["pid"] for d in documents}) == 2, "each job ran in a process of its own"
    assert all(d["config"]["threads"] >= 1 for d in documents)
    for document in documents:
        records = read_wandb_records(wandb_run_file(Path(document["job"]["output_dir"])))
        assert record_of(records, "exit").exit.exit_code == 0
    comparison = json.loads((tmp_path / "multirun" / "comparison.json").read_text())
    assert [row["status"] for row in comparison["jobs"]] == ["finished", "finished"], "the comparison ran at the sweep's end"
    if launcher == "submitit_local":
        assert list((tmp_path / "multirun" / ".submitit").iterdir()), "submitit kept its job records in the sweep folder"


def test_a_bad_job_fails_alone_in_a_multirun(embedded_model_dir: Path, tmp_path: Path) -> None:
    out = run_cli(["-m", "experiment=baseline", "prompts.split=nope,test", "model=smollm2", "debug=default", "logger=none"], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 1, "a sweep with a failed job exits non-zero, after the other jobs and the comparison"
    assert "prompts.split='nope' is not one of train, val, test" in log
    failed, finished = sorted((tmp_path / "multirun").glob("*/results/baseline.json"))
    assert finished.parent.parent.name == "1_debug=default,experiment=baseline,logger=none,model=smollm2,prompts.split=test"
    record = json.loads(failed.read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "ConfigError" and "'nope'" in record["error"]["message"]
    assert record["config"]["prompts"]["split"] == "nope" and record["metrics"] == {}
    assert json.loads(finished.read_text())["status"] == "finished"

    comparison = json.loads((tmp_path / "multirun" / "comparison.json").read_text())
    assert [(row["status"], row["setting"]) for row in comparison["jobs"]] == [
        ("failed", {"prompts.split": "nope"}), ("finished", {"prompts.split": "test"})]
    assert "prompts.split='nope'" in comparison["jobs"][0]["failures"]["baseline"] and comparison["n_failed"] == 1
    assert "1 of 2 jobs failed" in log and (tmp_path / "multirun" / "comparison.html").is_file()


def test_a_single_failing_run_exits_non_zero_and_records_why(embedded_model_dir: Path, tmp_path: Path) -> None:
    out = run_cli(["experiment=baseline", "model=local", f"model.path={tmp_path / 'no_such_model'}", "logger=none"], tmp_path)
    assert out.returncode == 2
    record = json.loads((tmp_path / "run" / "results" / "baseline.json").read_text())
    assert record["status"] == "failed" and "no_such_model" in record["error"]["message"]


def test_8bit_run_records_its_precision(embedded_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = compose_config(["experiment=baseline", "model=smollm2", "quant=8bit", "debug=default"], tmp_path)
    document = run(cfg)
    assert "inputs will be cast" not in caplog.text, "bitsandbytes' per-matmul notice floods the log"
    saved = json.loads(Path(document["results_path"]).read_text())
    assert saved["model"]["precision"] == "8bit" and saved["model"]["bits"] == 8
    assert saved["config"]["quant"]["name"] == "8bit"
    assert saved["model"]["memory_footprint_mb"] < 260


def test_wandb_failure_never_loses_results(
    embedded_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken)
    cfg = compose_config(["experiment=baseline", "model=smollm2", "debug=default", "logger=wandb"], tmp_path)
    document = run(cfg)
    assert Path(document["results_path"]).is_file()
    assert "W&B could not start (W&B is down)" in caplog.text


def test_wandb_run_closes_when_the_experiment_raises(embedded_model_dir: Path, tmp_path: Path) -> None:
    import wandb

    @register_experiment("explode_for_test")
    def explode(context):
        raise RuntimeError("boom")

    try:
        cfg = compose_config(["model=smollm2", "debug=default", "logger=wandb", "experiment.name=explode_for_test"], tmp_path)
        with pytest.raises(RuntimeError, match="boom"):
            run(cfg)
    finally:
        del _EXPERIMENTS["explode_for_test"]
    assert wandb.run is None
    records = read_wandb_records(wandb_run_file(tmp_path))
    assert record_of(records, "exit").exit.exit_code == 1


def test_secrets_in_the_config_reach_no_file(embedded_model_dir: Path, tmp_path: Path) -> None:
    # Composed in-process, so the secret is in the config alone (not in this process's argv,
    # which W&B records): neither the results nor the W&B run may hold it.
    cfg = compose_config(["experiment=baseline", "model=smollm2", "debug=default", "logger=wandb", f"+model.hub_token={SECRET}", f"+logger.api_key={SECRET}"], tmp_path)
    document = run(cfg)
    assert document["config"]["model"]["hub_token"] == "<redacted>"
    assert wandb_run_file(tmp_path).is_file()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "args,message",
    [
        (["experiment.name=no_such_experiment"], "unknown experiment 'no_such_experiment'; known experiments: ablation, abliteration, attribution, baseline, direction, organism, patching, and pipeline (several in one run)"),
        (["experiment.max_new_tokens=-5"], "experiment.max_new_tokens=-5 must be a whole number of at least 1"),
        (["model=smollm2", "experiment=patching", "experiment.layers=[25,40]"], "experiment.layers=[25, 40] must satisfy 0 <= first < stop <= 30"),
        (["experiment=direction", "prompts.split=test"], "experiment=direction uses three splits of the prompt set"),
        (["experiment=direction", "experiment.splits.selection=train"], "must name three different splits"),
        (["prompts.path=/nonexistent/prompts.jsonl"], "prompt file /nonexistent/prompts.jsonl does not exist"),
        (["model=llama3_8b"], "is gated"),
        (["logger.mode=online"], "logger.mode=online needs a W&B API key"),
        (["experiment=direction", "experiment.limit_per_label=-3"], "experiment.limit_per_label=-3 must be null (all) or a whole number of at least 1"),
        (["experiment=direction", "experiment.addition_scale=nan"], "experiment.addition_scale=nan is not a number"),
        (["-m", "launcher=ray", "experiment=baseline"], "launcher=ray needs Hydra's launcher plugin hydra-ray-launcher: pip install hydra-ray-launcher"),
    ],
)
def test_cli_errors_stop_before_the_model_loads(args: list[str], message: str, tmp_path: Path, embedded_model_dir: Path) -> None:
    # No token, no stored logins: HOME holds ~/.netrc (W&B) and HF_HOME the Hugging Face login.
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "WANDB_API_KEY": "", "HOME": str(tmp_path)}
    out = run_cli(args, tmp_path, extra_env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 2, log[-2000:]
    assert message in log
    assert "Loaded " not in log and "Traceback" not in log


def test_a_file_named_gguf_that_is_not_one_stops_in_one_line(tmp_path: Path, embedded_model_dir: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("<html><body>Sign in to download this file</body></html>")
    out = run_cli(["experiment=baseline", "model=local", f"model.path={fake}", "logger=none"], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 2 and f"{fake} is not a GGUF file" in log and "Traceback" not in log, log[-2000:]


def test_a_run_stopped_by_sigterm_records_what_finished_and_compare_reports_it(embedded_model_dir: Path, tmp_path: Path) -> None:
    """SLURM ends a preempted or timed-out job with SIGTERM: the results file says interrupted, with the stages
    already written, the process exits promptly with 143, and the sweep's comparison lists the job."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    job = tmp_path / "multirun" / "0_sigterm"
    output = (tmp_path / "log.txt").open("w")  # a file, not a pipe nobody reads while the test waits
    process = subprocess.Popen([sys.executable, "-m", "refusal_lab", "experiment=pipeline", "debug=default", "logger=none",
                                "experiment.stages=[baseline,patching,direction]", f"hydra.run.dir={job}"],
                               cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    baseline = job / "results" / "baseline.json"
    deadline = time.monotonic() + 600
    while not baseline.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert process.poll() is None, "the run ended before the test could stop it: " + (tmp_path / "log.txt").read_text()[-2000:]
    stopped = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output.close()
    log = (tmp_path / "log.txt").read_text()
    assert process.returncode == 143, log[-2000:]
    assert time.monotonic() - stopped < 60, "an interrupted run exits promptly"
    record = json.loads((job / "results" / "pipeline.json").read_text())
    assert record["status"] == "interrupted" and record["finished_stages"][0] == "baseline" and "signal 15" in record["error"]["message"]
    assert json.loads(baseline.read_text())["status"] == "finished", "what finished stays on disk"
    row = compare(gather(tmp_path / "multirun"))["jobs"][0]
    assert row["status"] == "interrupted" and "finished stages: baseline" in row["failures"]["pipeline"]


def test_cli_unknown_group_option(tmp_path: Path) -> None:
    out = run_cli(["model=no_such_model"], tmp_path)
    assert out.returncode != 0
    assert "Could not find 'model/no_such_model'" in out.stderr
    assert "smollm2" in out.stderr and "llama3_8b" in out.stderr


def test_default_model_is_the_shipped_organism_merged_without_training(embedded_model_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A user's first run: the organism is not cached, so the shipped adapter is merged in (seconds), nothing trains,
    the organism's figures are printed, and the shipped organism refuses clearly harmful requests and answers harmless ones."""
    # Its own cache, holding only the de-quantized base model: other tests may have merged the organism already.
    fresh = tmp_path / "cache"
    base = fresh / embedded_model_dir.relative_to(cache_dir)
    base.parent.mkdir(parents=True)
    base.symlink_to(embedded_model_dir, target_is_directory=True)
    out = run_cli(["experiment=baseline", "debug=default", "prompts.split=test", "prompts.limit=10", "experiment.max_new_tokens=24"], tmp_path,
                  extra_env={"REFUSAL_LAB_CACHE": str(fresh)})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "Merging the shipped organism adapter" in log and "training LoRA" not in log and "base answers" not in log
    assert "Organism smollm2_refusal: LoRA rank" in log and "Organism smollm2_refusal, contrastive:" in log
    results = json.loads((tmp_path / "run" / "results" / "baseline.json").read_text())
    assert results["model"]["source"] == "organism"
    folder = Path(results["model"]["location"].split(" at ", 1)[1])
    manifest = json.loads((folder / "organism.json").read_text())
    assert manifest["origin"] == "shipped" and manifest["made_in_seconds"] < 30
    assert results["steps"]["organism"]["origin"] == "shipped" and results["steps"]["organism"]["folder"] == str(folder)
    assert results["metrics"]["steps/organism/seconds"] == results["steps"]["organism"]["seconds"]
    metrics = results["metrics"]
    assert metrics["refusal_rate/harmful"] >= 0.75 and metrics["refusal_rate/harmless"] <= 0.25


def test_tracking_imports_no_experiment() -> None:
    """The results writer and the W&B tracker depend on the result type alone, not on any experiment."""
    import subprocess
    import sys

    code = (
        "import sys, refusal_lab.tracking; "
        "print(sorted(m for m in sys.modules if m.startswith('refusal_lab.experiments.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['refusal_lab.experiments.registry', 'refusal_lab.experiments.result']"


def test_wandb_tables_keep_columns_only_later_rows_have() -> None:
    from refusal_lab.tracking.wandb_tracker import table_columns

    rows = [{"model": "base", "prompt": "a"}, {"model": "organism", "prompt": "a", "kl_to_base": 0.1}]
    assert table_columns(rows) == ["model", "prompt", "kl_to_base"]


def test_bitsandbytes_kernel_notice_is_held_back_and_explained() -> None:
    import logging

    from refusal_lab import quiet

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "offline")
        logger.warning("an unrelated bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["an unrelated bitsandbytes warning"]
    assert "same results more slowly" in (quiet.cpu_4bit_notice() or "")
