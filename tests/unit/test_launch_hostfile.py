"""Hostfile parsing and host selection (launch/hostfile.py)."""

from __future__ import annotations

import pytest

from mnemo.launch.hostfile import (
    Host,
    address_of,
    parse_hostfile,
    parse_hostfile_text,
    procs_per_node,
    select_hosts,
    ssh_destination,
)
from mnemo.train.errors import UserError

GOOD = """\
# a comment
worker-0 slots=8

worker-1   slots = 4   # trailing comment
10.0.0.7 slots=2
"""


def test_parses_hosts_slots_and_line_numbers():
    hosts = parse_hostfile_text(GOOD, "hf")
    assert hosts == [Host("worker-0", 8, 2), Host("worker-1", 4, 4), Host("10.0.0.7", 2, 5)]


@pytest.mark.parametrize(
    "text, line, what",
    [
        ("a slots=1\nb\n", 2, "malformed"),
        ("a slots=1\n\n# x\nb slots=1 extra\n", 4, "malformed"),
        ("a slot=1\n", 1, "malformed"),
        ("a slots=0\n", 1, "positive integer"),
        ("a slots=two\n", 1, "positive integer"),
        ("a slots=-1\n", 1, "positive integer"),
        # str.isdigit accepts these, int() does not (or reads them as 8): a traceback before
        ("a slots=1\nb slots=\u00b2\n", 2, "positive integer, got '\u00b2'"),
        ("a slots=\u2468\n", 1, "positive integer"),
        ("a slots=\u0668\n", 1, "positive integer"),
        ("a slots=+8\n", 1, "positive integer"),
        ("a slots=" + "9" * 5000 + "\n", 1, "positive integer"),
        ("a slots=1\na slots=2\n", 2, "already listed on line 1"),
        ("-oProxyCommand=x slots=1\n", 1, "starts with '-'"),
    ],
)
def test_bad_lines_name_the_line(text, line, what):
    with pytest.raises(UserError) as e:
        parse_hostfile_text(text, "hosts.txt")
    assert f"hosts.txt:{line}:" in str(e.value)
    assert what in str(e.value)


def test_empty_and_missing_hostfile(tmp_path):
    with pytest.raises(UserError, match="no hosts listed"):
        parse_hostfile_text("# nothing\n\n", "hf")
    with pytest.raises(UserError, match="hostfile not found: .*nope"):
        parse_hostfile(tmp_path / "nope")


@pytest.mark.parametrize("name", ["node$(touch${IFS}pwned)", "`id`", "a;b", "a|b", "a'b", 'a"b', "a\\b", "a%h"])
def test_shell_metacharacters_in_host_names_are_refused(name):
    # ssh puts the name into ProxyCommand/Match exec lines a shell runs: refused, not quoted.
    with pytest.raises(UserError, match=r"hf:2: host name .* is not a host name"):
        parse_hostfile_text(f"ok slots=1\n{name} slots=2\n", "hf")


def test_hostfile_saved_with_a_bom(tmp_path):
    # Was: "hf:1: host name '\ufeffnode-a' is not a host name" (Notepad and other editors write one).
    hf = tmp_path / "hf"
    hf.write_bytes(b"\xef\xbb\xbfnode-a slots=1\r\nnode-b slots=2\r\n")
    assert parse_hostfile(hf) == [Host("node-a", 1, 1), Host("node-b", 2, 2)]


@pytest.mark.parametrize("sep", ["\x85", "\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"])
def test_only_a_newline_ends_a_hostfile_line(sep):
    # Was: str.splitlines() also split at these: the rest of a comment became a host, and line numbers shifted.
    text = f"# spare{sep}node-x slots=1\nnode-a slots=1\r\nnode-b slots=2\n"
    assert parse_hostfile_text(text, "hf") == [Host("node-a", 1, 2), Host("node-b", 2, 3)]
    with pytest.raises(UserError, match=r"^hf:2: "):
        parse_hostfile_text(f"node-a slots=1\nnode-b{sep}node-c slots=1\n", "hf")


