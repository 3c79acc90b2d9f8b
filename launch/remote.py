"""The hostfile target: one node launcher per host, over ssh.

On every selected host i (hostfile order) the orchestrator runs, over
``ssh -o BatchMode=yes``, in the same working directory (a shared file system
is assumed, as for the run directory):

    cd CWD && exec env NCCL_...=... PATH=... VENV/bin/python \
        -m mnemo launch CONFIG --nnodes N --node-rank i --master-addr HOST0 ...

(``/bin/sh -c 'exec "$@"' sh`` before a VENV path holding ``=``, which env
would read as one more variable). Every word is quoted with shlex for the
remote shell; host names are only ever one argv element locally (after
ssh's ``--``), never parsed by a shell.
Before starting anything, every host is checked with ``ssh ... true`` in
parallel (bounded by ConnectTimeout), so an unreachable host fails fast and
by name.

Secrets (``mnemo.data_pipeline.redact.is_secret_env``: MLFLOW_TRACKING_PASSWORD,
AWS_SECRET_ACCESS_KEY, a tracking URI with ``user:pass@``, ...) never go on
the ssh command line, where ``ps`` on both hosts and ``--dry-run`` would show
them. The remote launcher gets ``--env-from-stdin`` and the orchestrator
writes them as the first line of the ssh connection's stdin, one JSON object;
the launcher reads exactly that line (byte by byte, so nothing after it is
consumed), puts the values into its environment, which torchrun and the
ranks inherit, and then watches the rest of stdin for EOF as before.

Stopping: closing a node's ssh stdin makes its launcher send SIGTERM to its
workers (they save and exit). SIGINT/SIGTERM to the orchestrator closes them
all; a second SIGINT kills the ssh clients.

Elastic shrink (``run_elastic``, ``mnemo launch --min-nodes M``): when a
node is lost (its ssh ends with 255) and the job ends because of it, the
surviving nodes are probed again and the job is started anew on those that
answer, node ranks renumbered and the rendezvous on the first of them, as
long as at least M are left. The trainer resumes from the last complete
checkpoint on the smaller world size (through the universal form), and the
launcher has checked before the first start that train.global_batch_size
divides over every node count from M up, so the global batch, the step count
and the data order per slot group stay those of the full job.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

from mnemo.data_pipeline.errors import brief
from mnemo.data_pipeline.processes import python_command
from mnemo.launch.hostfile import Host, ssh_destination
from mnemo.launch.torchrun import check_line_safe
from mnemo.train.errors import UserError
from mnemo.data_pipeline.redact import SECRET_ENV_NAMES, is_secret_env

# Environment forwarded to every node: names with these prefixes, plus these
# names (the credential variables of MLflow's artifact stores among them).
FORWARD_PREFIXES = ("NCCL_", "MLFLOW_", "MNEMO_", "GLOO_", "TORCH_", "DS_", "FI_", "UCX_")
FORWARD_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX_CONNECTIONS", "HF_HOME", *sorted(SECRET_ENV_NAMES))
# Each node's ranks choose their own accelerator from train.device and their hardware (train/rankenv.py):
# a launching host's DS_ACCELERATOR=cpu would put the model on the CPU on GPU nodes whose trainer uses CUDA.
NOT_FORWARDED = ("DS_ACCELERATOR",)
ENV_FROM_STDIN = "--env-from-stdin"
_MAX_SECRET_LINE = 1 << 20  # bytes: far more than any set of credentials
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # fullmatch: "$" would let "NAME\n" pass

CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S = "MNEMO_SSH_CONNECT_TIMEOUT", 10
# A node cut off the network sends nothing, not even a TCP reset: without keepalives its ssh client
# would wait forever and the orchestrator with it. With them, ssh exits 255 after about 3 x 5 s.
ALIVE_INTERVAL_S, ALIVE_COUNT = 5, 3
SSH_LOST = 255  # ssh's own exit code: the connection failed or was lost (a node vanished or was cut off)


def connect_timeout_s() -> int:
    """ssh's ConnectTimeout: MNEMO_SSH_CONNECT_TIMEOUT (whole seconds >= 1) or 10; UserError naming it if malformed."""
    raw = os.environ.get(CONNECT_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_CONNECT_TIMEOUT_S
    # ASCII digits only: int() would also take ' 10', '+10', '1_0' and other scripts' digits.
    if not re.fullmatch(r"[0-9]{1,6}", raw) or int(raw) < 1:
        raise UserError(f"{CONNECT_TIMEOUT_ENV}: {brief(raw, 40)} is not a whole number of seconds >= 1")
    return int(raw)


def ssh_options() -> list[str]:
    return [
        "-o",
        "BatchMode=yes",
        "-o",
        f"ConnectTimeout={connect_timeout_s()}",
        "-o",
        f"ServerAliveInterval={ALIVE_INTERVAL_S}",
        "-o",
        f"ServerAliveCountMax={ALIVE_COUNT}",
    ]


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher's variables every node gets (sorted for stable output)."""
    out = {
        k: v
        for k, v in environ.items()
        if _ENV_NAME.fullmatch(k) and (k.startswith(FORWARD_PREFIXES) or k in FORWARD_NAMES) and k not in NOT_FORWARDED
    }
    return dict(sorted(out.items()))


def split_secret_env(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(variables for the command line, secrets for the stdin channel)."""
    public, secret = {}, {}
    for k, v in env.items():
        (secret if is_secret_env(k, v) else public)[k] = v
    return public, secret


@dataclass
class NodeCommand:
    host: str  # as the hostfile names it (messages); ssh gets ssh_destination(host)
    node_rank: int
    remote: str  # the command string the remote shell runs
    secrets: Mapping[str, str] | None = None  # sent on stdin, never in argv

    def ssh_argv(self, ssh: str = "ssh") -> list[str]:
        # "--" ends ssh's options, so a host name is never read as one.
        return [ssh, *ssh_options(), "--", ssh_destination(self.host), self.remote]

    def stdin_line(self) -> bytes:
        """What the remote launcher reads first when it runs with --env-from-stdin."""
        return (json.dumps(dict(self.secrets or {})) + "\n").encode()


def read_env_line(fd: int, timeout: float = 120.0) -> dict[str, str]:
    """Read the secrets line the orchestrator writes (``NodeCommand.stdin_line``) from ``fd``.

    One byte at a time: the rest of stdin belongs to --stop-on-stdin-eof,
    and a buffered read would swallow the EOF it waits for.
    """
    buf = bytearray()
    with selectors.DefaultSelector() as sel:  # not select(): it refuses descriptors >= 1024
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            if not sel.select(timeout):
                raise UserError(f"{ENV_FROM_STDIN}: no environment line on stdin within {timeout:.0f} s")
            b = os.read(fd, 1)
            if not b:
                raise UserError(f"{ENV_FROM_STDIN}: stdin closed before the environment line ended")
            buf += b
            if len(buf) > _MAX_SECRET_LINE:
                raise UserError(f"{ENV_FROM_STDIN}: environment line longer than {_MAX_SECRET_LINE} bytes")
    try:
        env = json.loads(buf)
    except ValueError:
        env = None
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and _ENV_NAME.fullmatch(k) and isinstance(v, str) for k, v in env.items()
    ):
        raise UserError(f"{ENV_FROM_STDIN}: stdin did not start with a JSON object of variable names to strings")
    return env


def remote_command(
    *,
    cwd: str,
    python: str,
    env: Mapping[str, str],
    launch_args: list[str],
) -> str:
    """The shell string one node runs; ``launch_args`` follow ``-m mnemo launch``.

    ``env`` is set literally (PATH included: the launcher's, see
    ``launch.env.path_with_venv``); everything else comes from the remote login.
    ``env``, not shell assignments, sets it: the login shell may be csh or fish.
    Every word is checked for control characters and shell-quoted.
    """
    for k, v in env.items():
        if not _ENV_NAME.fullmatch(k):
            raise UserError(f"environment variable name {brief(k)} cannot be forwarded")
        check_line_safe(k, v)
    for key, v in (("working directory", cwd), ("python", python), *(("argument", a) for a in launch_args)):
        check_line_safe(key, v)
    words = ["exec", "env"]
    words += [f"{k}={shlex.quote(v)}" for k, v in env.items()]
    if "=" in python:
        # env takes every word holding '=' as an assignment, '--' or not: a python under '/v=1/' would be
        # set as a variable and '-m' run as the command. /bin/sh runs it instead, as its "$1".
        words += ["/bin/sh", "-c", shlex.quote('exec "$@"'), "sh"]
    # -P: the remote shell starts in ``cwd``, whose modules must not shadow what mnemo imports.
    words += [shlex.quote(w) for w in [*python_command(python), "-m", "mnemo", "launch", *launch_args]]
    return f"cd {shlex.quote(cwd)} && " + " ".join(words)


def node_commands(
    hosts: list[Host],
    *,
    config: str,
    overrides: list[str],
    nproc_per_node: int,
    master_addr: str,
    master_port: int,
    rdzv_id: str,
    max_restarts: int,
    cwd: str,
    python: str,
    env: Mapping[str, str],
) -> list[NodeCommand]:
    public_env, secrets = split_secret_env(env)
    cmds = []
    for i, h in enumerate(hosts):
        args = [
            config,
            *overrides,
            "--nnodes",
            str(len(hosts)),
            "--node-rank",
            str(i),
            "--nproc-per-node",
            str(nproc_per_node),
            "--master-addr",
            master_addr,
            "--master-port",
            str(master_port),
            "--rdzv-id",
            rdzv_id,
            "--max-restarts",
            str(max_restarts),
            "--stop-on-stdin-eof",
            *([ENV_FROM_STDIN] if secrets else []),
        ]
        cmds.append(
            NodeCommand(
                h.name, i, remote_command(cwd=cwd, python=python, env=public_env, launch_args=args), secrets=secrets
            )
        )
    return cmds


def render(cmds: list[NodeCommand], ssh: str = "ssh") -> str:
    out = []
    for c in cmds:
        out.append(f"# node {c.node_rank}: {c.host}")
        if c.secrets:
            out.append(f"# sent on the connection's stdin, not shown: {', '.join(sorted(c.secrets))}")
        out.append(shlex.join(c.ssh_argv(ssh)))
    return "\n".join(out) + "\n"


def find_ssh() -> str:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise UserError("ssh not found on PATH: the hostfile target starts one launcher per host over ssh")
    return ssh


# What each host's probe prints: its kernel's boot id and the device:inode of its /dev/shm. Two host
# names printing the same line are one machine with one /dev/shm, where the nodes' mosaicml-streaming
# leaders would create the same shared memory (FileExistsError: '/000023_locals'). A
# machine without these files prints nothing usable, and is not checked. sshd hands the command to the
# login shell (`$SHELL -c CMD`), which may be csh or fish (see remote_command): /bin/sh runs the probe,
# the login shell only parses one single-quoted word (csh took `$(` for an "Illegal variable name").
_IDENTITY = "sh -c " + shlex.quote(
    "echo mnemo-machine:$(cat /proc/sys/kernel/random/boot_id 2>/dev/null):$(stat -Lc %d:%i /dev/shm 2>/dev/null)"
)
_IDENTITY_LINE = re.compile(r"^mnemo-machine:([0-9a-f-]{8,}):(\d+:\d+)$", re.M)


def _probe(ssh: str, host: str) -> tuple[str | None, str | None]:
    """(None, machine identity or None) if ``ssh host`` works, else (ssh's last error line, None)."""
    wait_s = connect_timeout_s() + 5
    try:
        r = subprocess.run(
            [ssh, *ssh_options(), "--", ssh_destination(host), _IDENTITY],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=wait_s,
        )
    except subprocess.TimeoutExpired:
        return f"no answer within {wait_s} s", None
    if r.returncode == 0:
        m = _IDENTITY_LINE.search(r.stdout)
        return None, m.group(0) if m else None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else f"ssh exited with code {r.returncode}"), None


def _probe_all(hosts: list[Host], ssh: str) -> list[tuple[str | None, str | None]]:
    """``_probe`` of every host, in parallel (each may wait out ssh's connect timeout), in the hosts' order."""
    connect_timeout_s()  # a malformed MNEMO_SSH_CONNECT_TIMEOUT: one error, before any probe
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as pool:
        return list(pool.map(lambda h: _probe(ssh, h.name), hosts))


def check_reachable(hosts: list[Host], ssh: str) -> None:
    """Raise UserError naming the first unreachable host (all probed in parallel), or two names of one machine."""
    probes = _probe_all(hosts, ssh)
    for h, (err, _) in zip(hosts, probes):
        if err is not None:
            raise UserError(f"host {brief(h.name)} (hostfile line {h.line}) is unreachable over ssh: {err}")
    seen: dict[str, Host] = {}
    for h, (_, machine) in zip(hosts, probes):
        if machine is not None and machine in seen:
            first = seen[machine]
            raise UserError(
                f"hosts {brief(first.name)} (hostfile line {first.line}) and {brief(h.name)} (line {h.line}) are one "
                "machine sharing one /dev/shm, where the nodes' data loaders would collide: list it once with slots=N"
            )
        if machine is not None:
            seen[machine] = h


class _Orchestrator:
    def __init__(self, cmds: list[NodeCommand], ssh: str):
        self.cmds = cmds
        self.ssh = ssh
        self.procs: list[subprocess.Popen] = []
        self.interrupts = 0
        self.reported: set[int] = set()  # node ranks whose end is already printed
        self.lost: list[int] = []  # node ranks whose ssh ended with SSH_LOST, once run() returns

    def _report(self, c: NodeCommand, rc: int) -> None:
        """One line per failed node: a lost node (ssh 255) as soon as it is seen, the others at the end."""
        self.reported.add(c.node_rank)
        if rc == SSH_LOST:
            msg = (
                f"lost node {c.node_rank} ({c.host}): its ssh connection ended without an exit status "
                f"(code {rc}: the node died, rebooted or was cut off)"
            )
        else:
            msg = f"node {c.node_rank} ({c.host}) exited with code {rc}"
        _say(msg)

    def _stop_all(self) -> None:
        for p in self.procs:
            if p.stdin is not None and not p.stdin.closed:
                try:
                    p.stdin.close()  # remote launcher sees EOF -> SIGTERM to its workers
                except OSError:
                    pass

    def _on_signal(self, signum: int, frame) -> None:
        self.interrupts += 1
        if signum == signal.SIGINT and self.interrupts > 1:
            for p in self.procs:
                p.kill()
        else:
            self._stop_all()

    def run(self) -> int:
        for c in self.cmds:
            p = subprocess.Popen(
                c.ssh_argv(self.ssh),
                stdin=subprocess.PIPE,  # held open; closing it stops that node
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.procs.append(p)
            if c.secrets:
                try:
                    p.stdin.write(c.stdin_line())
                    p.stdin.flush()
                except OSError:
                    pass  # ssh already gone: its exit code reports it
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._pump()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        rcs = [p.wait() for p in self.procs]
        self.lost = [c.node_rank for c, rc in zip(self.cmds, rcs) if rc == SSH_LOST]
        failed = [(c, rc) for c, rc in zip(self.cmds, rcs) if rc != 0]
        # Lost nodes first: their loss is what ended the others.
        for c, rc in sorted(failed, key=lambda f: f[1] != SSH_LOST):
            if c.node_rank not in self.reported:
                self._report(c, rc)
        return failed[0][1] if failed else 0

    def _pump(self) -> None:
        fds = {p.stdout.fileno(): (c, p) for c, p in zip(self.cmds, self.procs)}
        bufs = {fd: b"" for fd in fds}
        # A selector (epoll), not select(): select() refuses descriptors >= 1024, which a launcher
        # started by a long-lived process holding many files can get.
        sel = selectors.DefaultSelector()
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        try:
            self._pump_from(sel, fds, bufs)
        finally:
            sel.close()

    def _pump_from(self, sel: selectors.BaseSelector, fds: dict, bufs: dict[int, bytes]) -> None:
        while fds:
            ready = [key.fd for key, _ in sel.select(0.5)]
            for fd in ready:
                c, _ = fds[fd]
                data = os.read(fd, 65536)
                if not data:
                    if bufs[fd]:
                        self._print(c, bufs[fd])
                    sel.unregister(fd)
                    del fds[fd]
                    continue
                bufs[fd] += data
                *lines, bufs[fd] = bufs[fd].split(b"\n")
                for line in lines:
                    self._print(c, line)
            for c, p in zip(self.cmds, self.procs):
                if p.poll() == SSH_LOST and c.node_rank not in self.reported:
                    self._report(c, SSH_LOST)  # said now: the survivors may take a collective timeout to end
            # One node failing ends the job on the others too (they would
            # otherwise wait for the rendezvous timeout).
            if any(p.poll() not in (None, 0) for p in self.procs):
                self._stop_all()

    @staticmethod
    def _print(c: NodeCommand, line: bytes) -> None:
        try:
            sys.stdout.write(f"{c.host}: {line.decode(errors='replace').rstrip(chr(13))}\n")
            sys.stdout.flush()
        except OSError:
            pass


def run_hostfile(cmds: list[NodeCommand], ssh: str) -> int:
    return _Orchestrator(cmds, ssh).run()


def run_elastic(
    hosts: list[Host], commands: Callable[[list[Host]], list[NodeCommand]], ssh: str, min_nodes: int
) -> int:
    """Run the job on ``hosts``; after each loss of nodes go on with the survivors while >= ``min_nodes`` answer.

    ``commands(hosts)`` builds the node commands for a host list (node ranks,
    rendezvous address and node count follow the list). Only a lost node
    (ssh 255: killed, rebooted, cut off) shrinks the job; a node whose
    training failed, or an interrupt of the orchestrator, ends it as before.
    """
    attempt = 0
    while True:
        orch = _Orchestrator(commands(hosts), ssh)
        rc = orch.run()
        if rc == 0 or orch.interrupts or not orch.lost:
            return rc
        gone = [hosts[i] for i in orch.lost]
        left = [h for i, h in enumerate(hosts) if i not in orch.lost]
        probes = _probe_all(left, ssh)
        for h, (err, _) in zip(left, probes):
            if err is not None:
                gone.append(h)
                _say(f"node {brief(h.name)} (hostfile line {h.line}) no longer answers over ssh: {err}")
        left = [h for h, (err, _) in zip(left, probes) if err is None]
        names = ", ".join(repr(h.name) for h in gone)
        if len(left) < min_nodes:
            _say(f"{len(left)} node(s) left after losing {names}, fewer than --min-nodes {min_nodes}: the job ends")
            return rc
        attempt += 1
        _say(
            f"elastic shrink {attempt}: continuing on {len(left)} node(s) without {names}; training resumes "
            "from the last complete checkpoint with the same global batch"
        )
        hosts = left


def _say(msg: str) -> None:
    print(f"mnemo launch: {msg}", file=sys.stderr, flush=True)
