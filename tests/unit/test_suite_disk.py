"""The suite frees its disk as it goes (tests/conftest.py): CI's disk may hold less than one whole run writes."""

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

# Two modules share a session folder; each module makes a module folder and a test folder of its own.
SHARED = """
import pytest

@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mod")
    (d / "f").write_bytes(b"x" * 1000)
    return d
"""
PASSES = (
    SHARED
    + """
def test_a(module_dir, kept, tmp_path):
    (tmp_path / "f").write_text("x")

def test_b(module_dir, kept):
    pass
"""
)
FAILS = (
    SHARED
    + """
def test_c(module_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    assert False

def test_d(module_dir, tmp_path):
    (tmp_path / "f").write_text("x")
"""
)
# First made in test_1's module, read again in test_3's.
KEPT = """

@pytest.fixture(scope="session")
def kept(session_tmp):
    d = session_tmp("sess")
    (d / "f").write_text("x")
    return d
"""
LATER = """
def test_e(kept):
    assert (kept / "f").read_text() == "x"
"""


def test_passed_modules_leave_nothing_but_session_folders_and_failures(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(CONFTEST, proj / "conftest.py")
    (proj / "pytest.ini").write_text("[pytest]\ntmp_path_retention_policy = failed\n")
    with open(proj / "conftest.py", "a") as f:
        f.write(KEPT)
    (proj / "test_1_passes.py").write_text(PASSES)
    (proj / "test_2_fails.py").write_text(FAILS)
    (proj / "test_3_later.py").write_text(LATER)
    base = tmp_path / "base"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={base}", str(proj)],
        cwd=proj,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "1 failed, 4 passed" in r.stdout, r.stdout + r.stderr
    left = sorted(p.name for p in base.iterdir() if not p.is_symlink())
    # test_1's module folder and test_a's tmp_path went; the session folder outlived its module (test_e read
    # it); the failing module kept its module folder and its failed test's folder.
    assert left == ["mod1", "sess0", "test_c0"], left
