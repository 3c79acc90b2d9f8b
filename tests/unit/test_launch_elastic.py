"""Elastic shrink of a hostfile job (launch/remote.py ``run_elastic``, ``mnemo launch --min-nodes``).

The orchestrator runs over a stand-in ssh: a host whose name starts with
``lost`` ends its connection with ssh's 255 at once (a node that vanished),
every other host runs the command locally. What the real thing does on
namespace nodes with training is in tests/integration/test_netns_nodes.py.
"""

from __future__ import annotations

import pytest

from mnemo.launch import remote
from mnemo.launch.hostfile import parse_hostfile_text
from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir

# A surviving node of a failed attempt: waits until the orchestrator closes its stdin (as a node
# launcher does), then fails, as ranks whose peer vanished do.
SURVIVOR = "cat >/dev/null; exit 1"


@pytest.fixture
def ssh(tmp_path):
    p = tmp_path / "ssh"
    p.write_text(
        "#!/bin/bash\n"
        'while [ "$1" = -o ]; do shift 2; done\n'
        '[ "$1" = -- ] && shift\n'
        "host=$1; shift\n"
        'case "$host" in lost*|gone*) echo "Connection to $host closed by remote host." >&2; exit 255;; esac\n'
        'exec bash -c "$*"\n'
    )
    p.chmod(0o755)
    return str(p)


def _attempts(script):
    """(commands builder, the host lists it was called with); ``script(hosts)``: the command every node runs."""
    calls: list[list[str]] = []

    def commands(hosts):
        calls.append([h.name for h in hosts])
        return [remote.NodeCommand(h.name, i, script(hosts)) for i, h in enumerate(hosts)]

    return commands, calls


def test_a_lost_node_shrinks_the_job_onto_the_survivors(ssh, capsys):
    hosts = parse_hostfile_text("a slots=1\nlost-b slots=1\nc slots=1\n", "hf")
    # Attempt 1 loses lost-b; attempt 2 (two nodes) succeeds.
    commands, calls = _attempts(lambda hs: "exit 0" if len(hs) == 2 else SURVIVOR)
    assert remote.run_elastic(hosts, commands, ssh, min_nodes=2) == 0
    assert calls == [["a", "lost-b", "c"], ["a", "c"]]
    err = capsys.readouterr().err
    assert "mnemo launch: lost node 1 (lost-b)" in err
    assert "mnemo launch: elastic shrink 1: continuing on 2 node(s) without 'lost-b'" in err


def test_no_shrink_below_min_nodes(ssh, capsys):
    hosts = parse_hostfile_text("a slots=1\nlost-b slots=1\nc slots=1\n", "hf")
    commands, calls = _attempts(lambda hs: SURVIVOR)
    assert remote.run_elastic(hosts, commands, ssh, min_nodes=3) == 1
    assert calls == [["a", "lost-b", "c"]]
    assert "2 node(s) left after losing 'lost-b', fewer than --min-nodes 3: the job ends" in capsys.readouterr().err


def test_a_failure_that_is_not_a_lost_node_ends_the_job(ssh, capsys):
    # A rank that fails (a bug, a bad batch) is not a node loss: shrinking would only repeat it.
    hosts = parse_hostfile_text("a slots=1\nb slots=1\n", "hf")
    commands, calls = _attempts(lambda hs: "exit 3")
    assert remote.run_elastic(hosts, commands, ssh, min_nodes=1) == 3
    assert calls == [["a", "b"]]
    assert "elastic shrink" not in capsys.readouterr().err


def test_a_survivor_that_stops_answering_is_dropped_too(ssh, tmp_path, capsys, monkeypatch):
    # Node "c" ran (and failed) in attempt 1 but refuses the probe before attempt 2: it is left out too.
    flag = tmp_path / "c-down"
    hosts = parse_hostfile_text("a slots=1\nlost-b slots=1\nc slots=1\n", "hf")

    def script(hs):
        return "exit 0" if len(hs) == 1 else f"cat >/dev/null; touch {flag}; exit 1"

    commands, calls = _attempts(script)
    probe = remote._probe

    def flaky_probe(ssh_, host):
        if host == "c" and flag.exists():
            return "ssh: connect to host c port 22: No route to host", None
        return probe(ssh_, host)

    monkeypatch.setattr(remote, "_probe", flaky_probe)
    assert remote.run_elastic(hosts, commands, ssh, min_nodes=1) == 0
    assert calls == [["a", "lost-b", "c"], ["a"]]
    err = capsys.readouterr().err
    assert "node 'c' (hostfile line 3) no longer answers over ssh: ssh: connect to host c port 22: No route" in err
    assert "continuing on 1 node(s) without 'lost-b', 'c'" in err


@pytest.fixture
def ws(tmp_path, monkeypatch):
    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"run:\n  dir: runs/g\ndata:\n  path: {data}\ntrain:\n  batch_size: 1\n")
    (tmp_path / "three").write_text("w0 slots=1\nw1 slots=1\nw2 slots=1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _launch(capsys, *argv):
    from mnemo.cli import main

    rc = main(["launch", "c.yaml", "--dry-run", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--min-nodes", "1"], "--min-nodes needs --hostfile"),
        (["--hostfile", "three", "--min-nodes", "4"], "--min-nodes must be in [1, 3] (the selected hosts), got 4"),
        (["--hostfile", "three", "--min-nodes", "0"], "--min-nodes must be in [1, 3]"),
        (
            ["--hostfile", "three", "--min-nodes", "2"],
            "--min-nodes 2: elastic shrink keeps the global batch by accumulation; set train.global_batch_size "
            "to a multiple of 6 (2 to 3 node(s) x 1 rank(s) x train.batch_size 1)",
        ),
        (
            ["--hostfile", "three", "--min-nodes", "2", "train.global_batch_size=3"],
            "--min-nodes 2: on 2 node(s) x 1 rank(s): train.global_batch_size: 3 is not a multiple of world size 2 "
            "x train.batch_size 1 = 2 (a multiple of 6 fits every count)",
        ),
        (
            ["--hostfile", "three", "--min-nodes", "2", "train.global_batch_size=6", "--master-addr", "w0"],
            "--master-addr cannot be combined with --min-nodes",
        ),
        (
            ["--hostfile", "three", "--min-nodes", "1", "train.global_batch_size=6", "train.passkey.fraction=0.25"],
            "which passkey episode steps do not support",
        ),
    ],
)
def test_min_nodes_is_checked_before_anything_starts(ws, capsys, argv, msg):
    rc, out, err = _launch(capsys, *argv)
    assert rc == 2 and out == "" and err.startswith("mnemo: error: ") and msg in err, err
    assert not (ws / "runs").exists()


def test_min_nodes_dry_run_says_so_and_full_count_is_no_shrink(ws, capsys):
    rc, out, _ = _launch(capsys, "--hostfile", "three", "--min-nodes", "2", "train.global_batch_size=6")
    assert rc == 0
    assert (
        out.splitlines()[0] == "# elastic: a lost node ends this attempt; the job goes on with the survivors, down to 2"
    )
    assert out.count("--nnodes 3") == 3
    # --min-nodes equal to the hosts' count is no shrink: today's job exactly.
    rc, same, _ = _launch(capsys, "--hostfile", "three", "--min-nodes", "3", "train.global_batch_size=6")
    assert rc == 0 and same == out.split("\n", 1)[1]
