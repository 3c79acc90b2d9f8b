"""N real "nodes" on this one machine: network namespaces, each with its own address, /dev/shm and sshd.

Node i is the network namespace ``mnemo-<pid>-<token>-<i>``: a veth pair
whose outer end is on a bridge ``mn<token>br`` in the root namespace (which
holds the subnet's .1, so the test process reaches every node) and whose
inner end, ``mnemo0``, holds ``10.A.B.(i+2)/24`` (a /24 no route here uses).
Its sshd runs in a private mount namespace with a tmpfs on /dev/shm (and a
UTS namespace with hostname ``node<i>``), listens on that address only, and
takes one throwaway key; its config, host key and logs live under ``root``
(the machine's ssh config is never read or changed). Clients use
``ssh_bin`` (a folder with an ``ssh`` that is the real ssh with ``-F`` this
harness's client config) on PATH.

``close()`` kills every process of every namespace (their private mounts go
with them), deletes the namespaces (their veths go with them) and the bridge,
and raises if anything named with the token is left. Namespaces of an earlier
run whose pytest process is gone (aborted, SIGKILLed) are removed at start.
``NetnsUnavailable`` says why nodes cannot be made here (not root, no
``ip``/``unshare``/sshd, namespaces refused); tests skip with it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"
INNER_IF = "mnemo0"  # the node's interface name, the same in every namespace (GLOO_SOCKET_IFNAME)
_NS = re.compile(r"^mnemo-(\d+)-([0-9a-f]{6})-\d+$")


class NetnsUnavailable(Exception):
    pass


def _ip(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return r


def _netns_list() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.strip()]


def netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in r.stdout.split()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_all(ns: str, timeout: float = 10) -> list[int]:
    """SIGKILL every process in ``ns`` until none is left; the pids still there after ``timeout``."""
    deadline = time.time() + timeout
    while True:
        pids = netns_pids(ns)
        if not pids or time.time() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _remove(token: str, namespaces: list[str]) -> None:
    for ns in namespaces:
        _kill_all(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    subprocess.run(["ip", "link", "del", f"mn{token}br"], capture_output=True, timeout=30)
    for link in _links(token):  # veths whose namespace was never made
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=30)


def _links(token: str) -> list[str]:
    r = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30)
    return [m.group(1) for m in re.finditer(rf"^\d+: (mn{token}\w*)[@:]", r.stdout, re.M)]


def reap_stale() -> None:
    """Remove namespaces (and their links) left by harness runs whose process is gone."""
    stale: dict[str, list[str]] = {}
    for ns in _netns_list():
        m = _NS.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            stale.setdefault(m.group(2), []).append(ns)
    for token, names in stale.items():
        _remove(token, names)


def _free_subnet() -> str:
    """'10.A.B' of a /24 that no address or route here overlaps."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = f"10.{secrets.randbelow(50) + 200}.{secrets.randbelow(256)}"
        if f"{net}." not in used:
            return net
    raise NetnsUnavailable("no free 10.x.y.0/24 subnet found")


@dataclass
class Node:
    index: int
    ns: str  # network namespace name
    addr: str  # its address (also its host name in hostfiles)
    outer: str  # the veth end on the bridge (down = the node is cut off)
    sshd: subprocess.Popen | None = None


