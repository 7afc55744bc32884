"""OmegaConf resolvers the YAML configs rely on, and the secret filter for anything written out."""

from __future__ import annotations

import importlib.resources
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from refusal_lab.errors import ConfigError

# The configs and the shipped data travel inside the package, so an installed copy (not only an editable
# one) finds them; outputs go under the folder the user runs from (the ``working_dir`` resolver).
PACKAGE_DIR = Path(str(importlib.resources.files("refusal_lab")))
CONF_DIR = PACKAGE_DIR / "conf"
DATA_DIR = PACKAGE_DIR / "data"

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
REDACTED = "<redacted>"


def default_cache_dir() -> str:
    """Where built artefacts (de-quantized models, later activations) live between runs."""
    env = os.environ.get("REFUSAL_LAB_CACHE")
    return env if env else str(Path.home() / ".cache" / "refusal_lab")


def register_resolvers() -> None:
    # replace=True keeps repeated imports (tests, the basic launcher) from raising.
    OmegaConf.register_new_resolver("working_dir", os.getcwd, replace=True)
    OmegaConf.register_new_resolver("package_data", lambda: str(DATA_DIR), replace=True)
    OmegaConf.register_new_resolver("cache_root", default_cache_dir, replace=True)
    OmegaConf.register_new_resolver("swept", swept_name, replace=True)
    OmegaConf.register_new_resolver("cores_per_job", lambda jobs: max(1, (os.cpu_count() or 1) // max(1, int(jobs))), replace=True)


def swept_name(overrides: Any, fallback: str) -> str:
    """What a multirun sweeps, for its folder's name: ``experiment=baseline,patching`` from the command line's
    sweeping overrides (values redacted where secret, ``/`` replaced), ``fallback`` where none sweeps (a sweep config)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides or []])
    swept = [o.input_line for o in parsed if o.is_sweep_override() and o.input_line]
    name = "_".join(redact_overrides(swept)).replace("/", "-").replace(" ", "").replace("'", "").replace('"', "")
    return name[:120] or fallback


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers, secrets removed: safe to write or log."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(resolved, dict)
    return redact_secrets(resolved)


def redact_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides (``key=value``) with secret values replaced."""
    redacted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        redacted.append(key + sep + redact_secrets(value, key.lstrip("+~").rsplit(".", 1)[-1]) if sep else override)
    return redacted


def redact_secrets(value: Any, key: str = "") -> Any:
    """Replace secret-looking keys and any value equal to a secret in the environment.

    Keys such as ``refusal_tokens`` hold no secret, so only string values under a secret-looking
    key are redacted; the environment check catches a token pasted under any key.
    """
    secrets = {os.environ[name] for name in _SECRET_ENV if os.environ.get(name)}
    return _redact(value, key, secrets)


def _redact(value: Any, key: str, secrets: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, str(k), secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_redact(v, key, secrets) for v in value]
    if isinstance(value, str):
        if value in secrets or (_SECRET_KEY.search(key) and not key.endswith("tokens") and value):
            return REDACTED
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    return value


# Named bands of layers: thirds of the depth, so one layer sweep fits a model of any depth (30 layers: 0-9, 10-19, 20-29).
BANDS = ("early", "middle", "late")


def with_study(overrides: Sequence[str]) -> list[str]:
    """``study=full experiment=patching`` as a user means it: the study group sits in the pipeline's defaults only, so
    for one experiment it is appended (``+study=full``) and the experiment takes its stage's sizes from it."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    if not chosen or "pipeline" in chosen[-1].split(","):  # the pipeline has the group already (a sweep with it cannot append it)
        return list(overrides)
    return ["+" + o if o.startswith("study=") else o for o in overrides]


def layer_range(setting: Any, n_layers: int | None, key: str) -> list[int]:
    """``[first, stop)`` as in Python's range, a third of the depth by name (early, middle, late), or null for every
    layer; ``n_layers=None`` checks the form alone."""
    if setting is None:
        return list(range(n_layers or 0))
    if isinstance(setting, str):
        if setting not in BANDS:
            raise ConfigError(f"{key}={setting!r} must be [first, stop) (two layer numbers), one of {', '.join(BANDS)} (a third of the depth), or null")
        if n_layers is None:
            return []
        third = BANDS.index(setting)
        band = list(range(round(third * n_layers / 3), round((third + 1) * n_layers / 3)))
        if not band:
            raise ConfigError(f"{key}={setting!r}: a model of {n_layers} layers has no {setting} third; give [first, stop)")
        return band
    try:
        first, stop = (int(x) for x in setting)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key}={setting!r} must be [first, stop) (two layer numbers) or null for every layer") from error
    if not 0 <= first < stop <= (n_layers if n_layers is not None else stop):
        raise ConfigError(f"{key}={[first, stop]} must satisfy 0 <= first < stop <= {n_layers or 'the number of layers'} (a range, stop excluded)")
    return list(range(first, stop))


# Settings any experiment may have that must be a whole number of at least 1.
_POSITIVE = ("max_new_tokens", "batch_size", "kl_tokens")
# Settings any experiment may have that cut a set short: null (everything) or a whole number of at least 1
# (a negative number would slice as "all but the last N").
_LIMITS = ("limit_per_label", "side_limit", "max_pairs", "limit")


def check_positive_settings(exp: Any) -> None:
    """A one-line error for ``experiment.max_new_tokens=-5``, ``experiment.limit_per_label=-3``,
    ``experiment.addition_scale=nan`` and the like, before anything loads."""
    for key in _POSITIVE:
        value = exp.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"experiment.{key}={value!r} must be a whole number of at least 1")
    for key in _LIMITS:
        value = exp.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"experiment.{key}={value!r} must be null (all) or a whole number of at least 1")
    for path, value in _leaves(exp, "experiment"):
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{path}=nan is not a number; give a value")


def _leaves(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every leaf setting under ``node`` with its dotted path (interpolations left as written)."""
    if isinstance(node, DictConfig | ListConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, node
