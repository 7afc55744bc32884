"""The docs site builds without a warning, and its config reference is the config tree's, not a stale copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT


def test_the_config_reference_matches_the_config_tree() -> None:
    out = subprocess.run([sys.executable, "scripts/docs_config_reference.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"docs/reference/config.md is stale: run python scripts/docs_config_reference.py\n{out.stdout}{out.stderr}"


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO_ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
