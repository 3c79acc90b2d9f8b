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


def test_modules_over_500_lines_say_why():
    """A module of a part longer than 500 lines carries a line 'Over 500 lines: <reason>' in its docstring."""
    import ast

    parts = ("mnemo", "launch", "train", "evaluation", "data_pipeline", "model")
    long = []
    for part in parts:
        for path in sorted((REPO / part).rglob("*.py")):
            text = path.read_text()
            if len(text.splitlines()) > 500:
                doc = ast.get_docstring(ast.parse(text)) or ""
                if not any(line.startswith("Over 500 lines: ") for line in doc.splitlines()):
                    long.append(f"{path.relative_to(REPO)} ({len(text.splitlines())} lines)")
    assert not long, "split these or give the reason in their docstring: " + ", ".join(long)