def test_a_lone_carriage_return_does_not_end_a_hostfile_line(tmp_path):
    # Was: read_text's universal newlines made "# spare\rnode-b" two lines, node-b a host (docs: LF or CRLF).
    hf = tmp_path / "hf"
    hf.write_bytes(b"node-a slots=1 # spare\rnode-b slots=1\r\nnode-c slots=2\n")
    assert parse_hostfile(hf) == [Host("node-a", 1, 1), Host("node-c", 2, 2)]
    hf.write_bytes(b"node-a slots=1\rnode-b slots=1\n")
    with pytest.raises(UserError, match=r"hf:1: malformed line"):
        parse_hostfile(hf)


def test_ordinary_host_names_are_kept_verbatim():
    names = ["worker-0", "node_1.cluster.local", "alice@gpu-3", "10.0.0.7", "[fe80::1]", "fe80::2"]
    hosts = parse_hostfile_text("".join(f"{n} slots=1\n" for n in names), "hf")
    assert [h.name for h in hosts] == names


@pytest.mark.parametrize(
    "name, ssh, address",
    [
        ("[::1]", "::1", "::1"),
        ("alice@[fe80::1]", "alice@fe80::1", "fe80::1"),
        ("fe80::2", "fe80::2", "fe80::2"),
        ("bob@node-a", "bob@node-a", "node-a"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1", "::ffff:10.0.0.1"),
    ],
)
def test_ssh_gets_ipv6_addresses_without_brackets(name, ssh, address):
    # Was: ssh -- '[::1]', which ssh cannot resolve (it takes brackets only in ssh:// URIs).
    assert ssh_destination(name) == ssh
    assert address_of(name) == address


@pytest.mark.parametrize("name", ["node-a:2222", "alice@node-a:22", "10.0.0.7:22", "[fe80::1]:22", "node-a:"])
def test_host_and_port_is_refused_with_how_to_set_the_port(name):
    # Was accepted, then unusable by ssh ("Could not resolve hostname node-a:2222").
    with pytest.raises(UserError) as e:
        parse_hostfile_text(f"ok slots=1\n{name} slots=1\n", "hf")
    assert str(e.value) == (
        f"hf:2: host name {name!r} holds a port, which ssh does not take from a host name: set the ssh port "
        "in ~/.ssh/config ('Host NAME' then 'Port N'); the rendezvous port is --master-port"
    )


@pytest.mark.parametrize("name", ["[node-a]", "[::1", "::1]", "a[b]", "[]", "a:b:c", "[[::1]]", "1:2:3:4:5:6:7:8:9"])
def test_colons_and_brackets_outside_an_ipv6_address_are_refused(name):
    with pytest.raises(UserError, match=r"^hf:1: host name .* is not a host name"):
        parse_hostfile_text(f"{name} slots=1\n", "hf")


def test_include_exclude():
    hosts = parse_hostfile_text(GOOD)
    assert [h.name for h in select_hosts(hosts, "10.0.0.7,worker-0", None)] == ["worker-0", "10.0.0.7"]
    assert [h.name for h in select_hosts(hosts, None, "worker-1")] == ["worker-0", "10.0.0.7"]
    assert select_hosts(hosts, None, None) == hosts
    with pytest.raises(UserError, match="--include: host 'nope' is not in the hostfile"):
        select_hosts(hosts, "worker-0,nope", None)
    with pytest.raises(UserError, match="--exclude: host 'x'"):
        select_hosts(hosts, None, "x")
    with pytest.raises(UserError, match="mutually exclusive"):
        select_hosts(hosts, "worker-0", "worker-1")
    with pytest.raises(UserError, match="no hosts left"):
        select_hosts(hosts, None, "worker-0,worker-1,10.0.0.7")


@pytest.mark.parametrize("spec", [",,", "", " ", "worker-0,", ",worker-0", "worker-0,,worker-1", "worker-0, ,10.0.0.7"])
@pytest.mark.parametrize("flag", ["--include", "--exclude"])
def test_empty_host_name_in_include_exclude_is_an_error(flag, spec):
    # ',,' used to select nothing to filter, hence every host; 'worker-0,' dropped the empty name.
    hosts = parse_hostfile_text(GOOD)
    args = (spec, None) if flag == "--include" else (None, spec)
    with pytest.raises(UserError, match=f"^{flag}: {spec!r} has an empty host name"):
        select_hosts(hosts, *args)


def test_procs_per_node_respects_slots():
    hosts = parse_hostfile_text(GOOD)
    assert procs_per_node(hosts, None) == 2  # the smallest slot count
    assert procs_per_node(hosts, 2) == 2
    with pytest.raises(UserError) as e:
        procs_per_node(hosts, 3)
    assert "more than the 2 slot(s) of host '10.0.0.7' (hostfile line 5)" in str(e.value)


def test_unicode_digit_slots_is_one_line_error_from_the_cli(tmp_path, capsys, monkeypatch):
    from mnemo.cli import main
    from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir

    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"run:\n  dir: runs/g\ndata:\n  path: {data}\n")
    (tmp_path / "hosts").write_text("w0 slots=\u00b2\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "c.yaml", "--hostfile", "hosts", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err == "mnemo: error: hosts:1: slots must be a positive integer, got '\u00b2'\n"


@pytest.mark.parametrize("value", ["abc", "\u00b2", "0", "-5", "10\n"])
def test_bad_ssh_connect_timeout_is_one_line_error(monkeypatch, value):
    from mnemo.launch import remote

    monkeypatch.setenv("MNEMO_SSH_CONNECT_TIMEOUT", value)
    with pytest.raises(UserError, match=r"^MNEMO_SSH_CONNECT_TIMEOUT: .* is not a whole number of seconds >= 1"):
        remote.ssh_options()


def test_ssh_connect_timeout_from_environment(monkeypatch):
    from mnemo.launch import remote

    monkeypatch.setenv("MNEMO_SSH_CONNECT_TIMEOUT", "3")
    assert "ConnectTimeout=3" in remote.ssh_options()
    monkeypatch.delenv("MNEMO_SSH_CONNECT_TIMEOUT")
    assert "ConnectTimeout=10" in remote.ssh_options()


@pytest.mark.timeout(20)  # the old code waited for ever on the FIFO
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_hostfile_that_is_no_regular_file_is_refused_unopened(tmp_path, kind):
    # Was: open().read() of /dev/zero filled memory (an OOM kill), of a FIFO or /dev/urandom never returned.
    # /dev/null here: the old code read it as empty ("no hosts listed"), where /dev/zero would fill memory.
    import os

    if kind == "fifo":
        path = tmp_path / "hf"
        os.mkfifo(path)  # no writer: an open() of it would block this test for ever
        what = "a FIFO (named pipe), not a regular file"
    elif kind == "device":
        path, what = "/dev/null", "a character device, not a regular file"
    else:
        path, what = tmp_path, "a directory, not a file"
    with pytest.raises(UserError) as e:
        parse_hostfile(path)
    assert str(e.value) == f"hostfile {path}: {what}"


def test_a_huge_hostfile_is_not_read_whole(tmp_path):
    from mnemo.launch.hostfile import MAX_HOSTFILE_BYTES

    hf = tmp_path / "hf"
    with open(hf, "wb") as f:
        f.truncate(MAX_HOSTFILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UserError, match=r"^hostfile .*hf: 1,048,577 bytes, over the 1,048,576-byte bound"):
        parse_hostfile(hf)


def test_slots_above_the_ranks_of_one_machine_are_refused():
    # Was: 'a slots=999999999' started 999999999 ranks per host without --nproc-per-node.
    assert parse_hostfile_text("a slots=1024\n", "hf") == [Host("a", 1024, 1)]
    with pytest.raises(UserError) as e:
        parse_hostfile_text("a slots=8\nb slots=999999999\n", "hf")
    assert str(e.value) == "hf:2: slots must be <= 1024 (ranks on one machine), got 999999999"


def test_a_long_line_or_host_name_is_a_short_error():
    # A 1 MiB line was quoted whole in the "one-line" error (1,000,064 characters; 4.2 MB for NUL bytes),
    # and a 500,000-character host name was taken into ssh's command line.
    for text in ("x" * 1_000_000 + "\n", "\0" * 300_000 + "\n"):
        with pytest.raises(UserError, match=r"hf:1: malformed line") as e:
            parse_hostfile_text(text, "hf")
        assert len(str(e.value)) < 300
    with pytest.raises(UserError, match=r"hf:1: host name .* is longer than 253 characters") as e:
        parse_hostfile_text("a" * 500_000 + " slots=1\n", "hf")
    assert len(str(e.value)) < 300
    assert parse_hostfile_text("user@" + "a" * 253 + " slots=1\n", "hf")[0].slots == 1
