"""Suite-wide settings."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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


# Two pytest-xdist workers (`make test`: -n 2 --dist loadscope), one per core. The real multi-process runs of
# tests/integration already use both cores and share one SLURM cluster, one sshd and the namespace nodes: they
# are one unit of work, run in order on one worker, first (--no-loadscope-reorder keeps collection order).
# Every other module is a unit of its own, so its module fixtures are built once, on the worker that runs it.
# A scheduler of our own, not xdist_group marks: pytest 9.2 ignores the node ids that loadgroup rewrites.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationAsOneUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tests/integration" if Path(module).parts[:2] == ("tests", "integration") else module

    return IntegrationAsOneUnit(config, log)


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


# Disk: a run of the whole suite writes several GB of checkpoints, shards and MLflow stores, and CI's disk
# may hold far less. A passed test's tmp_path goes at its teardown (pyproject: tmp_path_retention_policy =
# "failed"); what module-scoped fixtures and tmp_path_factory made goes at the end of the module below,
# unless a test of the module failed (kept to debug). Session fixtures make theirs through session_tmp.
_SESSION_DIRS: set[Path] = set()
_FAILED_MODULES = pytest.StashKey[set]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.session.stash.setdefault(_FAILED_MODULES, set()).add(item.nodeid.split("::")[0])
    return report


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory):
    """``make(name)``: a new folder kept for the whole session (the module-end cleanup leaves it alone)."""

    def make(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        _SESSION_DIRS.add(path)
        return path

    return make


@pytest.fixture(scope="module", autouse=True)
def _free_module_disk(request, tmp_path_factory):
    """Remove the folders made under the base temp folder during this module, once its fixtures are gone.

    Autouse and module-scoped: set up before, so torn down after, every module fixture of the module."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.node.nodeid in request.session.stash.get(_FAILED_MODULES, set()):
        return
    for path in set(base.iterdir()) - before - _SESSION_DIRS:
        if not path.is_symlink():  # mktemp's NAMEcurrent links: pytest drops the dangling ones at the end
            shutil.rmtree(path, ignore_errors=True)
