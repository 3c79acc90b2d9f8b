from __future__ import annotations

import glob
import os
import shutil
import sysconfig

import pytest

from tests.integration.jobs import PY, reference_overrides, run, train_cmd


@pytest.fixture(scope="session")
def tiny_corpus(session_tmp):
    """~40 real stdlib source files (the built-in demo corpus, small)."""
    d = session_tmp("corpus")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    files = [f for f in files if 2_000 < os.path.getsize(f) < 60_000][:40]
    for f in files:
        shutil.copy(f, d / os.path.basename(f))
    return d


@pytest.fixture(scope="session")
def tiny_data(session_tmp, tiny_corpus):
    """An MDS data dir written by `mnemo prepare` (vocab 512)."""
    out = session_tmp("data") / "mds"
    run(
        [
            PY,
            "-m",
            "mnemo",
            "prepare",
            "--input",
            str(tiny_corpus),
            "--out",
            str(out),
            "--vocab-size",
            "512",
            "--workers",
            "2",
        ],
        timeout=300,
    )
    return out


@pytest.fixture(scope="session")
def reference_run(tiny_data, session_tmp):
    """stage -> run dir of an uninterrupted 2-rank run (jobs.reference_overrides), built once per session.

    Tests read it and copy it; none may write into it.
    """
    runs = {}

    def get(stage: int):
        if stage not in runs:
            run_dir = session_tmp(f"ref{stage}") / "run"
            run(train_cmd(2, reference_overrides(tiny_data, run_dir, stage)), timeout=400)
            runs[stage] = run_dir
        return runs[stage]

    return get
