"""Per-rank and forwarded environment (train/rankenv.py, launch/env.py, launch/remote.py, launch/worker.py)."""

from __future__ import annotations

import os

from mnemo.launch.env import package_root, pythonpath_with_root
from mnemo.launch.remote import forwarded_env
from mnemo.launch.worker import describe
from mnemo.train.rankenv import op_cache_env, rank_env


def test_bare_train_is_a_one_rank_job_on_cpu():
    env = rank_env({}, use_cuda=False)
    assert env["DS_ACCELERATOR"] == "cpu"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("0", "0", "1", "1")
    assert 0 < int(env["MASTER_PORT"]) < 65536 and env["MASTER_ADDR"] == "127.0.0.1"


def test_under_a_launcher_nothing_of_torchrun_is_overridden():
    torchrun = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "OMP_NUM_THREADS": "1",
    }
    env = rank_env(torchrun, use_cuda=False)
    assert env == {"DS_ACCELERATOR": "cpu"}
    assert rank_env(torchrun, use_cuda=True) == {}


def test_each_environment_builds_deepspeed_ops_into_its_own_cache():
    # Two venvs sharing torch's one op cache rebuild each other's DeepSpeed op (seen: ranks stuck 10 min).
    a = op_cache_env({}, "/work/a/.venv", "2.14.1")["TORCH_EXTENSIONS_DIR"]
    b = op_cache_env({}, "/tmp/ci/.venv", "2.14.1")["TORCH_EXTENSIONS_DIR"]
    assert a != b and os.path.dirname(a) == os.path.dirname(b)
    assert a == op_cache_env({}, "/work/a/.venv", "2.14.1")["TORCH_EXTENSIONS_DIR"]  # stable: built once
    assert a != op_cache_env({}, "/work/a/.venv", "2.15.0")["TORCH_EXTENSIONS_DIR"]
    assert op_cache_env({"XDG_CACHE_HOME": "/c"}, "/p", "1")["TORCH_EXTENSIONS_DIR"].startswith("/c/torch_extensions/")
    assert op_cache_env({"TORCH_EXTENSIONS_DIR": "/mine"}, "/p", "1") == {}  # the user's choice wins


def test_each_ninja_builds_deepspeed_ops_into_its_own_cache(tmp_path):
    # A venv's ninja and the system's read each other's build log as foreign and rebuild: processes of one
    # environment with and without the venv's bin on PATH rebuilt the op in turn, each waiting on the other.
    for d in ("venv_bin", "sys_bin"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "ninja").write_text("#!/bin/sh\n")
        (tmp_path / d / "ninja").chmod(0o755)
    venv, system = str(tmp_path / "venv_bin"), str(tmp_path / "sys_bin")
    a = op_cache_env({"PATH": f"{venv}:{system}"}, "/p", "1")["TORCH_EXTENSIONS_DIR"]
    b = op_cache_env({"PATH": system}, "/p", "1")["TORCH_EXTENSIONS_DIR"]
    assert a != b
    assert a == op_cache_env({"PATH": venv}, "/p", "1")["TORCH_EXTENSIONS_DIR"]  # the ninja run, not PATH


def test_deepspeed_launcher_local_size_becomes_local_world_size():
    env = rank_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, use_cuda=True)
    assert env == {"LOCAL_WORLD_SIZE": "2"}


def test_pythonpath_adds_the_checkout_only_where_mnemo_is_not_installed(monkeypatch):
    import mnemo.launch.env as env_mod

    root = package_root()
    assert os.path.isfile(os.path.join(root, "launch", "env.py"))
    # Installed (this venv): the ranks find mnemo themselves; the checkout root would expose bare `train`, `model`.
    assert env_mod.mnemo_installed()
    assert pythonpath_with_root({}) == ""
    assert pythonpath_with_root({"PYTHONPATH": "/x"}) == "/x"
    monkeypatch.setattr(env_mod, "mnemo_installed", lambda: False)
    assert pythonpath_with_root({}) == root
    mixed = {"PYTHONPATH": f"/x{os.pathsep}{root}{os.pathsep}/y"}
    assert pythonpath_with_root(mixed) == os.pathsep.join([root, "/x", "/y"])


