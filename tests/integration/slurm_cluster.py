"""A real two-node SLURM cluster on this one host, for tests marked ``slurm``.

Debian's slurm-wlm + munge (installed by install_slurm.sh when missing), one
slurmctld and two slurmd daemons (nodes n1, n2), all state and logs under a
temporary directory. Client commands find the cluster through ``SLURM_CONF``,
which the fixture sets for the session.

Where namespace nodes can be made (netns_nodes.py: root, ip, unshare, sshd),
each slurmd runs on its own one: its network namespace (NodeAddr = that
node's address on the bridge; the job's ranks talk over the veths), a mount
namespace with its own /dev/shm and an /etc/hosts naming n1 and n2, and a UTS
namespace whose hostname is the node's name (torchrun's rank-0 agent may
publish its socket.getfqdn() as the ranks' MASTER_ADDR: the other node must
resolve it to the first node's address). slurmctld stays in the root
namespace, reached on the bridge's address. munged's unix socket is the
machine's (/run/munge): a mount namespace starts as a copy of the machine's
mounts, so every node reaches it. Elsewhere both nodes are 127.0.0.1 on their
own ports, each slurmd in a private mount namespace with its own /dev/shm;
``SlurmCluster.note`` then says why namespace nodes were not used.

Use it as a fixture: ``from slurm_cluster import slurm_cluster`` in a test
module, then a test argument ``slurm_cluster`` (a ``SlurmCluster``). Tests
skip, with the reason, when the cluster cannot be installed or started
(not root, no apt, no network for apt, ...).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.netns_nodes import INNER_IF, NetnsNodes, NetnsUnavailable

HERE = Path(__file__).resolve().parent
NODES = ("n1", "n2")
MUNGE_SOCKET_DIR = Path("/run/munge")
# Run a command in a new mount namespace with its own empty /dev/shm.
PRIVATE_SHM = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /dev/shm && exec "$@"',
    "private-shm",
]


class SlurmUnavailable(Exception):
    pass


def _run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    return r


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class SlurmCluster:
    def __init__(self, root: Path, netns: bool = False):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._started_munged = False
        # Each "node" gets its own /dev/shm (a private mount namespace): on one
        # host, mosaicml-streaming's per-node shared memory would collide.
        self.private_shm = False
        # With netns: one namespace node per SLURM node (NODES[i] on nodes.nodes[i]).
        self.want_netns = netns
        self.nodes: NetnsNodes | None = None
        self.addrs = {n: "127.0.0.1" for n in NODES}  # each node's NodeAddr
        self.controller_addr = "127.0.0.1"
        self.note = ""  # why the nodes are not namespace nodes, when they are not

    @property
    def job_env(self) -> dict[str, str]:
        """What a job's environment needs on these nodes: gloo on the node's veth (its only non-loopback interface)."""
        return {"GLOO_SOCKET_IFNAME": INNER_IF} if self.nodes else {}

    # -- set-up ------------------------------------------------------------ #

    def install(self) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the local SLURM cluster needs root")
        r = subprocess.run(["bash", str(HERE / "install_slurm.sh")], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise SlurmUnavailable(f"install_slurm.sh failed: {(r.stderr or r.stdout).strip()[-300:]}")

    def _munge_ok(self) -> bool:
        if shutil.which("munge") is None:
            return False
        r = subprocess.run("munge -n | unmunge", shell=True, capture_output=True, timeout=10)
        return r.returncode == 0

    def start_munge(self) -> None:
        if self._munge_ok():
            return
        if not Path("/etc/munge/munge.key").exists():
            _run(["runuser", "-u", "munge", "--", "mungekey", "--create"])
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        # As root munged refuses to start (insecure log file); run it as munge.
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        self._started_munged = True
        for _ in range(50):
            if self._munge_ok():
                return
            time.sleep(0.1)
        raise SlurmUnavailable("munged started but `munge -n | unmunge` fails")

    def write_conf(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_mb = int(mem_kb / 1024 * 0.8)  # RealMemory: 80% of this host's memory
        ports = [_free_port() for _ in range(3)]
        r = self.root
        # slurmctld only starts where SlurmctldHost's name is this host's: "localhost" is; the address in
        # parentheses is where slurmd, srun and scontrol on the nodes reach it.
        ctl = "localhost" if self.nodes is None else f"localhost({self.controller_addr})"
        if self.nodes is None:
            node_lines = f"NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{ports[1]},{ports[2]}]"
        else:
            node_lines = "\n".join(
                f"NodeName={n} NodeHostname={n} NodeAddr={self.addrs[n]} Port={ports[1]}" for n in NODES
            )
        self.conf.write_text(
            f"""ClusterName=mnemotest
