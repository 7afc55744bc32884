"""A non-editable install: the configs and the shipped data travel inside the package, and a run from an
empty folder writes its outputs there."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


def test_a_non_editable_install_runs_from_an_empty_folder(embedded_model_dir: Path, tmp_path: Path) -> None:
    """`pip install .` (a wheel, not `-e`) then `python -m refusal_lab debug=default` (the pipeline) from an empty folder.

    The wheel goes into a folder of its own (``--target``) that is put first on PYTHONPATH, so the copy that
    runs is the installed one, not this checkout; dependencies come from the test environment."""
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    wheels, site, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(wheels), str(REPO_ROOT)], check=True, timeout=600, cwd=tmp_path)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), *map(str, wheels.glob("*.whl"))], check=True, timeout=600)

    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import refusal_lab; print(refusal_lab.__file__)"], cwd=empty, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(site), "the installed copy must be the one that runs"
    out = subprocess.run([sys.executable, "-m", "refusal_lab", "debug=default"], cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]

    results = list((empty / "outputs").glob("*/*/results/pipeline.json"))
    assert len(results) == 1, f"the run's outputs belong under the folder it ran from: {sorted(p for p in empty.rglob('*'))[:20]}"
    document = json.loads(results[0].read_text())
    assert document["status"] == "finished", "the default experiment, the whole pipeline, ran from the installed copy"
    for stage in document["details"]["stages"]:
        assert (results[0].parent.parent / stage["results"]).is_file() and (results[0].parent.parent / stage["dashboard"]).is_file()
    assert Path(document["prompts"]["path"]).is_relative_to(site), "the prompt set comes from the installed package"
    assert document["versions"]["refusal_lab_git_commit"] is None, "an installed copy has no commit of its own"
    assert not list(site.rglob("outputs")) and not list(site.rglob("multirun"))


def test_the_package_never_imports_the_peer_libraries() -> None:
    """nnsight and TransformerLens are the benchmark's optional extra (``.[peers]``), not dependencies."""
    probe = (
        "import importlib, pkgutil, sys, refusal_lab\n"
        "for module in pkgutil.walk_packages(refusal_lab.__path__, 'refusal_lab.'):\n"
        "    importlib.import_module(module.name)\n"
        "print(sorted(name for name in ('nnsight', 'transformer_lens') if name in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]"