def test_forwarded_env_picks_prefixes_and_names_only():
    env = {
        "NCCL_IB_HCA": "mlx5",
        "MLFLOW_TRACKING_URI": "http://m:5000",
        "MNEMO_DEBUG": "1",
        "PYTHONPATH": "/p",
        "HOME": "/root",
        "SSH_AUTH_SOCK": "/tmp/s",
        "NCCLX": "no",
        "OMP_NUM_THREADS": "4",
        "BAD-NAME": "x",
    }
    assert forwarded_env(env) == {
        "MLFLOW_TRACKING_URI": "http://m:5000",
        "MNEMO_DEBUG": "1",
        "NCCL_IB_HCA": "mlx5",
        "OMP_NUM_THREADS": "4",
        "PYTHONPATH": "/p",
    }


def test_ds_accelerator_stays_on_the_launching_host():
    # A launching host's DS_ACCELERATOR=cpu put the model on the CPU on GPU nodes whose trainer used CUDA:
    # each node's ranks choose their own (rank_env), other DS_ variables still travel.
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}
    assert forwarded_env(env) == {"DS_BUILD_OPS": "0"}


def test_worker_line_names_node_rank_and_restarts():
    line = describe(
        {
            "MNEMO_NODE_RANK": "1",
            "MNEMO_NNODES": "2",
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "TORCHELASTIC_RESTART_COUNT": "2",
            "SLURM_JOB_ID": "77",
            "SLURM_RESTART_COUNT": "1",
        }
    )
    assert line == "mnemo worker: node 1/2, rank 3/4, local_rank 1, restart 2, slurm job 77 restart 1"
    assert describe({}) == "mnemo worker: node 0/1, rank 0/1, local_rank 0, restart 0"


def test_a_rank_imports_its_libraries_without_mlflow_sklearn_or_transformers_and_all_import_after():
    """deepspeed and streaming import mlflow, scikit-learn and transformers at import (seconds of CPU per rank
    start, for code a rank never runs): a rank imports them with these held off, and all are importable (the
    real packages) after."""
    import importlib.util
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mnemo.train.rankenv import import_rank_libraries as f\n"
        "f()\n"
        "import deepspeed.autotuning.autotuner as a\n"
        "print('deepspeed' in sys.modules, 'streaming' in sys.modules, 'mlflow' in sys.modules,"
        " 'sklearn' in sys.modules, 'transformers' in sys.modules, a.has_mlflow)\n"
        "import importlib.util\n"  # find_spec is None while an entry is held off (and costs no import)
        "print(importlib.util.find_spec('mlflow') is not None, importlib.util.find_spec('sklearn') is not None)\n"
        "from transformers.feature_extraction_utils import BatchFeature\n"
        "print(BatchFeature({'a': 1})['a'], sys.modules['transformers'].__file__ is not None)\n"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    installed = [importlib.util.find_spec(m) is not None for m in ("mlflow", "sklearn")]  # as outside the rank
    assert installed[0] and out.stdout.split("\n")[:3] == [
        "True True False False False False",
        f"True {installed[1]}",
        "1 True",
    ]


def test_train_device_cpu_on_a_gpu_machine_sets_deepspeed_to_the_cpu(monkeypatch):
    # The configured device decides, not the hardware: with train.device=cpu on a machine with GPUs,
    # DeepSpeed (DS_ACCELERATOR unset) moved the model to CUDA while the trainer built its state on the CPU.
    import types

    import mnemo.train.config as config
    import mnemo.train.rankenv as rankenv
    from mnemo.train.entry import run_train

    monkeypatch.setattr(rankenv, "cuda_available", lambda: True)
    monkeypatch.setattr(rankenv, "import_rank_libraries", lambda: None)
    bare = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
    for device, accel in (("cpu", "cpu"), ("auto", None), ("cuda", None)):
        monkeypatch.setattr(os, "environ", dict(bare, WORLD_SIZE="1", LOCAL_WORLD_SIZE="1"))
        rankenv.apply_rank_env(device)
        assert os.environ.get("DS_ACCELERATOR") == accel, device
    # run_train passes the configured device.
    seen = []

    class Stop(Exception):
        pass

    def apply(device="auto"):
        seen.append(device)
        raise Stop

    cfg = types.SimpleNamespace(train=types.SimpleNamespace(device="cpu"), data=types.SimpleNamespace(sources=[]))
    monkeypatch.setattr(config, "load_config", lambda path, overrides: cfg)
    monkeypatch.setattr("mnemo.train.resume.check_before_start", lambda c, **kw: None)
    monkeypatch.setattr(config, "check_memory_fit", lambda c: None)  # WORLD_SIZE=1 alone: checked here
    monkeypatch.setattr(rankenv, "check_train_device", lambda *a: None)
    monkeypatch.setattr(rankenv, "apply_rank_env", apply)
    try:
        run_train("c.yaml", [])
    except Stop:
        pass
    assert seen == ["cpu"]


