"""`mnemo launch --dry-run` on every target: golden output, shell validity, bad input.

Goldens are compared after replacing machine paths with <PYTHON>, <BIN>,
<ROOT> (the mnemo checkout) and <TMP> (the test's working directory).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnemo.launch.env import package_root
from mnemo.cli import main
from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working dir with a valid config (data dir checks pass) and a clean environment."""
    clear_forwarded_env(monkeypatch)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("MNEMO_TAG", "a b")
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"run:\n  dir: runs/g\ndata:\n  path: {data}\n")
    (tmp_path / "hosts").write_text("# two workers\nworker-0 slots=2\n\nworker-1 slots=2  # spare\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def normalize(text: str, tmp: Path) -> str:
    py = sys.executable
    for real, token in (
        (py, "<PYTHON>"),
        (str(Path(py).parent), "<BIN>"),
        (package_root(), "<ROOT>"),
        (str(tmp), "<TMP>"),
    ):
        text = text.replace(real, token)
    return text


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


GOLDEN_LOCAL = """\
# node 0 of 1: 2 rank(s), log <TMP>/runs/g/logs/node0.log
PATH=/usr/local/bin:/usr/bin:/bin:<BIN> PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 MNEMO_NODE_RANK=0 MNEMO_NNODES=1 <PYTHON> -P -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2 --max-restarts 0 --signals-to-handle SIGINT,SIGQUIT --tee 3 --log-dir '<temporary folder>' --log-line-prefix-template '[rank${rank}]: ' -m mnemo.launch.worker <TMP>/c.yaml train.lr=0.01
"""

GOLDEN_NODE = """\
# node 1 of 2: 2 rank(s), log <TMP>/runs/g/logs/node1.log
PATH=/usr/local/bin:/usr/bin:/bin:<BIN> PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 MNEMO_NODE_RANK=1 MNEMO_NNODES=2 <PYTHON> -P -m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400 --rdzv-id mnemo-5dcd9b41fb --rdzv-conf is_host=false --nproc-per-node 2 --max-restarts 1 --signals-to-handle SIGINT,SIGQUIT --tee 3 --log-dir '<temporary folder>' --log-line-prefix-template '[rank${rank}]: ' -m mnemo.launch.worker <TMP>/c.yaml
"""

GOLDEN_HOSTFILE = """\
# node 0: worker-0
ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 -- worker-0 'cd <TMP> && exec env MNEMO_TAG='"'"'a b'"'"' NCCL_DEBUG=INFO PATH=/usr/local/bin:/usr/bin:/bin:<BIN> <PYTHON> -P -m mnemo launch <TMP>/c.yaml train.lr=0.01 --nnodes 2 --node-rank 0 --nproc-per-node 2 --master-addr worker-0 --master-port 29500 --rdzv-id mnemo-5dcd9b41fb --max-restarts 0 --stop-on-stdin-eof'
# node 1: worker-1
ssh -o BatchMode=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 -o ServerAliveCountMax=3 -- worker-1 'cd <TMP> && exec env MNEMO_TAG='"'"'a b'"'"' NCCL_DEBUG=INFO PATH=/usr/local/bin:/usr/bin:/bin:<BIN> <PYTHON> -P -m mnemo launch <TMP>/c.yaml train.lr=0.01 --nnodes 2 --node-rank 1 --nproc-per-node 2 --master-addr worker-0 --master-port 29500 --rdzv-id mnemo-5dcd9b41fb --max-restarts 0 --stop-on-stdin-eof'
"""

GOLDEN_SLURM = """\
#!/bin/bash
# Written by `mnemo launch --slurm` for <TMP>/c.yaml.
# Submit it again with: sbatch <TMP>/runs/g/slurm/job.sbatch
#SBATCH --job-name=g
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=2:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=<TMP>/runs/g/logs/slurm-%j.out
#SBATCH --chdir=<TMP>
#SBATCH --qos=high

set -u
# Preemption notice (--signal=B:USR1@...): passed on to srun, which passes it to every node launcher,
# and they to the workers; the trainer saves and exits. Caught from the start: one that comes before
# srun runs requeues the job at once (nothing trained yet); it used to kill this shell, failing the job.
SRUN_PID=
NOTICE=
forward_usr1() {
    if [ -z "$SRUN_PID" ]; then
        NOTICE=1
        return
    fi
    echo "mnemo: got SIGUSR1, forwarding it to the training processes"
    kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap forward_usr1 USR1

RUN_DIR=<TMP>/runs/g
VENV_BIN=<BIN>
# The venv's tools are found, after the submitting shell's (sbatch exported its PATH).
case ":$PATH:" in *":$VENV_BIN:"*) ;; *) export PATH="$PATH:$VENV_BIN" ;; esac

# Rendezvous at the first node of the allocation (its address as SLURM knows it).
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(scontrol show node "$HEAD_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)
MASTER_ADDR=${HEAD_ADDR:-$HEAD_NODE}
# The same port on every start of this job, below Linux's ephemeral range (32768-60999), where the
# head node's own outgoing connections take ports at random and could hold this one.
MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))
echo "mnemo: job $SLURM_JOB_ID, SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, $SLURM_JOB_NUM_NODES node(s): $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# The trainer's marker of a stop request: a regular file holding a step number. Any other file of
# that name is the user's: never removed, never read as a preemption (it would requeue forever).
preempted() { local f="$RUN_DIR/PREEMPTED"; [ -f "$f" ] && [ ! -L "$f" ] && [ "$(grep -c "" "$f")" = 1 ] && grep -qxE "[0-9]+" "$f"; }
if preempted; then rm -f "$RUN_DIR/PREEMPTED"; fi  # stale marker of an earlier job
if [ -n "$NOTICE" ]; then
    echo "mnemo: got SIGUSR1 before training started; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi

# One node launcher per node; each starts torchrun with its node rank. The wrapper holds SIGUSR1 and
# SIGTERM until the launcher catches them (launch/slurm.py NODE_WRAPPER).
NODE_WRAPPER='pending=
up=0
hold() { if [ "$up" = 1 ]; then kill -s "$1" "$pid" 2>/dev/null; else pending="$pending $1"; fi; }
catches() {
    local key mask
    while read -r key mask; do
        if [ "$key" = SigCgt: ]; then
            (( (0x$mask >> (usr1 - 1)) & (0x$mask >> (term - 1)) & 1 ))
            return
        fi
    done <"/proc/$1/status" 2>/dev/null
    return 1
}
usr1=$(kill -l USR1)
term=$(kill -l TERM)
trap "" USR1 TERM
"$@" --node-rank "$SLURM_NODEID" &
pid=$!
trap "hold USR1" USR1
trap "hold TERM" TERM
while [ "$up" = 0 ] && kill -0 "$pid" 2>/dev/null; do
    if catches "$pid"; then
        up=1
        for sig in $pending; do kill -s "$sig" "$pid" 2>/dev/null; done
        pending=
    else
        sleep 0.1
    fi
done
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
'
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \\
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} --kill-on-bad-exit=1 \\
    bash -c "$NODE_WRAPPER" mnemo-node \\
    <PYTHON> -P -m mnemo launch <TMP>/c.yaml train.lr=0.01 \\
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node 4 \\
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-id "mnemo-$SLURM_JOB_ID" \\
    --max-restarts 0 &
SRUN_PID=$!
if [ -n "$NOTICE" ]; then forward_usr1; fi  # one that came while srun was being started

# wait returns early when a trapped signal arrives: wait again until srun is gone.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
RC=$?

if preempted; then
    echo "mnemo: training stopped on a preemption signal (steps done are saved); requeueing job $SLURM_JOB_ID"
    rm -f "$RUN_DIR/PREEMPTED"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "mnemo: training exited with code $RC"
exit "$RC"
"""


def _torchrun_args(line: str) -> list[str]:
    words = shlex.split(line)
    i = words.index("torch.distributed.run")
    return words[i + 1 :]


# --------------------------------------------------------------------------- #
# Goldens


def test_help_lists_every_target(capsys):
    with pytest.raises(SystemExit) as e:
        main(["launch", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--nproc-per-node",
        "--hostfile",
        "--include",
        "--exclude",
        "--slurm",
        "--nodes",
        "--partition",
        "--account",
        "--time",
        "--gpus-per-node",
        "--sbatch-arg",
        "--nnodes",
        "--node-rank",
        "--master-addr",
        "--master-port",
        "--max-restarts",
        "--dry-run",
    ):
        assert flag in out
    # The help's SLURM port rule is the one the script computes (it said 20000 + ... after the script moved).
    rule = re.search(r"--slurm: (\d+) \+ job id % (\d+)", " ".join(out.split()))
    assert rule, out
    assert f"MASTER_PORT=$(({rule[1]} + SLURM_JOB_ID % {rule[2]}))" in GOLDEN_SLURM


def test_local_dry_run_golden(ws, capsys):
    rc, out, _ = launch(capsys, "c.yaml", "--dry-run", "--nproc-per-node", "2", "train.lr=0.01")
    assert rc == 0
    assert normalize(out, ws) == GOLDEN_LOCAL
    assert not (ws / "runs").exists(), "a dry run must start and write nothing"


def test_node_dry_run_golden(ws, capsys):
    rc, out, _ = launch(
        capsys,
        "c.yaml",
        "--dry-run",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29400",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
    )
    assert rc == 0
    assert normalize(out, ws) == GOLDEN_NODE


def test_torchrun_accepts_the_generated_flags(ws, capsys):
    """The printed torchrun options are real torchrun options (its own parser reads them)."""
    from torch.distributed.run import get_args_parser

    for extra in (
        ["--nproc-per-node", "2"],
        ["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "--max-restarts", "3"],
    ):
        _, out, _ = launch(capsys, "c.yaml", "--dry-run", *extra)
        line = [ln for ln in out.splitlines() if not ln.startswith("#")][0]
        args = get_args_parser().parse_args(_torchrun_args(line))
        assert args.module and args.training_script == "mnemo.launch.worker"
        assert args.tee == "3" and args.signals_to_handle == "SIGINT,SIGQUIT"
        if "--nnodes" in extra:
            assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint, args.max_restarts) == (
                "2",
                "c10d",
                "h:29500",
                3,
            )
            assert args.rdzv_conf == "is_host=true"  # node 0 serves the rendezvous store


def test_hostfile_dry_run_golden(ws, capsys):
    rc, out, _ = launch(capsys, "c.yaml", "--hostfile", "hosts", "--dry-run", "train.lr=0.01")
    assert rc == 0
    assert normalize(out, ws) == GOLDEN_HOSTFILE
    for line in out.splitlines():
        if not line.startswith("#"):
            subprocess.run(["bash", "-n", "-c", line], check=True)


def test_hostfile_include_exclude_and_overrides(ws, capsys):
    _, out, _ = launch(
        capsys,
        "c.yaml",
        "--hostfile",
        "hosts",
        "--include",
        "worker-1",
        "--master-addr",
        "10.1.1.1",
        "--master-port",
        "2222",
        "--nproc-per-node",
        "1",
        "--dry-run",
    )
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1
    ssh = shlex.split(lines[0])
    assert ssh[ssh.index("--") + 1] == "worker-1"
    remote = shlex.split(ssh[-1])
    for flag, value in (
        ("--nnodes", "1"),
        ("--node-rank", "0"),
        ("--master-addr", "10.1.1.1"),
        ("--master-port", "2222"),
        ("--nproc-per-node", "1"),
    ):
        assert remote[remote.index(flag) + 1] == value
    _, out, _ = launch(capsys, "c.yaml", "--hostfile", "hosts", "--exclude", "worker-0", "--dry-run")
    assert "# node 0: worker-1" in out and "worker-0" not in out


def test_slurm_dry_run_golden_and_bash_n(ws, capsys):
    rc, out, err = launch(
        capsys,
        "c.yaml",
        "--slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--partition",
        "gpu",
        "--account",
        "proj",
        "--time",
        "2:00:00",
        "--sbatch-arg=--qos=high",
        "--dry-run",
        "train.lr=0.01",
    )
    assert rc == 0
    assert normalize(out, ws) == GOLDEN_SLURM
    script = ws / "runs/g/slurm/job.sbatch"
    assert script.read_text() == out, "the printed script is the one written into the run dir"
    assert "not submitted" in err
    assert (ws / "runs/g/logs").is_dir(), "SLURM does not create the --output directory itself"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_slurm_defaults_and_signal_time_from_config(ws, capsys):
    rc, out, _ = launch(
        capsys, "c.yaml", "--slurm", "--dry-run", "checkpoint.grace_period_s=300", "--master-port", "4000"
    )
    assert rc == 0
    assert "#SBATCH --nodes=1\n" in out and "#SBATCH --signal=B:USR1@300\n" in out
    assert "--gpus-per-node" not in out and "--partition" not in out and "--time" not in out
    assert "MASTER_PORT=4000\n" in out and "--nproc-per-node 2 " in out  # CPU default: 2 ranks
    # --gpus-per-node 0 is a CPU job: no GPU request, ranks per node stay at the CPU default
    rc, out, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", "--gpus-per-node", "0")
    assert rc == 0 and "--gpus-per-node" not in out and "--nproc-per-node 2 " in out
    assert "warning" not in err  # asked for no GPU on purpose


def test_slurm_job_that_asks_for_no_gpu_is_warned_of_unless_it_trains_on_cpu(ws, capsys):
    """Before: silent, and on a cluster that gives a job only the GPUs it asks for, train.device=auto ranks
    trained on the CPU without a word."""
    _, _, err = launch(capsys, "c.yaml", "--slurm", "--dry-run")
    assert "mnemo launch: warning: the job asks SLURM for no GPUs (train.device=auto)" in err
    for asked in (["--gpus-per-node", "4"], ["--sbatch-arg=--gres=gpu:2"], ["train.device=cpu"]):
        rc, _, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", *asked)
        assert rc == 0 and "warning" not in err, (asked, err)


# --------------------------------------------------------------------------- #
# Quoting: host names and values are never executed


def test_shell_metacharacters_in_values_are_quoted(ws, capsys):
    evil = "n$(touch${IFS}PWNED);`touch${IFS}PWNED2`|x'y\" z"
    rc, out, _ = launch(capsys, "c.yaml", "--hostfile", "hosts", "--dry-run", f"run.name={evil}")
    assert rc == 0
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    # Run what the remote shell would run, with the python replaced by a stub
    # that records its arguments: the value arrives as one literal word.
    stub = ws / "stub.sh"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    stub.chmod(0o755)
    for i, line in enumerate(lines):
        remote = shlex.split(line)[-1].replace(sys.executable, str(stub))
        subprocess.run(["bash", "-c", remote], check=True, cwd=ws, env=dict(os.environ, ARGV_OUT=str(ws / f"argv{i}")))
        argv = (ws / f"argv{i}").read_text().splitlines()
        assert f"run.name={evil}" in argv
    assert not list(ws.glob("PWNED*")), "a value was executed"


def test_remote_command_forwards_environment(ws, capsys):
    from mnemo.launch.remote import remote_command

    stub = ws / "stub.sh"
    stub.write_text('#!/bin/sh\necho "$MNEMO_TAG|$NCCL_DEBUG|$PATH|$(pwd)" > "$OUT"\n')
    stub.chmod(0o755)
    env = {"MNEMO_TAG": "a b; $(x)", "NCCL_DEBUG": "WARN", "PATH": "/opt/x y/bin:/usr/bin:/bin"}
    cmd = remote_command(cwd=str(ws), python=str(stub), env=env, launch_args=["c.yaml"])
    subprocess.run(["bash", "-c", cmd], check=True, cwd="/", env={"PATH": "/usr/bin:/bin", "OUT": str(ws / "env.out")})
    assert (ws / "env.out").read_text().strip().split("|") == [
        "a b; $(x)",
        "WARN",
        "/opt/x y/bin:/usr/bin:/bin",
        str(ws),
    ]


def test_remote_command_with_a_python_path_holding_equals(ws):
    # Was `exec env K=V... /w/v=1/bin/python -m ...`: env read the path as an assignment and ran '-m'
    # ("env: '-m': No such file or directory").
    from mnemo.launch.remote import remote_command

    stub = ws / "v=1" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\n{ echo "$MNEMO_TAG"; printf "%s\\n" "$@"; } > "$OUT"\n')
    stub.chmod(0o755)
    env = {"MNEMO_TAG": "a=b c", "PATH": "/usr/bin:/bin"}
    cmd = remote_command(cwd=str(ws), python=str(stub), env=env, launch_args=["c.yaml", "x=$(y)"])
    r = subprocess.run(["bash", "-c", cmd], cwd="/", env={"PATH": "/usr/bin:/bin", "OUT": str(ws / "out")})
    assert r.returncode == 0
    assert (ws / "out").read_text().splitlines() == ["a=b c", "-P", "-m", "mnemo", "launch", "c.yaml", "x=$(y)"]
    # The real interpreter, through a link to its venv named with '=': the command runs mnemo.
    venv = ws / "venv=2"
    venv.symlink_to(Path(sys.prefix))
    python = venv / "bin" / Path(sys.executable).name
    cmd = remote_command(cwd=str(ws), python=str(python), env={"PATH": "/usr/bin:/bin"}, launch_args=["--help"])
    r = subprocess.run(["bash", "-c", cmd], cwd="/", capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "--hostfile" in r.stdout


def test_ranks_path_is_the_launchers_with_the_venv_appended():
    from mnemo.launch.env import path_with_venv

    assert path_with_venv({"PATH": "/usr/bin:/bin"}, "/v/bin/python") == "/usr/bin:/bin:/v/bin"
    assert path_with_venv({"PATH": "/v/bin:/usr/bin"}, "/v/bin/python") == "/v/bin:/usr/bin"  # order kept


# --------------------------------------------------------------------------- #
# Bad input: one-line errors, nothing started


def _fails(capsys, *argv: str) -> str:
    rc, out, err = launch(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith("mnemo: error: ") and err.count("\n") == 1, err
    assert out == ""
    return err


def test_config_errors_fail_before_anything(ws, capsys):
    assert "unknown config key 'train.lrr'" in _fails(capsys, "c.yaml", "--slurm", "train.lrr=1")
    assert "data.path: no such directory" in _fails(capsys, "c.yaml", "--dry-run", "data.path=/nonexistent")
    assert "config file not found" in _fails(capsys, "missing.yaml", "--hostfile", "hosts")
    assert not (ws / "runs").exists()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--hostfile", "hosts", "--slurm"], "--hostfile and --slurm are different targets"),
        (["--include", "a"], "--include needs --hostfile"),
        (["--partition", "p"], "--partition needs --slurm"),
        (["--slurm", "--nnodes", "2"], "--nnodes cannot be combined with --slurm"),
        (["--slurm", "--master-addr", "h"], "--master-addr cannot be combined with --slurm"),
        (["--nnodes", "2", "--master-addr", "h"], "--nnodes > 1 needs --node-rank"),
        (["--nnodes", "2", "--node-rank", "1"], "--nnodes > 1 needs --master-addr"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank must be in [0, 1]"),
        (
            ["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "--master-port", "70000"],
            "--master-port must be in",
        ),
        (["--max-restarts", "-1"], "--max-restarts must be >= 0"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1"),
        (["--nnodes", "0"], "--nnodes must be >= 1"),
        (["--slurm", "--nodes", "0"], "--nodes must be >= 1, got 0"),  # was silently 1 node
        (["--slurm", "--nodes", "-1"], "--nodes must be >= 1, got -1"),
        (["--slurm", "--gpus-per-node", "-1"], "--gpus-per-node must be >= 0, got -1"),
        (["--slurm", "--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
        (["--hostfile", "hosts", "--min-nodes", "0"], "--min-nodes must be in [1, 2] (the selected hosts), got 0"),
        (["--slurm", "--master-port", "0"], "--master-port must be in [1, 65535], got 0"),
        (["--node-rank", "1"], "--node-rank 1 needs --nnodes > 1"),
        (["--hostfile", "hosts", "--include", ",,"], "--include: ',,' has an empty host name"),
        (["--hostfile", "hosts", "--exclude", ""], "--exclude: '' has an empty host name"),
        (["--hostfile", "hosts", "--include", "worker-0,"], "--include: 'worker-0,' has an empty host name"),
        (["--hostfile", "hosts", "--include", "nope"], "--include: host 'nope' is not in the hostfile"),
        (["--hostfile", "hosts", "--include", "", "--exclude", "worker-0"], "mutually exclusive"),
        (["--hostfile", "hosts", "--nproc-per-node", "3"], "more than the 2 slot(s) of host 'worker-0'"),
        (["--hostfile", "nohosts"], "hostfile not found"),
        (["--slurm", "--time", "2 hours"], "--time '2 hours' is not a SLURM time"),
        (["--slurm", "--time", "\u0661\u0660"], "is not a SLURM time"),  # Arabic-Indic digits: \d took them
        (["--slurm", "--partition", "a;b"], "--partition 'a;b' contains characters"),
        (["--slurm", "--sbatch-arg", "qos=high"], "must be one sbatch option"),
    ],
)
def test_bad_flags(ws, capsys, argv, msg):
    assert msg in _fails(capsys, "c.yaml", "--dry-run", *argv)


BIG = "9" * 23


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--dry-run", "--slurm", "--nodes", BIG], f"--nodes must be <= 100000 (nodes of one job), got {BIG}"),
        (["--dry-run", "--slurm", "--nodes", "100001"], "--nodes must be <= 100000 (nodes of one job), got 100001"),
        (["--dry-run", "--slurm", "--gpus-per-node", "1025"], "--gpus-per-node must be <= 1024 (GPUs of one machine)"),
        (["--dry-run", "--slurm", "--nproc-per-node", BIG], "--nproc-per-node must be <= 1024 (ranks on one machine)"),
        # Not a dry run: checked before the memory check, which blamed memory.long.capacity and train.batch_size.
        ([f"--nproc-per-node={BIG}"], f"--nproc-per-node must be <= 1024 (ranks on one machine), got {BIG}"),
        (["--nproc-per-node", "1025", "--hostfile", "hosts"], "--nproc-per-node must be <= 1024"),
        (
            ["--dry-run", "--nnodes", BIG, "--node-rank", "0", "--master-addr", "h"],
            f"--nnodes must be <= 100000 (nodes of one job), got {BIG}",
        ),
    ],
)
def test_huge_node_and_rank_counts_are_refused(ws, capsys, argv, msg):
    """They went into the sbatch script (#SBATCH --nodes=10**23, --gpus-per-node) and torchrun's command line
    as given; --nproc-per-node 10**23 without --dry-run was refused with advice to lower memory.long.capacity."""
    assert _fails(capsys, "c.yaml", *argv).startswith(f"mnemo: error: {msg}")


@pytest.mark.parametrize(
    ("arg", "flag", "hint"),
    [
        ("--nodes=3", "--nodes", "use mnemo launch --nodes"),
        ("--nodes 3", "--nodes", "use mnemo launch --nodes"),
        ("-N3", "--nodes", "use mnemo launch --nodes"),
        ("-N 3", "--nodes", "use mnemo launch --nodes"),
        ("-HN3", "--nodes", "use mnemo launch --nodes"),  # -H (hold) bundled in front
        ("--node=3", "--nodes", "use mnemo launch --nodes"),  # getopt_long takes a unique abbreviation
        ("--ntasks-per-node=4", "--ntasks-per-node", "--nproc-per-node"),
        ("-n8", "--ntasks", "--nproc-per-node"),
        ("--gpus-per-node=8", "--gpus-per-node", "use mnemo launch --gpus-per-node"),
        ("-p gpu", "--partition", "use mnemo launch --partition"),
        ("--account=x", "--account", "use mnemo launch --account"),
        ("-t10", "--time", "use mnemo launch --time"),
        ("--signal=B:USR1@5", "--signal", "checkpoint.grace_period_s"),
        ("--no-requeue", "--no-requeue", "requeues"),
        ("-o/tmp/x", "--output", "<run.dir>/logs/slurm-%j.out"),
        ("--error=x", "--error", "<run.dir>/logs/slurm-%j.out"),
        ("--open-mode=truncate", "--open-mode", "<run.dir>/logs/slurm-%j.out"),
        ("-D /tmp", "--chdir", "cd there first"),
        ("--job-name=x", "--job-name", "run.name"),
    ],
)
def test_sbatch_arg_cannot_override_what_mnemo_sets(ws, capsys, arg, flag, hint):
    # Was: written as a later #SBATCH line, which wins: --nodes=3 bypassed the global batch check.
    err = _fails(capsys, "c.yaml", "--slurm", "--dry-run", f"--sbatch-arg={arg}")
    assert err.startswith(f"mnemo: error: --sbatch-arg {arg!r}: {flag} is for mnemo launch to set") and hint in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("time", ["2", "1:59", "0:01:30", "00:02:00", "0-0:2"])
def test_slurm_time_not_above_the_grace_period_is_refused(ws, capsys, time):
    # Was accepted: SLURM sends the preemption notice grace_period_s before the limit, i.e. at once,
    # and every run of the job was requeued again.
    err = _fails(capsys, "c.yaml", "--slurm", "--dry-run", "--time", time, "checkpoint.grace_period_s=120")
    assert f"--time {time!r} (120 s) is not above checkpoint.grace_period_s (120 s)" in err


@pytest.mark.parametrize("time", ["3", "2:01", "0", "UNLIMITED", "INFINITE", "1-0", "0:02:01"])
def test_slurm_time_above_the_grace_period_or_unlimited_is_written(ws, capsys, time):
    rc, out, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", "--time", time, "checkpoint.grace_period_s=120")
    assert rc == 0, err
    assert f"#SBATCH --time={time}\n" in out


@pytest.mark.parametrize(
    "time, msg",
    [
        ("1-" + "2" * 4400, "is not a SLURM time"),  # int() of over 4,300 digits: a ValueError traceback
        ("9" * 20, "is not a SLURM time"),  # was written into #SBATCH --time= as it was
        ("24856-0", "is over SLURM's longest time limit, 24855 days"),  # past SLURM's 32-bit seconds
        ("35791681", "is over SLURM's longest time limit"),  # minutes
        ("596524:00:00", "is over SLURM's longest time limit"),  # hours
    ],
)
def test_slurm_time_past_what_slurm_holds_is_refused(ws, capsys, time, msg):
    err = _fails(capsys, "c.yaml", "--slurm", "--dry-run", "--time", time)
    assert err.startswith("mnemo: error: --time ") and msg in err and len(err) < 400, err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--hostfile", "hosts", "--exclude", "a" * 50_000 + ",,"], "--exclude: 'aaa"),
        (["--hostfile", "hosts", "--include", "a" * 50_000], "--include: host 'aaa"),
        (["--hostfile", "hosts", "--exclude", "u" * 50_000 + "@worker-0"], "--exclude: host 'uuu"),
        (["--slurm", "--time", "x" * 100_000], "--time 'xxx"),
        (["--slurm", "--partition", "a;" * 50_000], "--partition 'a;a;"),
        (["--slurm", "--sbatch-arg", "q" * 50_000], "--sbatch-arg 'qqq"),
        (["--slurm", "--sbatch-arg=--nodes=" + "3" * 50_000], "--sbatch-arg '--nodes=333"),
        (["--master-addr", "u" * 50_000 + "@h", "--nnodes", "2", "--node-rank", "0"], "--master-addr: 'uuu"),
        (["--nnodes", "2", "--node-rank", "0", "--master-addr", "h", "--rdzv-id=" + "-" * 50_000], "--rdzv-id '---"),
        (["--hostfile", " " * 50_000], "--hostfile: empty path"),
        (["--hostfile", "x/" * 2_000 + "hosts"], "hostfile not found: x/x/x/"),  # the whole path was quoted
        (["--hostfile", "h" * 5_000], "hostfile hhh"),  # "File name too long": its str() the path again
        (["run.name=" + "n" * 50_000 + "\x07"], "override run.name: 'nnn"),  # a control character
    ],
)
def test_a_huge_flag_value_is_quoted_cut(ws, capsys, argv, msg):
    """The error line quoted the value whole: 50,000 characters of --exclude, 100,000 of --time."""
    err = _fails(capsys, "c.yaml", "--dry-run", *argv)
    assert err.startswith(f"mnemo: error: {msg}") and len(err) < 400, err[:300]


def test_slurm_longest_time_is_written(ws, capsys):
    rc, out, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", "--time", "24855-0")
    assert rc == 0, err
    assert "#SBATCH --time=24855-0\n" in out


def test_slurm_time_formats_in_seconds():
    from mnemo.launch.slurm import time_limit_s

    cases = {"5": 300, "5:30": 360, "1:02:03": 3780, "2-3": 183600, "2-3:04": 183840, "2-3:04:05": 183900}
    assert {t: time_limit_s(t) for t in cases} == cases  # seconds round up to a minute, as in SLURM
    assert [time_limit_s(t) for t in ("0", "0:00", "UNLIMITED", "INFINITE")] == [None] * 4


def test_sbatch_arg_with_other_options_is_written(ws, capsys):
    for arg, line in [(a, a) for a in ("--gpus=2", "--qos=high", "-c4", "--time-min=5", "--exclusive")] + [
        ("--comment=-N3 --nodes=2", '--comment="-N3 --nodes=2"')
    ]:
        rc, out, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", f"--sbatch-arg={arg}")
        assert rc == 0, err
        assert f"#SBATCH {line}\n\n" in out


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_slurm_run_dir_that_cannot_be_a_directory(ws, capsys, monkeypatch, dry_run):
    # Was a NotADirectoryError traceback from write_script, or "[Errno 2] No such file or directory:
    # '/proc/x'" naming no field.
    monkeypatch.setattr("mnemo.launch.slurm.find_sbatch", lambda: "/bin/false")  # never reached
    (ws / "afile").write_text("keep")
    err = _fails(capsys, "c.yaml", "--slurm", *dry_run, f"run.dir={ws / 'afile'}")
    assert err == f"mnemo: error: run.dir: {ws / 'afile'} is not a directory\n"
    err = _fails(capsys, "c.yaml", "--slurm", *dry_run, f"run.dir={ws / 'afile' / 'sub'}")
    assert err == f"mnemo: error: run.dir: {ws / 'afile' / 'sub'}: {ws / 'afile'} is not a directory\n"
    assert (ws / "afile").read_text() == "keep"
    (ws / "rd").mkdir()
    (ws / "rd" / "slurm").write_text("")  # where the script's folder goes
    err = _fails(capsys, "c.yaml", "--slurm", *dry_run, f"run.dir={ws / 'rd'}")
    assert err == f"mnemo: error: run.dir: cannot write {ws / 'rd' / 'slurm'}: File exists\n"
    err = _fails(capsys, "c.yaml", "--slurm", *dry_run, "run.dir=/proc/mnemo-x")
    assert err == "mnemo: error: run.dir: cannot create /proc/mnemo-x: No such file or directory\n"
    assert not (ws / "runs").exists()


def test_local_run_dir_that_cannot_be_a_directory_fails_before_start(ws, capsys, monkeypatch):
    def no_start(*a, **k):
        raise AssertionError("started")

    monkeypatch.setattr("mnemo.launch.local.run_node", no_start)
    (ws / "afile").write_text("keep")
    err = _fails(capsys, "c.yaml", f"run.dir={ws / 'afile'}")
    assert err == f"mnemo: error: run.dir: {ws / 'afile'} is not a directory\n"
    err = _fails(capsys, "c.yaml", "run.dir=/proc/mnemo-x")
    assert err == "mnemo: error: run.dir: cannot create /proc/mnemo-x: No such file or directory\n"


@pytest.mark.parametrize("target", [["--slurm", "--dry-run"], ["--nproc-per-node", "1"]])
def test_run_dir_name_too_long_leaves_no_folders(ws, capsys, monkeypatch, target):
    # Was: run_dir.mkdir(parents=True) made md/np/sub, then failed on the 256-byte name below it, and
    # left them behind.
    def no_start(*a, **k):
        raise AssertionError("started")

    monkeypatch.setattr("mnemo.launch.local.run_node", no_start)
    before = sorted(p.name for p in ws.iterdir())
    err = _fails(capsys, "c.yaml", *target, f"run.dir=md/np/sub/{'x' * 256}/r")
    assert err.startswith("mnemo: error: run.dir: cannot create ") and err.endswith(": File name too long\n"), err
    assert sorted(p.name for p in ws.iterdir()) == before


def test_slurm_script_not_written_leaves_no_folders(ws, capsys, monkeypatch):
    """The run dir and logs folder made for a script that could not be written go again (only while empty)."""

    def refused(*a, **k):
        raise OSError(28, "No space left on device", str(ws / "md" / "r" / "slurm" / "x.sbatch"))

    monkeypatch.setattr("mnemo.launch.slurm.atomic_write_text", refused)
    err = _fails(capsys, "c.yaml", "--slurm", "--dry-run", "run.dir=md/r")
    assert err.endswith(": No space left on device\n"), err
    assert not (ws / "md").exists()
    (ws / "kept").mkdir()  # a folder that was there before stays
    _fails(capsys, "c.yaml", "--slurm", "--dry-run", "run.dir=kept/r")
    assert list((ws / "kept").iterdir()) == []


def test_malformed_hostfile_names_line(ws, capsys):
    (ws / "bad").write_text("# ok\nworker-0 slots=2\nworker-1 slots=\n")
    assert "bad:3: malformed line 'worker-1 slots='" in _fails(capsys, "c.yaml", "--hostfile", "bad", "--dry-run")


@pytest.mark.parametrize("value", ["", " "])
def test_empty_hostfile_path_is_refused_not_a_local_job(ws, capsys, value):
    # Was: --hostfile '' (a script's unset "$HOSTS") ran the job on this machine alone, and with --include
    # said "--include needs --hostfile".
    assert _fails(capsys, "c.yaml", "--hostfile", value, "--dry-run") == (
        f"mnemo: error: --hostfile: empty path ({value!r})\n"
    )
    assert "--hostfile: empty path" in _fails(capsys, "c.yaml", "--hostfile", value, "--include", "a", "--dry-run")


def test_sbatch_missing_tells_to_use_dry_run(ws, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(ws))  # no sbatch here
    err = _fails(capsys, "c.yaml", "--slurm")
    assert "sbatch not found on PATH" in err and "--dry-run" in err
    assert not (ws / "runs/g/slurm/job.sbatch").exists()


def _fake_ssh(ws: Path) -> Path:
    """An ssh that reaches host 'ok' (runs the command locally) and refuses the others."""
    d = ws / "fakebin"
    d.mkdir(exist_ok=True)
    ssh = d / "ssh"
    ssh.write_text(
        "#!/bin/bash\n"
        'while [ "$1" = -o ]; do shift 2; done\n'
        '[ "$1" = -- ] && shift\n'
        "host=$1; shift\n"
        'if [ "$host" != ok ]; then echo "ssh: connect to host $host port 22: Connection refused" >&2; exit 255; fi\n'
        'exec bash -c "$*"\n'
    )
    ssh.chmod(0o755)
    return d


def test_unreachable_host_fails_fast_by_name(ws, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{_fake_ssh(ws)}:{os.environ['PATH']}")
    (ws / "two").write_text("ok slots=1\ndown-1 slots=1\n")
    t0 = time.time()
    err = _fails(capsys, "c.yaml", "--hostfile", "two")
    assert (
        "host 'down-1' (hostfile line 2) is unreachable over ssh: ssh: connect to host down-1 port 22: Connection refused"
        in err
    )
    assert time.time() - t0 < 10
    assert not (ws / "runs").exists(), "nothing may start when a host is unreachable"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client")
def test_unreachable_host_with_real_ssh(ws, capsys):
    (ws / "one").write_text("nonexistent-host.invalid slots=1\n")
    t0 = time.time()
    err = _fails(capsys, "c.yaml", "--hostfile", "one")
    assert "host 'nonexistent-host.invalid' (hostfile line 1) is unreachable over ssh" in err
    assert time.time() - t0 < 20


@pytest.mark.parametrize("var", ["XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR"])
def test_an_op_cache_folder_that_is_a_file_is_one_line_before_any_rank(ws, capsys, monkeypatch, var):
    # Was torch's NotADirectoryError traceback (cpp_extension._get_build_directory) in every rank.
    from mnemo.train.rankenv import check_op_cache

    (ws / "afile").write_text("")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv(var, str(ws / "afile"))
    for command in ("train", "launch"):
        rc = main([command, "c.yaml"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"mnemo: error: {var}={ws}/afile: {ws}/afile"), err
        assert err.rstrip().endswith("is not a directory (torch builds DeepSpeed's ops there)"), err
    assert not (ws / "runs").exists()
    monkeypatch.setenv(var, str(ws / "cache"))  # made by torch: fine
    check_op_cache(os.environ)
    from mnemo.train.errors import UserError

    real = os.access  # a folder the ranks may not write (root passes permission bits: access() says it)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ws / "cache" else real(p, mode))
    (ws / "cache").mkdir()
    with pytest.raises(UserError, match=rf"^{var}={ws}/cache/ops: {ws}/cache/ops\S*: cannot be made in {ws}/cache \("):
        check_op_cache({var: str(ws / "cache" / "ops")})


@pytest.mark.parametrize(
    "var, value", [("XDG_CACHE_HOME", "gone"), ("TORCH_EXTENSIONS_DIR", "gone"), ("TORCH_EXTENSIONS_DIR", "gone/ops")]
)
def test_an_op_cache_folder_under_a_dangling_link_is_named_as_one(tmp_path, var, value):
    """XDG_CACHE_HOME (or a TORCH_EXTENSIONS_DIR under it) a symbolic link to a missing folder was reported as
    "cannot be made in LINK (Permission denied)", which sent the user to the permissions: now the line that a
    file there gets, naming the link."""
    from mnemo.train.errors import UserError
    from mnemo.train.rankenv import check_op_cache
    from mnemo.train.rundir import run_dir_unusable

    link = tmp_path / "gone"
    link.symlink_to("missing")
    with pytest.raises(UserError) as e:
        check_op_cache({var: str(tmp_path / value)})
    msg = str(e.value)
    assert msg.startswith(f"{var}={tmp_path / value}: "), msg
    assert msg.endswith(f"{link} is a symbolic link to a missing path (torch builds DeepSpeed's ops there)"), msg
    assert "Permission denied" not in msg
    assert run_dir_unusable(link / "run" / "x") == f"{link}/run/x: {link} is a symbolic link to a missing path"
    (tmp_path / "missing").mkdir()  # the link's folder made: the op cache goes there
    check_op_cache({var: str(tmp_path / value)})
    assert run_dir_unusable(link / "run") is None
