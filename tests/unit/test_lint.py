"""ruff's lint rules (pyproject.toml [tool.ruff]) hold over the whole tree, so `make test` checks them too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean():
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "No module named ruff" not in res.stderr, "ruff is missing: install the dev extra (pip install -e '.[dev]')"
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


def test_ruff_format_is_clean():
    """Every file as `ruff format` writes it (pyproject.toml [tool.ruff]): run `ruff format .` to fix."""
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", str(REPO)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
