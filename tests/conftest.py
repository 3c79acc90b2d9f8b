"""Suite-wide settings."""

import atexit
import os
import shutil
import tempfile

import pytest

# Hugging Face libraries (transformers' remote-code modules, datasets' cache) write under HF_HOME:
# the suite's go to a folder of its own, removed at exit, never to the user's ~/.cache. Set before
# any test imports them (they read it at import). Nothing is downloaded: offline too.
_HF_HOME = tempfile.mkdtemp(prefix="mnemo-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
atexit.register(shutil.rmtree, _HF_HOME, True)

# The machine (and CI) has 2 cores shared by in-process tests and the
# multi-process jobs some tests start: one thread each avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed's JIT op: the tests' in-process engines build where the training ranks do (one build): only
# a rank sets its op cache (apply_rank_env in run_train), no other mnemo command does.
from mnemo.train.rankenv import use_own_op_cache  # noqa: E402

use_own_op_cache()

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


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
