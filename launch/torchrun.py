"""The torchrun command line of one node's share of a job.

Every target ends here: local runs one node, the hostfile target runs this on
each host over ssh, the SLURM script runs it on each node with srun. Each rank
runs ``python -m mnemo.launch.worker CONFIG overrides``: it logs which rank and
restart it is and then calls ``mnemo train`` in the same process.

Rendezvous: one node uses torchrun's ``--standalone``; several nodes use the
c10d backend on MASTER_ADDR:MASTER_PORT, hosted by node 0's agent
(``is_host``). c10d (not static) is what lets ``--max-restarts`` restart all
nodes' workers together after one fails.
"""

from __future__ import annotations

import hashlib
import shlex
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from mnemo.data_pipeline.errors import brief
from mnemo.data_pipeline.processes import SAFE_PATH_ENV, python_command
from mnemo.train.errors import UserError

# Signals torchrun itself handles (and forwards to workers by stopping them).
# SIGTERM / SIGUSR1 / SIGHUP are left out on purpose: the node launcher starts
# torchrun with them ignored and delivers them to the workers itself, so that
# a preemption signal makes the trainer save instead of making torchrun stop
# the workers and SIGKILL them after a timeout.
TORCHRUN_HANDLED_SIGNALS = "SIGINT,SIGQUIT"

DEFAULT_MASTER_PORT = 29500

# Where each rank's worker (launch/worker.py) leaves its exit code, one file named by its pid, for the node
# launcher (local.py): the only way it learns that its workers succeeded, which is when torchrun waits in its
# exit barrier for the other nodes' agents (not on a failure, after which torchrun restarts or exits).
WORKER_EXITS_ENV = "MNEMO_WORKER_EXITS"

# torchrun's --log-dir as the dry run shows it: the node launcher makes a temporary folder for each run
# (local.py: torchrun_log_dir) and removes it when torchrun exits.
DRY_RUN_LOG_DIR = "<temporary folder>"


@dataclass
class NodePlan:
    """Everything that decides the torchrun command of one node."""

    config: str  # absolute path of the config file
    overrides: list[str]
    run_dir: Path  # absolute
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_MASTER_PORT
    rdzv_id: str = "mnemo"
    max_restarts: int = 0
    python: str = field(default_factory=lambda: sys.executable)
    # Module each rank runs (``python -m``); tests put a stand-in here.
    worker_module: str = "mnemo.launch.worker"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / f"node{self.node_rank}.log"


def default_rdzv_id(run_dir: str) -> str:
    """A rendezvous id every node derives alike from the config's run.dir string."""
    return "mnemo-" + hashlib.sha1(run_dir.encode()).hexdigest()[:10]


def check_line_safe(key: str, value: str) -> str:
    """``value`` if it may go into a command line, a generated script or printed output; else UserError.

    Everything launch/ builds is shell-quoted (shlex.quote), which makes any
    character safe for the shell except where a line is the unit: a newline
    in ``run.dir`` or the config path would start a new line in the sbatch
    script (a command, and the end of its #SBATCH header), in a comment, or
    in the --dry-run output. Control characters have no business in a path,
    a host name or an override, so they are refused, naming ``key``.
    """
    for ch in value:
        if unicodedata.category(ch) == "Cc":
            from mnemo.data_pipeline.redact import redact_uri

            raise UserError(
                f"{key}: {brief(value, hide=redact_uri)} contains the control character {ch!r}; "
                "it cannot go into a command line or a generated script"
            )
    return value


# The most nodes of a job and ranks (or GPUs) of one node that mnemo launch takes: far above any machine or
# cluster (a node holds up to 8 or 16 GPUs), far below what a slip of the keyboard gives (10**23), which went
# into torchrun's command line and the sbatch script as it was, or was blamed on the config's memory settings.
MAX_NODES = 100_000
MAX_PROCS_PER_NODE = 1024


def check_count(flag: str, value: int | None, low: int, high: int, what: str) -> None:
    """UserError naming ``flag`` unless ``value`` (None: not given) is in [low, high]; ``what`` says what it counts."""
    if value is None:
        return
    if value < low:
        raise UserError(f"{flag} must be >= {low}, got {value}")
    if value > high:
        raise UserError(f"{flag} must be <= {high} ({what}), got {value}")


def check_node_args(nnodes: int, node_rank: int, master_port: int, max_restarts: int) -> None:
    check_count("--nnodes", nnodes, 1, MAX_NODES, "nodes of one job")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in [0, {nnodes - 1}], got {node_rank}")
    if not 1 <= master_port <= 65535:
        raise UserError(f"--master-port must be in [1, 65535], got {master_port}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")


def rdzv_endpoint(addr: str, port: int) -> str:
    """``ADDR:PORT`` as torchrun's --rdzv-endpoint takes it (an IPv6 address in brackets)."""
    host = f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
    return f"{host}:{port}"


def worker_args(plan: NodePlan) -> list[str]:
    """What each rank runs, after torchrun's own options."""
    return ["-m", plan.worker_module, plan.config, *plan.overrides]


def torchrun_command(plan: NodePlan, log_dir: str) -> list[str]:
    """The command line; ``log_dir`` holds torchrun's per-rank copies of the output (--tee needs them to
    prefix each line with its rank): never under run.dir (see local.py: torchrun_log_dir)."""
    cmd = [*python_command(plan.python), "-m", "torch.distributed.run"]
    if plan.nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += [
            "--nnodes",
            str(plan.nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint(plan.master_addr, plan.master_port),
            "--rdzv-id",
            plan.rdzv_id,
            # On one host several agents would each think they are the host;
            # say explicitly which one serves the store.
            "--rdzv-conf",
            f"is_host={'true' if plan.node_rank == 0 else 'false'}",
        ]
    cmd += [
        "--nproc-per-node",
        str(plan.nproc_per_node),
        "--max-restarts",
        str(plan.max_restarts),
        "--signals-to-handle",
        TORCHRUN_HANDLED_SIGNALS,
        "--tee",
        "3",
        "--log-dir",
        log_dir,
        "--log-line-prefix-template",
        "[rank${rank}]: ",
        *worker_args(plan),
    ]
    return cmd


def node_env(plan: NodePlan, environ: Mapping[str, str]) -> dict[str, str]:
    """Variables the node launcher adds to torchrun's environment."""
    from mnemo.launch.env import path_with_venv, pythonpath_with_root

    pythonpath = pythonpath_with_root(environ)
    return {
        "PATH": path_with_venv(environ, plan.python),
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),
        "PYTHONUNBUFFERED": "1",
        # torchrun starts each rank as `python -m mnemo.launch.worker`: without it a module of the working
        # directory named like one the rank imports (yaml.py) would run in every rank (processes.py).
        **SAFE_PATH_ENV,
        # With the rendezvous store shared with the workers (torch's default),
        # a restarted worker group reads the previous attempt's addresses and
        # fails to connect: give each attempt its own.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "MNEMO_NODE_RANK": str(plan.node_rank),
        "MNEMO_NNODES": str(plan.nnodes),
    }


def render_node(plan: NodePlan, environ: Mapping[str, str]) -> str:
    """The dry-run text of one node: a comment and the exact shell line."""
    added = node_env(plan, environ)
    for k, v in added.items():
        check_line_safe(k, v)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in added.items())
    return (
        f"# node {plan.node_rank} of {plan.nnodes}: {plan.nproc_per_node} rank(s), log {plan.log_path}\n"
        f"{env} {shlex.join(torchrun_command(plan, DRY_RUN_LOG_DIR))}\n"
    )