class NetnsNodes:
    """``with NetnsNodes(n, root) as nodes:`` (or start()/close())."""

    def __init__(self, n: int, root: Path):
        self.n = n
        self.root = Path(root)
        self.token = secrets.token_hex(3)
        self.nodes: list[Node] = []
        self.bridge = f"mn{self.token}br"
        self.ssh_bin = self.root / "bin"
        self.key = self.root / "id_ed25519"
        self.started = False

    # ----------------------------------------------------------------- setup

    def start(self) -> NetnsNodes:
        self._check_prerequisites()
        reap_stale()
        self.started = True
        try:
            self._make_network()
            self._write_ssh_files()
            for node in self.nodes:
                self._start_sshd(node)
            for node in self.nodes:
                self._wait_ssh(node)
        except BaseException:
            self.close(check=False)
            raise
        return self

    def __enter__(self) -> NetnsNodes:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(check=exc[0] is None)

    @staticmethod
    def prerequisites_missing() -> str | None:
        """Why namespace nodes cannot be made here (root, tools, sshd), or None: a check without starting any."""
        try:
            NetnsNodes._check_prerequisites()
        except NetnsUnavailable as e:
            return str(e)
        return None

    @staticmethod
    def _check_prerequisites() -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable("namespace nodes need root (ip netns, veth, mount)")
        for tool in ("ip", "unshare", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"{tool} not found on PATH")
        if not os.access(SSHD, os.X_OK):
            raise NetnsUnavailable(f"{SSHD} missing (tests/integration/install_sshd.sh installs openssh-server)")

    def _make_network(self) -> None:
        net = _free_subnet()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{net}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            ns = f"mnemo-{os.getpid()}-{self.token}-{i}"
            node = Node(i, ns, f"{net}.{i + 2}", f"mn{self.token}h{i}")
            inner = f"mn{self.token}p{i}"
            _ip("netns", "add", ns)
            self.nodes.append(node)
            _ip("link", "add", node.outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", node.outer, "master", self.bridge)
            _ip("link", "set", node.outer, "up")
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", inner, "name", INNER_IF, ns=ns)
            _ip("addr", "add", f"{node.addr}/24", "dev", INNER_IF, ns=ns)
            _ip("link", "set", INNER_IF, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def _write_ssh_files(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for key in (self.key, self.root / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        shutil.copy(f"{self.key}.pub", self.root / "authorized_keys")
        os.chmod(self.root / "authorized_keys", 0o600)
        # Privilege separation directory that sshd insists on (created by the package's service, not by apt).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        (self.root / "ssh_config").write_text(
            "Host *\n"
            "  User root\n"
            f"  IdentityFile {self.key}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  LogLevel ERROR\n"
        )
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{n.addr} node{n.index}\n" for n in self.nodes)
        )
        self.ssh_bin.mkdir(exist_ok=True)
        ssh = self.ssh_bin / "ssh"
        ssh.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {self.root / "ssh_config"} "$@"\n')
        ssh.chmod(0o755)

    def _start_sshd(self, node: Node) -> None:
        cfg = self.root / f"sshd_{node.index}.conf"
        cfg.write_text(
            f"ListenAddress {node.addr}\n"
            "Port 22\n"
            f"HostKey {self.root / 'host_key'}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            f"PidFile {self.root / f'sshd_{node.index}.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "Subsystem sftp internal-sftp\n"
        )
        # Own mount namespace (a tmpfs /dev/shm no other node sees, an /etc/hosts naming every node, as
        # a cluster's DNS would: torchrun's agents publish their host names) and own hostname.
        hosts = self.root / "hosts"
        inner = (
            f"mount -t tmpfs tmpfs /dev/shm && mount --bind {hosts} /etc/hosts && hostname node{node.index}"
            f" && exec {SSHD} -D -e -f {cfg}"
        )
        node.sshd = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, "unshare", "--mount", "--uts", "--propagation", "private"]
            + ["sh", "-c", inner],
            stdin=subprocess.DEVNULL,
            stdout=open(self.root / f"sshd_{node.index}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ssh(self, node: Node, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if node.sshd.poll() is not None:
                log = (self.root / f"sshd_{node.index}.log").read_text()[-500:]
                raise NetnsUnavailable(f"sshd of node {node.index} exited {node.sshd.returncode}: {log}")
            try:
                socket.create_connection((node.addr, 22), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        r = self.ssh(node.index, "cat /proc/self/mountinfo | grep -c ' /dev/shm ' ; hostname", timeout=timeout)
        if r.returncode != 0 or f"node{node.index}" not in r.stdout:
            raise NetnsUnavailable(f"ssh to node {node.index} ({node.addr}) failed: {r.stderr.strip()[-300:]}")

    # ----------------------------------------------------------------- use

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    def ssh(self, i: int, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.ssh_bin / "ssh"), "-o", "BatchMode=yes", "--", self.nodes[i].addr, command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def hostfile(self, path: Path, slots: int = 1) -> Path:
        Path(path).write_text("".join(f"{a} slots={slots}\n" for a in self.addrs))
        return Path(path)

    def pids(self, i: int) -> list[int]:
        """Every process of node i (sshd included)."""
        return netns_pids(self.nodes[i].ns)

    def job_pids(self, i: int) -> list[int]:
        """Processes of node i other than its sshd listener."""
        return [p for p in self.pids(i) if p != self._listener(i)]

    def _listener(self, i: int) -> int | None:
        try:
            return int((self.root / f"sshd_{i}.pid").read_text())
        except (OSError, ValueError):
            return None

    def kill_node(self, i: int) -> int:
        """SIGKILL every process of node i (sshd too: the node is gone); the number killed."""
        pids = self.pids(i)
        left = _kill_all(self.nodes[i].ns)
        assert not left, f"node {i}: processes survive SIGKILL: {left}"
        return len(pids)

    def revive(self, i: int) -> None:
        """Start node i's sshd again after kill_node (the node rebooted, with an empty /dev/shm)."""
        self._start_sshd(self.nodes[i])
        self._wait_ssh(self.nodes[i])

    def set_link(self, i: int, up: bool) -> None:
        """Cut node i off the network (or join it again): its veth on the bridge down/up."""
        _ip("link", "set", self.nodes[i].outer, "up" if up else "down")

    # ----------------------------------------------------------------- teardown

    def close(self, check: bool = True) -> None:
        """Kill everything, delete namespaces and links; with ``check``, raise if anything is left."""
        if not self.started:
            return
        self.started = False
        _remove(self.token, [n.ns for n in self.nodes])
        for node in self.nodes:
            if node.sshd is not None:
                try:
                    node.sshd.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        left = [ns for ns in _netns_list() if self.token in ns] + _links(self.token)
        if check and left:
            raise AssertionError(f"namespace nodes not torn down: {left}")
