"""What the demo (mnemo/demo.py) and benchmarks/many_facts.py may delete or replace in their --out, and
their option checks, both run before anything there is touched.

OUT holds the two training runs (``memory/``, ``baseline/``), ``mlflow.db`` with its runs' artifacts beside
it in ``mlartifacts/`` (from before 2026-12-05: inside the first run dir, ``memory/mlartifacts``),
``summary.json``, ``logs/`` and ``data/`` (``mnemo prepare``'s own claims). A fresh run deletes the earlier
runs, mlflow.db, its mlartifacts and summary.json together, and only when it can show the demo wrote them;
anything else under those names is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mnemo.train.errors import UserError

# Written into OUT before its mlflow.db, summary.json and logs: what proves they are the demo's (or
# many_facts') to delete or replace when it runs again.
MARKER = "mnemo-demo.json"
LOGS = ("memory.log", "baseline.log")


def _wrote_out_files(out: Path) -> bool:
    """Whether OUT's mlflow.db, summary.json and logs are the demo's: its marker, or (a demo from before the
    marker) its summary.json naming both runs."""
    if (out / MARKER).is_file():
        return True
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"segment_len", "runs", "steps", "targets"} <= set(summary)


def _mlflow_artifacts(folder: Path) -> bool:
    """Whether ``folder`` is as MLflow makes an artifact root: folders named by experiment ids only."""
    return folder.is_dir() and all(p.is_dir() and not p.is_symlink() and p.name.isdigit() for p in folder.iterdir())


def claim_out_dir(out: Path, runs: dict[str, Path], fresh: bool, prog: str) -> None:
    """Make OUT the demo's (or many_facts'): with ``fresh``, delete its earlier runs (a run dir holding the
    config.yaml mnemo writes into each run), and its mlflow.db, the artifacts of its runs beside it
    (``mlartifacts/``: folders of experiment ids only) and summary.json; the logs are replaced.
    Whatever it cannot show it wrote is refused first (UserError naming the path; nothing deleted)."""
    from mnemo.train.config import wrote_run_config

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out: {out} is not a directory")
    how = f"move it away or choose another --out ({prog} deletes or replaces only what it wrote)"
    ours = _wrote_out_files(out)
    doomed: list[Path] = []
    files = [out / "logs" / n for n in LOGS] + [out / "summary.json"]  # replaced at the end of every run
    if fresh:
        for d in runs.values():
            if not (d.exists() or d.is_symlink()) or (d.is_dir() and not d.is_symlink() and not any(d.iterdir())):
                continue
            if d.is_symlink() or not d.is_dir() or not wrote_run_config(d / "config.yaml"):
                raise UserError(f"--out: {d} is not a run directory {prog} wrote (no mnemo config.yaml): {how}")
            if not ours:  # every `mnemo train` run has that config.yaml: a user's own run in OUT/memory too
                raise UserError(f"--out: {d} is a run directory {prog} did not write (no {out / MARKER}): {how}")
            doomed.append(d)
        files.append(out / "mlflow.db")
        arts = out / "mlartifacts"
        if arts.exists() or arts.is_symlink():
            if not ours:
                raise UserError(f"--out: {arts} was not written by {prog} (no {out / MARKER}): {how}")
            if arts.is_symlink() or not _mlflow_artifacts(arts):
                raise UserError(
                    f"--out: {arts} is not as MLflow writes an artifact folder (a symbolic link, or other than "
                    f"folders of experiment ids in it): {how}"
                )
            doomed.append(arts)
    for f in files:
        if f.exists() or f.is_symlink():
            if not ours or f.is_symlink() or not f.is_file():
                raise UserError(f"--out: {f} was not written by {prog} (no {out / MARKER}): {how}")
            if fresh and f.parent == out:
                doomed.append(f)
    for d in doomed:
        if d.is_dir():
            shutil.rmtree(d)
        else:
            d.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).exists() and (ours or not any((out / n).exists() for n in ("mlflow.db", "summary.json"))):
        marker = {
            "written_by": prog,
            "files": ["mlflow.db", "mlartifacts", "summary.json", *(f"logs/{n}" for n in LOGS)],
        }
        (out / MARKER).write_text(json.dumps(marker) + "\n")


def check_options(*least: tuple[str, int | None, int], minutes: float) -> None:
    """(option, value, lowest allowed) each (None: not given) and the time budget; UserError naming the option."""
    if not minutes > 0:
        raise UserError(f"--minutes: must be > 0, not {minutes:g}")
    for name, value, low in least:
        if value is not None and value < low:
            raise UserError(f"{name}: must be >= {low}, not {value}")
