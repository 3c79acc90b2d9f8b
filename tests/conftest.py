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