HOSTILE_MODULE = "import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('ran')\n"


def test_no_process_mnemo_starts_imports_from_the_working_directory(tmp_path, monkeypatch):
    # `python -m` puts the working directory first on sys.path: a json.py or yaml.py where `mnemo launch` ran
    # was imported, so run, by torchrun and in every rank (ssh nodes and SLURM jobs start in the job's folder).
    import subprocess
    import sys
    from pathlib import Path

    from mnemo.data_pipeline.processes import python_command
    from mnemo.launch import torchrun
    from mnemo.launch.remote import remote_command
    from mnemo.launch.slurm import SlurmOptions, sbatch_script
    from mnemo.train import universal

    plan = torchrun.NodePlan(config="/c.yaml", overrides=[], run_dir=Path("/r"), nproc_per_node=2)
    assert torchrun.node_env(plan, {})["PYTHONSAFEPATH"] == "1"  # the ranks torchrun starts inherit it
    assert torchrun.torchrun_command(plan, "/l")[:4] == [sys.executable, "-P", "-m", "torch.distributed.run"]
    remote = remote_command(cwd="/w", python="/v/python", env={}, launch_args=["c.yaml"])
    assert "/v/python -P -m mnemo launch c.yaml" in remote
    opts = SlurmOptions(config="/c.yaml", overrides=[], run_dir=Path("/r"), cwd="/w", python="/v/python", job_name="j")
    assert "/v/python -P -m mnemo launch /c.yaml" in sbatch_script(opts)
    seen = []
    with monkeypatch.context() as m:  # universal.subprocess is the subprocess module itself
        m.setattr(
            universal.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0)
        )
        universal._run_converter(tmp_path / "ds" / "tag", tmp_path / "ds" / "out")
    assert seen[0][:3] == [sys.executable, "-P", "-c"]
    # What those two mean to Python: a rank as torchrun starts it (json: the worker imports it) and a -P command.
    (tmp_path / "json.py").write_text(HOSTILE_MODULE)
    env = {**os.environ, **torchrun.node_env(plan, os.environ)}
    r = subprocess.run([sys.executable, "-m", "mnemo.launch.worker"], cwd=tmp_path, env=env, capture_output=True)
    assert r.returncode == 2 and b"usage:" in r.stderr, r.stderr
    r = subprocess.run([*python_command(sys.executable), "-c", "import json"], cwd=tmp_path)
    assert r.returncode == 0 and not (tmp_path / "PWNED").exists()


def test_leftover_launcher_variables_are_one_line_or_ignored_when_alone():
    # Were int()'s "invalid literal" traceback, EADDRINUSE on a leftover MASTER_PORT, or a silent
    # 10-minute wait for ranks nobody starts followed by torch's traceback.
    import socket

    import pytest

    from mnemo.train.errors import UserError
    from mnemo.train.rankenv import check_dist_env

    for env, named in (
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
        ({"LOCAL_WORLD_SIZE": "x"}, "LOCAL_WORLD_SIZE='x'"),
        ({"SLURM_RESTART_COUNT": "abc"}, "SLURM_RESTART_COUNT='abc'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
        ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "notaport"}, "MASTER_PORT='notaport'"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "70000"}, "MASTER_PORT='70000'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 in the environment: not below WORLD_SIZE=2"),
    ):
        with pytest.raises(UserError, match=named.replace("[", r"\[")):
            check_dist_env(env)
    # Alone (no WORLD_SIZE): a leftover MASTER_PORT, in use or not a port, is not read; the rank serves its own.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for leftover in (port, "notaport"):
            assert check_dist_env({"MASTER_PORT": leftover}) is None
            env = rank_env({"MASTER_PORT": leftover, "LOCAL_WORLD_SIZE": "4"}, use_cuda=False)
            assert env["MASTER_PORT"] not in (port, leftover) and env["LOCAL_WORLD_SIZE"] == "1"
    # WORLD_SIZE > 1 with no launcher: said before the wait; under one (torchrun, mnemo launch), nothing.
    left = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert check_dist_env(left) == (
        "mnemo train: waiting for 2 ranks at 127.0.0.1:1 (WORLD_SIZE=2 RANK=1 from the environment; unset them"
        " to train alone, or start the others with mnemo launch)"
    )
    assert check_dist_env({**left, "TORCHELASTIC_RUN_ID": "x"}) is None
    assert check_dist_env({**left, "WORLD_SIZE": "1", "RANK": "0"}) is None


