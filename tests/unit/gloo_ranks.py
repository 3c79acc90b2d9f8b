"""Run a worker script as ``world`` gloo ranks in subprocesses and collect what each prints on its RESULT line.

The script gets ``RANK WORLD RENDEZVOUS [extra ...]`` (a file:// rendezvous) and prints ``RESULT <json>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_ranks(tmp_path: Path, source: str, world: int = 2, extra: tuple[str, ...] = ()) -> list[dict]:
    """Each rank's RESULT (a dict), in rank order; a rank that fails or prints none fails the test."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world), str(tmp_path / "rendezvous"), *extra],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert p.returncode == 0 and lines, f"worker failed ({p.returncode}):\n{out[-2000:]}\n{err[-4000:]}"
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    return results
