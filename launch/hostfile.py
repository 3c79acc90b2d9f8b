"""DeepSpeed-format hostfiles: one ``host slots=N`` per line.

    # comment lines and blank lines are ignored
    worker-0 slots=8
    worker-1 slots=8   # trailing comments too

Host names are kept verbatim (they are only ever passed as one argv element,
after ssh's ``--``, or shell-quoted), and must look like one: an optional
``user@``, then letters, digits, ``.``, ``-``, ``_``, or an IPv6 address,
bare or in brackets; not starting with ``-``. ssh substitutes the name into
``ProxyCommand``/``Match exec`` lines of the user's ssh_config, which a shell
runs, so a name holding ``$(...)``, quotes or ``;`` is refused rather than
quoted. ssh takes neither brackets nor a port in a host name: it is given the
bare address (``ssh_destination``), and ``HOST:PORT`` is refused (the ssh
port belongs in ~/.ssh/config); the rendezvous endpoint puts an IPv6
address back in brackets (``launch.torchrun``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from mnemo.data_pipeline.errors import brief, clip
from mnemo.data_pipeline.files import NotRegularFile, read_bounded
from mnemo.launch.torchrun import MAX_PROCS_PER_NODE
from mnemo.train.errors import UserError

# The most bytes a hostfile may have: some 20 per host line, so over 50,000 hosts (a bigger file is not one).
MAX_HOSTFILE_BYTES = 1 << 20

# The longest host name (RFC 1035's 253 characters); a "user@" in front is not counted.
MAX_HOST_NAME = 253
# Used with fullmatch: a pattern ending in "$" would also match before a final newline.
_LINE = re.compile(r"(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\S+)")
# ASCII digits only: str.isdigit also takes '²' (int() then fails) and '٨' (int() reads 8); and few enough
# that int() reads them (it refuses over 4300 digits).
_SLOTS = re.compile(r"[0-9]{1,9}")
_HOST = re.compile(r"([A-Za-z0-9_][A-Za-z0-9._\-]*@)?[A-Za-z0-9_.:\[\]][A-Za-z0-9_.:\[\]\-]*")
# A name and a port: "node-a:2222", "[fe80::1]:22" (an IPv6 address has at least two colons).
_HOST_PORT = re.compile(r"(\[[^\[\]]*\]|[^:\[\]]+):[0-9]*")


def check_host_name(host: str, where: str) -> str:
    """``host`` if ssh may be given it; else UserError naming ``where`` (file:line or flag)."""
    if host.startswith("-"):
        raise UserError(f"{where}: host name {brief(host)} starts with '-' (ssh would read it as an option)")
    addr = host.rpartition("@")[2]  # without the user@
    if len(addr) > MAX_HOST_NAME:  # and an error line of its length (a 1 MiB hostfile line)
        raise UserError(
            f"{where}: host name {brief(host)} is longer than {MAX_HOST_NAME} characters (a DNS name's most)"
        )
    if not _HOST.fullmatch(host):
        raise UserError(
            f"{where}: host name {brief(host)} is not a host name (letters, digits, '.', '-', '_', an IPv6 address "
            "and an optional 'user@' only)"
        )
    if _HOST_PORT.fullmatch(addr):
        raise UserError(
            f"{where}: host name {brief(host)} holds a port, which ssh does not take from a host name: set the ssh "
            "port in ~/.ssh/config ('Host NAME' then 'Port N'); the rendezvous port is --master-port"
        )
    bare = address_of(host)
    bracketed = bare != addr
    if "[" in bare or "]" in bare or ((bracketed or ":" in bare) and not _is_ipv6(bare)):
        raise UserError(
            f"{where}: host name {brief(host)} is not a host name: ':' and brackets belong to an IPv6 address "
            "only ('fe80::1' or '[fe80::1]')"
        )
    return host


def _is_ipv6(addr: str) -> bool:
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return True


def address_of(host: str) -> str:
    """The network address of a hostfile name: ``user@node-0`` -> ``node-0``, ``[fe80::1]`` -> ``fe80::1``."""
    addr = host.rpartition("@")[2]
    return addr[1:-1] if addr.startswith("[") and addr.endswith("]") else addr


def ssh_destination(host: str) -> str:
    """What ssh is given for a hostfile name: ``user@`` kept, an IPv6 address without brackets (ssh wants it bare)."""
    user, at, _ = host.rpartition("@")
    return f"{user}{at}{address_of(host)}"


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int  # 1-based line number in the hostfile, for error messages


def parse_hostfile(path: str | Path) -> list[Host]:
    """Parse a hostfile; raise UserError naming the file and line at fault."""
    p = Path(path)
    shown = clip(str(p), 200)  # a path of thousands of characters is cut in every line naming it, as config errors cut
    try:
        # read_bounded: a device (/dev/zero) or FIFO is refused before any open (it would fill memory or
        # wait forever), and a regular file over the bound is not read whole.
        raw = read_bounded(p, MAX_HOSTFILE_BYTES)
        # utf-8-sig: a byte order mark (Notepad and other editors write one) is not part of the first name.
        # Bytes decoded as they are: a lone CR stays in its line (the docs: lines end at LF or CRLF, nothing
        # else), not the universal-newline translation that made "a # spare\rb" two hosts.
        text = raw.decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"hostfile not found: {shown}") from None
    except NotRegularFile as e:
        raise UserError(f"hostfile {shown}: {e}") from None
    except OSError as e:  # its str() holds the whole path again
        raise UserError(f"hostfile {shown}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"hostfile {shown}: cannot read ({e})") from None
    return parse_hostfile_text(text, shown)


def parse_hostfile_text(text: str, name: str = "hostfile") -> list[Host]:
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    # "\n" only: splitlines() also splits at U+0085, U+2028, form feed, ..., which no editor shows as a
    # line break (wrong line numbers, and the rest of a comment read as a host).
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw.removesuffix("\r")
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise UserError(f"{name}:{lineno}: malformed line {brief(raw.strip())} (expected 'HOST slots=N')")
        host, slots_s = m.group("host"), m.group("slots")
        if not _SLOTS.fullmatch(slots_s) or int(slots_s) < 1:
            raise UserError(f"{name}:{lineno}: slots must be a positive integer, got {brief(slots_s, 40)}")
        if int(slots_s) > MAX_PROCS_PER_NODE:  # the ranks a host starts when --nproc-per-node is not given
            raise UserError(
                f"{name}:{lineno}: slots must be <= {MAX_PROCS_PER_NODE} (ranks on one machine), got {slots_s}"
            )
        check_host_name(host, f"{name}:{lineno}")
        if host in seen:
            raise UserError(f"{name}:{lineno}: host {brief(host)} already listed on line {seen[host]}")
        seen[host] = lineno
        hosts.append(Host(host, int(slots_s), lineno))
    if not hosts:
        raise UserError(f"{name}: no hosts listed")
    return hosts


def _split_names(flag: str, spec: str | None) -> list[str]:
    """The host names of ``--include``/``--exclude`` (None: not given); an empty name is an error.

    Dropping empty names would turn ``--include ,,`` into no filter at all: every host.
    """
    if spec is None:
        return []
    names = [h.strip() for h in spec.split(",")]
    if "" in names:
        raise UserError(f"{flag}: {brief(spec, 60)} has an empty host name (expected comma-separated hostfile names)")
    return names


def select_hosts(hosts: list[Host], include: str | None, exclude: str | None) -> list[Host]:
    """Apply ``--include`` / ``--exclude`` (comma-separated host names), keeping hostfile order."""
    if include is not None and exclude is not None:
        raise UserError("--include and --exclude are mutually exclusive")
    known = {h.name for h in hosts}
    inc, exc = _split_names("--include", include), _split_names("--exclude", exclude)
    for flag, names in (("--include", inc), ("--exclude", exc)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UserError(f"{flag}: host {brief(unknown[0])} is not in the hostfile")
    if include is not None:
        chosen = [h for h in hosts if h.name in inc]
    else:
        chosen = [h for h in hosts if h.name not in exc]
    if not chosen:
        raise UserError("no hosts left after --include/--exclude")
    return chosen


def procs_per_node(hosts: list[Host], nproc_per_node: int | None) -> int:
    """Processes started on every node: --nproc-per-node, or the smallest slot count.

    torchrun needs the same count on each node, so unequal slots use the
    smallest; asking for more than a host has is an error naming the host.
    """
    if nproc_per_node is None:
        return min(h.slots for h in hosts)
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    for h in hosts:
        if nproc_per_node > h.slots:
            raise UserError(
                f"--nproc-per-node {nproc_per_node} is more than the {h.slots} slot(s) of host {brief(h.name)} "
                f"(hostfile line {h.line})"
            )
    return nproc_per_node