def test_leftover_world_size_1_trains_alone_and_a_partial_launcher_env_is_one_line():
    # WORLD_SIZE=1 (or 2) without MASTER_ADDR/MASTER_PORT was deepspeed's MPI discovery traceback ("No module
    # named 'mpi4py'"), after a "waiting for 2 ranks at :" line with an empty address.
    import pytest

    from mnemo.train.errors import UserError
    from mnemo.train.rankenv import alone, check_dist_env

    for env in ({"WORLD_SIZE": "1"}, {"WORLD_SIZE": " 1 ", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}):
        assert alone(env) and check_dist_env(env) is None
        added = rank_env(env, use_cuda=False)
        assert added["WORLD_SIZE"] == "1" and added["MASTER_ADDR"] == "127.0.0.1" and added["MASTER_PORT"]
    assert not alone({"WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "x"})
    full = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for env, missing in (
        ({"WORLD_SIZE": "2", "RANK": "1"}, "without LOCAL_RANK, MASTER_ADDR, MASTER_PORT:"),
        ({"WORLD_SIZE": " 2"}, "without RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT:"),
        ({**full, "MASTER_PORT": ""}, "without MASTER_PORT:"),
        ({**full, "MASTER_ADDR": " ", "TORCHELASTIC_RUN_ID": "x"}, "without MASTER_ADDR:"),
        ({**full, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "", "LOCAL_SIZE": "1"}, "without LOCAL_RANK:"),
    ):
        with pytest.raises(UserError, match=missing) as e:
            check_dist_env(env)
        assert "unset WORLD_SIZE to train alone" in str(e.value) and "\n" not in str(e.value)


def test_a_rendezvous_that_fails_is_one_line_naming_master_addr_and_port(monkeypatch):
    import socket
    import types

    import deepspeed
    import pytest
    import torch

    from mnemo.train.errors import UserError
    from mnemo.train.trainer import Trainer

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]

        def init_distributed(**kw):  # torch's own error for a store on a port in use
            torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)

        monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        ns = types.SimpleNamespace
        cfg = ns(train=ns(device="cpu"), model=ns(dtype="fp32"), checkpoint=ns(collective_timeout_s=5))
        me = ns(cfg=cfg, info=ns(local_world_size=1, local_rank=0))
        with pytest.raises(UserError) as e:
            Trainer._init_distributed(me)
    msg = str(e.value)
    assert msg.startswith(f"cannot meet the other ranks at MASTER_ADDR:MASTER_PORT 127.0.0.1:{port} (WORLD_SIZE=1")
    assert "\n" not in msg and "address already in use" in msg, msg


def test_a_ds_accelerator_left_for_the_other_device_is_replaced_by_train_device():
    # DS_ACCELERATOR=cuda on a machine without a GPU was "RuntimeError: Found no NVIDIA driver" with
    # train.device=cpu: the rank kept any value it found.
    ranks = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    assert rank_env({**ranks, "DS_ACCELERATOR": "cuda"}, use_cuda=False) == {"DS_ACCELERATOR": "cpu"}
    assert rank_env({**ranks, "DS_ACCELERATOR": "cpu"}, use_cuda=True) == {"DS_ACCELERATOR": "cuda"}
    assert rank_env({**ranks, "DS_ACCELERATOR": "cpu"}, use_cuda=False) == {}
    assert rank_env({**ranks, "DS_ACCELERATOR": "cuda"}, use_cuda=True) == {}
    assert rank_env(ranks, use_cuda=True) == {}  # DeepSpeed finds CUDA itself
