"""Suite-wide settings."""

import os

# The machine (and CI) has 2 cores shared by in-process tests and the
# multi-process jobs some tests start: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


import pytest


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch):
    """MLflow's set_tracking_uri also exports MLFLOW_TRACKING_URI: never let one test's store leak into the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def one_thread():
    """torch at one thread for the test, whatever an earlier in-process test set (tiny matmuls on a shared
    2-core machine: a second thread only adds contention, 10x slower seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
