"""mnemo is importable only as `mnemo.*`: a user's own train.py, model.py or model/ never shadows it.

The top-level folders install as subpackages (pyproject.toml package-dir), so
neither can a bare `import model` in a user's environment resolve to mnemo.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.jobs import DEBUG_CONFIG, job_env, user_project_dir
from tests.unit.launch_workspace import stub_data_dir

BARE = ("train", "model", "launch", "data_pipeline", "evaluation")


def _py(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=120
    )


def test_no_bare_top_level_names_outside_the_checkout(tmp_path):
    res = _py(
        "import importlib.util as u, mnemo.cli, mnemo.model\n"
        f"print([n for n in {BARE!r} if u.find_spec(n) is not None])",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", "mnemo answers a bare import: " + res.stdout


def test_cli_and_worker_run_from_a_folder_holding_train_py_and_model(tmp_path):
    user = user_project_dir()
    assert (user / "train.py").is_file() and (user / "model" / "__init__.py").is_file()
    # The shadows are real: importing one fails.
    assert _py("import model", user).returncode != 0
    res = subprocess.run(
        [sys.executable, "-m", "mnemo", "--help"], cwd=user, env=job_env(), capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and "prepare" in res.stdout, res.stderr
    # The module every rank runs (torchrun, ssh nodes and SLURM scripts start it with `python -m`).
    res = _py("import mnemo.launch.worker, mnemo.train.trainer, mnemo.data_pipeline.streams; print('ok')", user)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    # The generated sbatch script starts `python -m mnemo`, never a bare module.
    stub_data_dir(tmp_path / "data")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnemo",
            "launch",
            DEBUG_CONFIG,
            "--slurm",
            "--dry-run",
            f"run.dir={tmp_path / 'run'}",
            f"data.path={tmp_path / 'data'}",
        ],
        cwd=user,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "-m mnemo launch" in res.stdout and " -m train." not in res.stdout


def test_every_package_folder_is_in_the_wheel():
    """pyproject lists its packages one by one: a new subpackage left out works in an editable install only."""
    import tomllib

    repo = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for pkg, folder in tool["package-dir"].items():
        for init in (repo / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(repo / folder).parts
            found.add(".".join([pkg, *rel]))
    assert found - listed == set(), f"package folders missing from [tool.setuptools] packages: {sorted(found - listed)}"
