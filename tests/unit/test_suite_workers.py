"""`make test` runs two xdist workers; the integration tests must all run, in order, on one of them
(tests/conftest.py): they use both cores and share one SLURM cluster, one sshd and the namespace nodes."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

# Each test appends "<module>::<name> <worker>" to the file named by RECORD; the integration ones take long
# enough that the other worker is busy with unit modules meanwhile.
TEST = """
import os, time

def _record(name, pause):
    time.sleep(pause)
    with open(os.environ["RECORD"], "a") as f:
        f.write(f"{{__name__.rsplit('.', 1)[-1]}}::{{name}} {{os.environ['PYTEST_XDIST_WORKER']}}\\n")

def test_a():
    _record("a", {pause})

def test_b():
    _record("b", {pause})
"""


def test_integration_modules_run_in_order_on_one_worker_and_units_beside_them(tmp_path):
    proj = tmp_path / "proj"
    for d in ("tests/integration", "tests/unit"):
        (proj / d).mkdir(parents=True)
        (proj / d / "__init__.py").write_text("")
    (proj / "tests" / "__init__.py").write_text("")
    shutil.copy(CONFTEST, proj / "tests" / "conftest.py")
    (proj / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    for i in (1, 2, 3):
        (proj / "tests" / "integration" / f"test_i{i}.py").write_text(TEST.format(pause=0.5))
        (proj / "tests" / "unit" / f"test_u{i}.py").write_text(TEST.format(pause=0.1))
    record = tmp_path / "record"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope"]
        + ["--no-loadscope-reorder", f"--basetemp={tmp_path / 'base'}"],
        cwd=proj,
        env={**os.environ, "RECORD": str(record)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "12 passed" in r.stdout, r.stdout + r.stderr
    runs = [line.split() for line in record.read_text().splitlines()]
    integration = [(test, worker) for test, worker in runs if test.startswith("test_i")]
    # Plain loadscope would give test_i1 and test_i2 to different workers.
    assert [t for t, _ in integration] == [f"test_i{i}::{n}" for i in (1, 2, 3) for n in "ab"], runs
    assert len({w for _, w in integration}) == 1, runs
    assert len({w for _, w in runs}) == 2, runs
