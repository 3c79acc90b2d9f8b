from __future__ import annotations

import glob
import os
import shutil
import sysconfig

import pytest

from tests.integration.jobs import PY, REPO, run


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """~40 real stdlib source files (the built-in demo corpus, small)."""
    d = tmp_path_factory.mktemp("corpus")
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    files = [f for f in files if 2_000 < os.path.getsize(f) < 60_000][:40]
    for f in files:
        shutil.copy(f, d / os.path.basename(f))
    return d


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_corpus):
    """An MDS data dir written by `mnemo prepare` (vocab 512)."""
    out = tmp_path_factory.mktemp("data") / "mds"
    run([PY, "-m", "train.cli", "prepare", "--input", str(tiny_corpus), "--out", str(out), "--vocab-size", "512",
         "--workers", "2"], timeout=300)
    return out