SlurmctldHost={ctl}
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# The default (120 s) delays a requeued job's restart by two minutes.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmdParameters=config_overrides
NodeName=DEFAULT CPUs=4 RealMemory={mem_mb}
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _make_nodes(self) -> None:
        self.nodes = NetnsNodes(len(NODES), self.root / "netns").start()
        self.addrs = dict(zip(NODES, self.nodes.addrs))
        # The bridge in the root namespace holds the subnet's .1 (netns_nodes.py).
        self.controller_addr = self.nodes.addrs[0].rsplit(".", 1)[0] + ".1"
        (self.root / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addrs.items()))

    def _slurmd_cmd(self, i: int, n: str) -> list[str]:
        if self.nodes is None:
            return (PRIVATE_SHM if self.private_shm else []) + ["slurmd", "-N", n]
        # nsenter --net, not `ip netns exec`: that one mounts a fresh /sys without /sys/fs/cgroup, and
        # slurmd then refuses to start ("No filesystem mounted on /sys/fs/cgroup").
        inner = (
            f"mount -t tmpfs tmpfs /dev/shm && mount --bind {self.root / 'hosts'} /etc/hosts && hostname {n}"
            f" && exec slurmd -N {n}"
        )
        net = f"--net=/run/netns/{self.nodes.nodes[i].ns}"
        return ["nsenter", net, "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", inner]

    def start(self) -> None:
        if self.want_netns:
            try:
                self._start(netns=True)
                return
            except (SlurmUnavailable, NetnsUnavailable, subprocess.TimeoutExpired, FileNotFoundError) as e:
                self.note = f"the SLURM nodes are on 127.0.0.1, not on namespace nodes: {e}"
                self._stop_daemons()
                self._close_nodes()
        self._start(netns=False)

    def _start(self, netns: bool) -> None:
        if netns:
            self._make_nodes()
            self.private_shm = True  # each slurmd's own mount namespace, tmpfs on /dev/shm
        else:
            self.private_shm = _run(PRIVATE_SHM + ["true"], check=False).returncode == 0
        self.write_conf()
        _run(["slurmctld", "-c", "-i"], env=self.env)
        for i, n in enumerate(NODES):
            _run(self._slurmd_cmd(i, n), env=self.env)
        deadline = time.time() + 30
        while time.time() < deadline:
            r = self.cmd(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in NODES):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after 30 s: {r.stdout.strip()!r} {r.stderr.strip()!r}")

    # -- use --------------------------------------------------------------- #

    def cmd(self, args: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def job_field(self, job_id: str, name: str) -> str | None:
        r = self.cmd(["scontrol", "show", "job", "-o", job_id], check=False)
        m = re.search(rf"\b{name}=(\S*)", r.stdout)
        return m.group(1) if m else None

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s (state {state})")

    # -- tear-down --------------------------------------------------------- #

    def stop(self) -> None:
        try:
            self._stop_daemons()
        finally:
            self._close_nodes()
            if self._started_munged:
                pid = _pid_from(MUNGE_SOCKET_DIR / "munged.pid")
                if _alive(pid):
                    os.kill(pid, signal.SIGTERM)

    def _close_nodes(self) -> None:
        if self.nodes is None:
            return
        nodes, self.nodes = self.nodes, None
        self.addrs = {n: "127.0.0.1" for n in NODES}
        self.controller_addr = "127.0.0.1"
        # Kills what is left on the nodes (a slurmstepd), deletes namespaces and links; raises if any stay.
        nodes.close(check=True)

    def _stop_daemons(self) -> None:
        if shutil.which("scancel") is None or not self.conf.exists():
            return
        # Jobs first: stopping slurmd under a running job leaves a slurmstepd behind.
        self.cmd(["scancel", "--user=root"], check=False)
        deadline = time.time() + 40
        while time.time() < deadline:
            r = self.cmd(["squeue", "-h", "-o", "%i"], check=False)
            if r.returncode != 0 or not r.stdout.strip():
                break
            time.sleep(0.5)
        pids = [_pid_from(self.root / f"slurmd.{n}.pid") for n in NODES]
        pids.append(_pid_from(self.root / "slurmctld.pid"))
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        # A restart on 127.0.0.1 writes them again; a stale one must not name a reused pid.
        for f in [self.root / f"slurmd.{n}.pid" for n in NODES] + [self.root / "slurmctld.pid"]:
            f.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm_cluster(session_tmp):
    """A started two-node cluster; skips the test when SLURM cannot run here."""
    cluster = SlurmCluster(session_tmp("slurm"), netns=True)
    try:
        cluster.install()
        cluster.start_munge()
        cluster.start()
    except (SlurmUnavailable, subprocess.TimeoutExpired, FileNotFoundError) as e:
        cluster.stop()
        pytest.skip(f"no local SLURM cluster: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for mnemo launch --slurm's sbatch
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()
