"""Hostile values and secrets in everything `mnemo launch` generates, and secrets in what training saves.

- Control characters (newline, carriage return, ...) in run.dir, the config
  path, overrides, host names or forwarded variables: a one-line error naming
  the key, exit 2, nothing written.
- Shell metacharacters, quotes, blanks, '#', '%': quoted, and read back
  exactly by bash (the sbatch script is executed with stand-ins for srun and
  scontrol) and by sbatch's own #SBATCH parser (ported below).
- A host name or address that ssh could read as an option, or that a shell
  in the user's ssh_config would run: refused.
- Credentials (MLFLOW_TRACKING_PASSWORD, a tracking.uri with user:pass@)
  never reach stdout, stderr, the sbatch script or an ssh argv; they reach a
  node on the ssh connection's stdin. config.yaml, meta.json and exported
  config.json hold the URI redacted, and resuming with the real URI is not a
  config change.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mnemo.cli import main
from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir

SECRET = "S3cr3tPassw0rd"
SECRET_URI = f"http://alice:{SECRET}@127.0.0.1:1"


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working dir with a valid config, a two-host hostfile and a clean environment."""
    clear_forwarded_env(monkeypatch)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin:/bin")
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"run:\n  dir: runs/g\ndata:\n  path: {data}\n")
    (tmp_path / "hosts").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv: str) -> str:
    rc, out, err = launch(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith("mnemo: error: ") and err.count("\n") == 1, err
    assert out == ""
    return err


# --------------------------------------------------------------------------- #
# Control characters: refused, naming the key


@pytest.mark.parametrize("target", [["--slurm"], ["--hostfile", "hosts"], []])
@pytest.mark.parametrize("ch", ["\n", "\r", "\x1b", "\t"])
def test_control_character_in_run_dir_from_yaml(ws, capsys, target, ch):
    # The YAML escape writes the character itself into run.dir: a line
    # "rm -rf ~" before the #SBATCH header is what this must prevent.
    (ws / "evil.yaml").write_text(
        f'run:\n  dir: "runs/x{json.dumps(ch)[1:-1]}touch PWNED"\ndata:\n  path: {ws / "data"}\n'
    )
    err = fails(capsys, "evil.yaml", "--dry-run", *target)
    assert err.startswith("mnemo: error: run.dir: ") and "control character" in err
    assert not (ws / "runs").exists() and not list(ws.glob("runs*"))


@pytest.mark.parametrize("target", [["--slurm"], ["--hostfile", "hosts"], []])
def test_control_character_in_overrides(ws, capsys, target):
    err = fails(capsys, "c.yaml", "--dry-run", *target, "run.dir=a\rb")
    assert err.startswith("mnemo: error: override run.dir: 'a\\rb' contains") and "'\\r'" in err  # not 'run.dir=a..'
    err = fails(capsys, "c.yaml", "--dry-run", *target, "run.name=x\necho PWNED")
    assert err.startswith("mnemo: error: override run.name: 'x\\necho PWNED' contains") and "'\\n'" in err
    err = fails(capsys, "c.yaml", "--dry-run", *target, "run.na\tme=x")
    assert err.startswith("mnemo: error: override: 'run.na\\tme' contains") and "'\\t'" in err
    assert not (ws / "runs").exists()


@pytest.mark.parametrize("target", [["--slurm"], ["--hostfile", "hosts"]])
def test_control_character_in_config_path(ws, capsys, target):
    (ws / "c\nd.yaml").write_text((ws / "c.yaml").read_text())
    err = fails(capsys, "c\nd.yaml", "--dry-run", *target)
    assert err.startswith("mnemo: error: config: ") and "control character" in err
    assert not (ws / "runs").exists()


def test_control_character_in_forwarded_variable(ws, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0\ntouch PWNED")
    err = fails(capsys, "c.yaml", "--hostfile", "hosts", "--dry-run")
    assert err.startswith("mnemo: error: NCCL_SOCKET_IFNAME: ")


def test_control_character_in_sbatch_arg_and_rdzv_id(ws, capsys):
    assert "--sbatch-arg" in fails(capsys, "c.yaml", "--slurm", "--dry-run", "--sbatch-arg=--qos=a\tb")
    assert "--rdzv-id" in fails(capsys, "c.yaml", "--dry-run", "--rdzv-id", "x\ny")


@pytest.mark.parametrize("value", ["", " "])
def test_empty_rdzv_id_is_refused(ws, capsys, value):
    """An empty id used to fall back to the default silently: the flag was given, so it is an error."""
    err = fails(capsys, "c.yaml", "--hostfile", "hosts", "--dry-run", f"--rdzv-id={value}")
    assert err.startswith("mnemo: error: --rdzv-id: empty"), err


@pytest.mark.parametrize("end", ["\n", "\r\n"])
@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--slurm", "--partition", "gpu{}"], "--partition"),
        (["--slurm", "--account", "proj{}"], "--account"),
        (["--slurm", "--time", "10{}"], "--time"),
        (["--slurm", "--time", "2:00:00{}"], "--time"),
        (["--nnodes", "2", "--node-rank", "1", "--master-addr", "w0{}"], "--master-addr"),
        (["--hostfile", "hosts", "--master-addr", "w0{}"], "--master-addr"),
        (["--slurm", "--sbatch-arg=--qos=high{}"], "--sbatch-arg"),
        (["--rdzv-id", "r{}"], "--rdzv-id"),
    ],
)
def test_value_ending_in_a_newline_is_refused(ws, capsys, argv, flag, end):
    # A pattern ending in '$' also matches before a final newline: '--partition gpu\n' passed and
    # wrote '#SBATCH --partition=gpu' plus an empty line; '--master-addr w0\n' went into --rdzv-endpoint.
    err = fails(capsys, "c.yaml", "--dry-run", *[a.replace("{}", end) for a in argv])
    assert err.startswith(f"mnemo: error: {flag}"), err
    assert not (ws / "runs").exists()


def test_names_ending_in_a_newline_are_refused():
    from mnemo.launch.hostfile import check_host_name
    from mnemo.launch.remote import forwarded_env, remote_command
    from mnemo.train.errors import UserError

    with pytest.raises(UserError, match=r"hf:3: host name 'w0\\n' is not a host name"):
        check_host_name("w0\n", "hf:3")
    assert forwarded_env({"NCCL_DEBUG\n": "INFO", "NCCL_ALGO": "ring"}) == {"NCCL_ALGO": "ring"}
    with pytest.raises(UserError, match="environment variable name 'NCCL_DEBUG\\\\n' cannot be forwarded"):
        remote_command(cwd="/w", python="/py", env={"NCCL_DEBUG\n": "INFO"}, launch_args=[])


@pytest.mark.parametrize(
    "line",
    [b'{"MLFLOW_TRACKING_PASSWORD\\n": "x"}\n', b'{"BAD NAME": "x"}\n'],
    ids=["name-ending-in-a-newline", "malformed-name"],
)
def test_node_refuses_a_bad_secret_name_on_stdin(ws, capsys, monkeypatch, line):
    r, w = os.pipe()
    os.write(w, line)

    class _Stdin:
        def fileno(self):
            return r

    monkeypatch.setattr(sys, "stdin", _Stdin())
    assert "--env-from-stdin" in fails(capsys, "c.yaml", "--dry-run", "--env-from-stdin")
    os.close(w)
    os.close(r)


# --------------------------------------------------------------------------- #
# Host names and addresses: never an ssh option, never a shell word


@pytest.mark.parametrize(
    "host, msg",
    [
        ("-oProxyCommand=touch${IFS}PWNED", "starts with '-'"),
        ("n$(touch${IFS}PWNED)", "is not a host name"),
        ("`touch${IFS}PWNED`", "is not a host name"),
        ("a;touch${IFS}PWNED", "is not a host name"),
        ("a'b", "is not a host name"),
        ("a\x1bb", "is not a host name"),
    ],
)
def test_hostile_host_names_are_refused(ws, capsys, host, msg):
    (ws / "evil").write_text(f"ok slots=1\n{host} slots=1\n")
    err = fails(capsys, "c.yaml", "--hostfile", "evil", "--dry-run")
    assert "evil:2: host name" in err and msg in err


@pytest.mark.parametrize("target", [["--hostfile", "hosts"], ["--nnodes", "2", "--node-rank", "1"]])
def test_hostile_master_addr_is_refused(ws, capsys, target):
    assert "starts with '-'" in fails(capsys, "c.yaml", "--dry-run", *target, "--master-addr=-oProxyCommand=x")
    assert "is not a host name" in fails(capsys, "c.yaml", "--dry-run", *target, "--master-addr", "h;id")


def test_ssh_gets_the_host_after_double_dash_and_master_addr_without_user(ws, capsys):
    (ws / "u").write_text("alice@node-a slots=1\nnode-b slots=1\n")
    rc, out, _ = launch(capsys, "c.yaml", "--hostfile", "u", "--dry-run")
    assert rc == 0
    ssh = shlex.split([ln for ln in out.splitlines() if not ln.startswith("#")][0])
    assert ssh[ssh.index("--") + 1] == "alice@node-a"
    remote = shlex.split(ssh[-1])
    assert remote[remote.index("--master-addr") + 1] == "node-a"  # the rendezvous is an address, not user@host


def test_bracketed_ipv6_hosts_reach_ssh_bare_and_the_rendezvous_in_brackets(ws, capsys):
    # Was: ssh -- '[::1]' (ssh cannot resolve it) and, unbracketed, a rendezvous at '::1:29500'.
    (ws / "v6").write_text("[::1] slots=1\nalice@[fe80::2] slots=1\n")
    rc, out, _ = launch(capsys, "c.yaml", "--hostfile", "v6", "--dry-run")
    assert rc == 0
    lines = [shlex.split(ln) for ln in out.splitlines() if not ln.startswith("#")]
    assert [argv[argv.index("--") + 1] for argv in lines] == ["::1", "alice@fe80::2"]
    assert "# node 0: [::1]" in out, "messages keep the hostfile's name"
    remote = shlex.split(lines[1][-1])
    master = remote[remote.index("--master-addr") + 1]
    assert master == "::1"
    for addr in (master, "[::1]"):  # what the node launcher makes of it, bare or in brackets
        rc, out, _ = launch(capsys, "c.yaml", "--dry-run", "--nnodes", "2", "--node-rank", "1", "--master-addr", addr)
        assert rc == 0
        torchrun = shlex.split(out.splitlines()[-1])
        assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "[::1]:29500"


def test_reachability_probe_gives_ssh_the_bare_address(ws):
    from mnemo.launch.hostfile import parse_hostfile_text
    from mnemo.launch.remote import check_reachable

    ssh = ws / "ssh"
    ssh.write_text(
        '#!/bin/bash\nwhile [ "$1" = -o ]; do shift 2; done\nshift\necho "$1" >> "$(dirname "$0")/hosts.seen"\n'
        '[ "$1" = ::1 ] || { echo "ssh: Could not resolve hostname $1" >&2; exit 255; }\n'
    )
    ssh.chmod(0o755)
    check_reachable(parse_hostfile_text("[::1] slots=1\n"), str(ssh))
    assert (ws / "hosts.seen").read_text() == "::1\n"


@pytest.mark.parametrize("login_shell", ["/usr/bin/tcsh", "/bin/bash"])
def test_reachability_probe_runs_under_a_csh_login_shell(ws, login_shell):
    # sshd runs `$SHELL -c CMD`. Was: `$(...)` in the probe made tcsh fail ("Illegal variable name."),
    # and every host was "unreachable".
    from mnemo.launch.hostfile import parse_hostfile_text
    from mnemo.launch.remote import check_reachable
    from mnemo.train.errors import UserError

    if not Path(login_shell).is_file():
        pytest.skip(f"{login_shell} is not installed")
    ssh = ws / "ssh"
    ssh.write_text(
        '#!/bin/bash\nwhile [ $# -gt 0 ]; do [ "$1" = "--" ] && { shift; break; }; shift; done; shift\n'
        f'exec {login_shell} -c "$*"\n'
    )
    ssh.chmod(0o755)
    check_reachable(parse_hostfile_text("node-a slots=1\n"), str(ssh))
    # The probe still tells one machine listed twice (it printed its identity through the login shell).
    with pytest.raises(UserError, match="are one machine"):
        check_reachable(parse_hostfile_text("node-a slots=1\nnode-b slots=1\n"), str(ssh))


@pytest.mark.parametrize("target", [["--hostfile", "hosts"], ["--nnodes", "2", "--node-rank", "1"]])
def test_master_addr_with_a_port_is_refused(ws, capsys, target):
    err = fails(capsys, "c.yaml", "--dry-run", *target, "--master-addr", "node-a:29500")
    assert "--master-addr: host name 'node-a:29500' holds a port" in err and "--master-port" in err


# --------------------------------------------------------------------------- #
# The sbatch script: quoted values come back exactly


def sbatch_directives(script: str) -> list[str]:
    """The options sbatch reads from a script's "#SBATCH" lines (its parser, src/sbatch/opt.c, ported).

    Parsing stops at the first line that is neither blank nor a comment; each
    word: blanks split, quotes group and are removed, an unquoted '#' ends the
    line, a backslash takes the next character literally, except a blank
    outside quotes: the word ends there all the same (sbatch 22.05 reads
    ``a\\ b`` as two words, "a" and "b").
    """
    opts: list[str] = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            rest = line[len("#SBATCH") :]
            i = 0
            while i < len(rest):
                while i < len(rest) and rest[i].isspace():
                    i += 1
                if i == len(rest):
                    break
                word, quote, escape = "", "", False
                # As _get_argument: the blank test comes before the escape is honoured.
                while i < len(rest) and (quote or not rest[i].isspace()):
                    c = rest[i]
                    if escape:
                        escape = False
                    elif c == "\\":
                        escape = True
                        i += 1
                        continue
                    elif quote:
                        if c == quote:
                            quote = ""
                            i += 1
                            continue
                    elif c in "\"'":
                        quote = c
                        i += 1
                        continue
                    elif c == "#":
                        i = len(rest)
                        break
                    word += c
                    i += 1
                assert not quote, f"unmatched quote in {line!r}"
                if word:
                    opts.append(word)
        elif line.strip() and not line.startswith("#"):
            break
    return opts


def test_sbatch_directive_parser_port_matches_real_sbatch():
    # What sbatch 22.05 read back from these lines (checked with sbatch --test-only).
    def one(line: str) -> list[str]:
        return sbatch_directives(f"#!/bin/bash\n#SBATCH {line}\n")

    assert one(r"--output=/a/my\ runs/x") == ["--output=/a/my", "runs/x"]
    assert one(r'--comment="a b\"c\\d#e"') == ['--comment=a b"c\\d#e']
    assert one(r"--comment=a\#b\"c\\d # gone") == ['--comment=a#b"c\\d']


@pytest.mark.parametrize(
    "value", ["a/my runs/x", "tab\there", 'q"uote', "s'q", "hash#x", "back\\slash", "\\\"#' all", "plain"]
)
def test_sbatch_directive_values_come_back_exactly(value):
    # Was: a backslash before each blank, which real sbatch splits at (--output=/a/my\\ runs/...).
    from mnemo.launch.slurm import SlurmOptions, sbatch_script

    o = SlurmOptions(
        config="/c.yaml",
        overrides=[],
        run_dir=Path("/r") / value.replace("\\", ""),
        cwd="/w/" + value,
        python="/v/bin/python",
        job_name=value,
        sbatch_args=["--comment=" + value, "--x " + value],
    )
    opts = sbatch_directives(sbatch_script(o))
    assert opts[0] == "--job-name=" + value
    assert f"--output=/r/{value.replace(chr(92), '')}/logs/slurm-%j.out" in opts
    assert opts[-3:] == ["--chdir=/w/" + value, "--comment=" + value, "--x " + value]


HOSTILE = "sp ace$(touch PWNED1)`touch PWNED2`;x'q\"#50%j"


def _stubs(ws: Path) -> Path:
    """srun and scontrol stand-ins: srun records its argv, one NUL-terminated word each."""
    d = ws / "stubbin"
    d.mkdir()
    (d / "srun").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGV"\n')
    (d / "scontrol").write_text(
        '#!/bin/bash\ncase "$2" in hostnames) echo node-a ;; node) echo "NodeName=node-a NodeAddr=10.0.0.5 x" ;; esac\n'
    )
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def test_sbatch_script_with_hostile_values_parses_back_exactly(tmp_path, capsys, monkeypatch):
    ws = tmp_path / f"w{HOSTILE.replace('%', '')}"  # the working directory itself is hostile
    ws.mkdir()
    monkeypatch.chdir(ws)
    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    config = ws / f"c{HOSTILE.replace('%', '')}.yaml"
    config.write_text(f"data:\n  path: {data}\n")
    run_dir = f"runs/{HOSTILE}"
    rc, out, err = launch(
        capsys,
        config.name,
        "--slurm",
        "--dry-run",
        f"run.dir={run_dir}",
        f"run.name={HOSTILE}",
        "--sbatch-arg=--comment=a b#c\"d'e",
    )
    assert rc == 0, err
    script = ws / run_dir / "slurm" / "job.sbatch"
    assert script.read_text() == out
    subprocess.run(["bash", "-n", str(script)], check=True)

    opts = sbatch_directives(out)
    assert f"--output={ws / run_dir}".replace("%", "%%") + "/logs/slurm-%j.out" in opts
    assert f"--chdir={ws}" in opts
    assert "--comment=a b#c\"d'e" in opts
    assert "--requeue" in opts and opts[-1] == "--comment=a b#c\"d'e", "a directive was cut or lost"

    # Run the script itself with srun/scontrol stand-ins: bash reads back every value.
    (ws / run_dir / "PREEMPTED").write_text("12\n")  # a stale marker: the script deletes it through $RUN_DIR
    env = {
        "PATH": f"{_stubs(tmp_path)}:/usr/bin:/bin",
        "SRUN_ARGV": str(tmp_path / "argv"),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node-a",
    }
    r = subprocess.run(["bash", str(script)], cwd=ws, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (ws / run_dir / "PREEMPTED").exists(), "RUN_DIR did not come back exactly"
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    i = argv.index("-m") + 1
    assert argv[i] == "mnemo"
    assert argv[i + 1 : i + 5] == ["launch", str(config), f"run.dir={run_dir}", f"run.name={HOSTILE}"]
    assert argv[argv.index("--master-addr") + 1] == "10.0.0.5" and argv[argv.index("--rdzv-id") + 1] == "mnemo-77"
    assert not list(tmp_path.rglob("PWNED*")), "a value was executed"


def test_hostfile_commands_with_hostile_values_run_exactly(tmp_path, capsys, monkeypatch):
    ws = tmp_path / f"w{HOSTILE}"  # the working directory the remote shell cd's into
    ws.mkdir()
    monkeypatch.chdir(ws)
    clear_forwarded_env(monkeypatch)
    monkeypatch.setenv("MNEMO_TAG", HOSTILE)
    data = stub_data_dir(tmp_path / "data")
    config = ws / f"c{HOSTILE}.yaml"
    config.write_text(f"data:\n  path: {data}\n")
    (ws / "hosts").write_text("n0 slots=1\n")
    rc, out, err = launch(
        capsys,
        config.name,
        "--hostfile",
        "hosts",
        "--dry-run",
        f"run.dir=runs/{HOSTILE}",
        "--rdzv-id=-x",
        "--master-addr",
        "10.0.0.1",
    )
    assert rc == 2 and "--rdzv-id '-x' starts with '-'" in err
    rc, out, err = launch(capsys, config.name, "--hostfile", "hosts", "--dry-run", f"run.dir=runs/{HOSTILE}")
    assert rc == 0, err
    line = [ln for ln in out.splitlines() if not ln.startswith("#")][0]
    stub = tmp_path / "stub.sh"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$PWD" "$MNEMO_TAG" "$@" > "$ARGV_OUT"\n')
    stub.chmod(0o755)
    remote = shlex.split(line)[-1].replace(sys.executable, str(stub))
    subprocess.run(
        ["bash", "-c", remote], check=True, cwd="/", env={"PATH": "/usr/bin:/bin", "ARGV_OUT": str(tmp_path / "argv")}
    )
    cwd, tag, *argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert (cwd, tag) == (str(ws), HOSTILE)
    assert argv[:6] == ["-P", "-m", "mnemo", "launch", str(config), f"run.dir=runs/{HOSTILE}"]
    assert not list(tmp_path.rglob("PWNED*")), "a value was executed"


def test_sbatch_run_dir_with_backslash_is_refused(ws, capsys):
    assert "backslash" in fails(capsys, "c.yaml", "--slurm", "--dry-run", "run.dir=a\\b")


# --------------------------------------------------------------------------- #
# The sbatch script file: only mnemo's own is replaced, a link is never followed


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_slurm_never_replaces_a_foreign_job_sbatch(ws, capsys, monkeypatch, dry_run):
    # Was overwritten silently (path.write_text).
    monkeypatch.setattr("mnemo.launch.slurm.find_sbatch", lambda: "/bin/false")  # never reached
    script = ws / "proj/slurm/job.sbatch"
    script.parent.mkdir(parents=True)
    script.write_text("mine\n")
    err = fails(capsys, "c.yaml", "--slurm", *dry_run, f"run.dir={ws / 'proj'}")
    assert err == (
        f"mnemo: error: {script} is not a script mnemo launch wrote; not replacing it "
        "(move it away or use another run.dir)\n"
    )
    assert script.read_text() == "mine\n"


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_slurm_never_writes_through_a_symlink(ws, capsys, monkeypatch, dry_run):
    # Was: the link's target (anywhere) overwritten with the script and made 0755.
    monkeypatch.setattr("mnemo.launch.slurm.find_sbatch", lambda: "/bin/false")  # never reached
    victim = ws / "victim.txt"
    victim.write_text("notes\n")
    victim.chmod(0o600)
    for target in (victim, ws / "absent.txt"):  # a dangling link too: writing would create its target
        script = ws / "runs/sym/slurm/job.sbatch"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.unlink(missing_ok=True)
        script.symlink_to(target)
        err = fails(capsys, "c.yaml", "--slurm", *dry_run, f"run.dir={ws / 'runs/sym'}")
        link_msg = "is a symbolic link; mnemo launch writes its script there only as a file of its own"
        assert err == f"mnemo: error: {script} {link_msg}\n"
        assert script.is_symlink()
    assert victim.read_text() == "notes\n" and (victim.stat().st_mode & 0o777) == 0o600
    assert not (ws / "absent.txt").exists()


def test_slurm_job_does_not_inherit_the_submitting_hosts_accelerator(ws, capsys, monkeypatch):
    # sbatch exports its environment to the job: a login node's DS_ACCELERATOR=cpu put the model on the
    # CPU on GPU nodes whose trainer used CUDA. The nodes choose their own, as over ssh (remote.NOT_FORWARDED).
    from mnemo.launch import slurm

    got = {}
    monkeypatch.setattr(slurm, "find_sbatch", lambda: "/bin/false")
    monkeypatch.setattr(slurm, "submit", lambda path, sbatch, env=None: got.update(env) or "42")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    rc, out, err = launch(capsys, "c.yaml", "--slurm")
    assert rc == 0 and out == "submitted job 42\n", err
    assert "DS_ACCELERATOR" not in got and got["NCCL_DEBUG"] == "INFO"


def test_slurm_replaces_its_own_script(ws, capsys):
    rc, first, _ = launch(capsys, "c.yaml", "--slurm", "--dry-run")
    assert rc == 0
    script = ws / "runs/g/slurm/job.sbatch"
    assert script.read_text() == first and (script.stat().st_mode & 0o777) == 0o755
    rc, second, _ = launch(capsys, "c.yaml", "--slurm", "--dry-run", "--nodes", "2")
    assert rc == 0 and second != first
    assert script.read_text() == second and (script.stat().st_mode & 0o777) == 0o755
    assert sorted(p.name for p in script.parent.iterdir()) == ["job.sbatch"], "no temporary file left"


# A torchrun stand-in: the preemption notice reaches the node launcher while torchrun still starts (before any
# worker); then one worker starts with the notice ignored (torchrun's disposition) for a while, as a rank does
# until launch/worker.py installs its handler.
SLOW_WORKER = """
import signal, sys, time
time.sleep(0.7)
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.05)
print("worker got", "USR1" if got else "nothing", flush=True)
"""
SLOW_TORCHRUN = """
import os, signal, subprocess, sys, time
time.sleep(1.0)  # the launcher has its handlers by now
os.kill(os.getppid(), signal.SIGUSR1)
time.sleep(1.0)
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[1]]))
"""


def test_a_preemption_notice_before_the_workers_start_reaches_them(tmp_path, monkeypatch):
    # Was: "sent SIGUSR1 to 0 worker(s)", and torchrun stopped with SIGINT (exit 130): the SLURM job failed
    # instead of being requeued.
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan

    def spawn(self, log_dir):
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            return subprocess.Popen(
                [sys.executable, "-c", SLOW_TORCHRUN, SLOW_WORKER], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    monkeypatch.setattr(NodeRunner, "_spawn", spawn)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    plan.log_path.parent.mkdir(parents=True)
    rc = NodeRunner(plan, console=io.StringIO()).run()
    assert rc == 0, plan.log_path.read_text()
    log = plan.log_path.read_text()
    assert "got SIGUSR1: no worker started yet; passing SIGUSR1 on when they start" in log
    assert "passed the held SIGUSR1 on to worker " in log
    assert "worker got USR1" in log


# A node launcher as srun starts it under the sbatch script: a second of imports and validation without
# handlers, then it catches SIGUSR1 and SIGTERM (launch/local.py NodeRunner.run) and says what it got.
STAND_IN_LAUNCHER = """
import os, signal, sys, time
def note(text):
    with open(os.environ["LAUNCHER_OUT"], "a") as f:
        f.write(text + "\\n")
start = "ignored" if signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN else "default"
note("argv " + " ".join(sys.argv[1:]))
note("usr1 at start " + start)
time.sleep(1.0)
got = []
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: got.append(signal.Signals(n).name))
deadline = time.time() + 20
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.3)
note("got " + " ".join(got))
"""
# srun: runs its task (what follows its own options); once the launcher runs, signals every process of the
# step, as slurmstepd does with the notice srun passes on.
EARLY_SRUN = """#!/bin/bash
while [ "$1" != bash ]; do shift; done
export SLURM_NODEID=0
"$@" &
task=$!
for _ in $(seq 200); do [ -s "$LAUNCHER_OUT" ] && break; sleep 0.05; done
# ... and once the wrapper holds the signal: a notice in the instant between its fork of the launcher and its
# trap is ignored by both (docs/launching.md), and a loaded machine can stretch that instant.
usr1=$(kill -l USR1)
for _ in $(seq 200); do
    m=$(awk '/^SigCgt:/ {print $2}' /proc/$task/status 2>/dev/null)
    [ -n "$m" ] && (( (0x$m >> (usr1 - 1)) & 1 )) && break
    sleep 0.05
done
kill -USR1 $task $(pgrep -P $task)
wait $task
"""
# scontrol: what the script asks it; "hostnames" notes that the script runs, then takes half a second.
SCONTROL = """#!/bin/bash
echo "$*" >> "$SCONTROL_LOG"
case "$2" in hostnames) sleep 0.5; while [ -n "${SCONTROL_GO:-}" ] && [ ! -e "$SCONTROL_GO" ]; do sleep 0.05; done
    echo node-a ;; node) echo "NodeName=node-a NodeAddr=10.0.0.5 x" ;; esac
"""


def _early_notice_job(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    from mnemo.launch.slurm import SlurmOptions, sbatch_script

    stubs = tmp_path / "stubbin"
    stubs.mkdir()
    launcher = tmp_path / "launcher"
    for path, text in (
        (stubs / "srun", EARLY_SRUN),
        (stubs / "scontrol", SCONTROL),
        (launcher, f"#!{sys.executable}\n{STAND_IN_LAUNCHER}"),
    ):
        path.write_text(text)
        path.chmod(0o755)
    o = SlurmOptions(
        config="/c.yaml", overrides=[], run_dir=tmp_path / "run", cwd=str(tmp_path), python=str(launcher), job_name="j"
    )
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(o))
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "LAUNCHER_OUT": str(tmp_path / "launcher.out"),
        "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node-a",
    }
    return script, env


def test_a_preemption_notice_in_the_node_launchers_first_second_reaches_it(tmp_path):
    # Was: srun's wrapper exec'd the launcher with the default action for SIGUSR1 until its handlers were in
    # place, and a notice then killed it: the job failed instead of being requeued.
    script, env = _early_notice_job(tmp_path)
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    out = (tmp_path / "launcher.out").read_text().splitlines()
    assert r.returncode == 0, (r.stdout, r.stderr, out)
    assert out[0].endswith("--node-rank 0")
    # Once, or twice under load: a notice that reaches the launcher after its handlers are in place comes both
    # from srun and through the wrapper (docs/launching.md: a second one changes nothing).
    assert out[1] == "usr1 at start ignored" and out[2] in ("got SIGUSR1", "got SIGUSR1 SIGUSR1"), out


def test_a_preemption_notice_before_srun_runs_requeues_the_job(tmp_path):
    # Was: the batch shell set its trap only after starting srun; a notice before that killed it (job FAILED).
    script, env = _early_notice_job(tmp_path)
    go = tmp_path / "go"  # scontrol holds the script until the notice is sent (a loaded machine is slow to send)
    p = subprocess.Popen(
        ["bash", str(script)], cwd=tmp_path, env={**env, "SCONTROL_GO": str(go)}, stdout=subprocess.PIPE, text=True
    )
    log = tmp_path / "scontrol.log"
    deadline = time.time() + 30
    while not (log.is_file() and log.read_text()):
        assert time.time() < deadline, "the script did not start"
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    go.touch()
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert "mnemo: got SIGUSR1 before training started; requeueing job 77" in out
    assert log.read_text().splitlines()[-1] == "requeue 77"
    assert not (tmp_path / "launcher.out").exists(), "srun ran"


class _FillingDisk(io.RawIOBase):
    """A node log on a disk with room for ``room`` bytes: then every write fails as the kernel's would."""

    def __init__(self, room: int):
        self.room, self.kept = room, b""

    def writable(self):
        return True

    def write(self, b):
        if len(self.kept) + len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.kept += bytes(b)
        return len(b)


def test_a_full_disk_under_the_node_log_does_not_stop_the_launcher(tmp_path, monkeypatch):
    # Was: the OSError of log.write in _emit killed the launcher (a traceback), torchrun with it.
    from mnemo.launch import local
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan

    disk = _FillingDisk(room=200)
    monkeypatch.setattr(
        local, "open_node_log", lambda plan: io.TextIOWrapper(io.BufferedWriter(disk), line_buffering=True)
    )
    lines = [f"[rank0]: step {i}" for i in range(40)]
    monkeypatch.setattr(
        NodeRunner,
        "_spawn",
        lambda self, log_dir: subprocess.Popen(
            [sys.executable, "-c", f"print({chr(10).join(lines)!r})"], stdout=subprocess.PIPE
        ),
    )
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 0
    shown = console.getvalue().splitlines()
    assert [line for line in shown if line.startswith("[rank0]")] == lines  # every line still on the console
    lost = [line for line in shown if "cannot write" in line]
    said = "No space left on device; the node log stops here, the console goes on"
    assert lost == [f"[launch node0] cannot write {plan.log_path}: {said}"]
    assert shown[-1] == "[launch node0] torchrun exited with code 0"
    assert 0 < len(disk.kept) <= 200 and disk.kept.decode().startswith("[launch node0] start ")


def test_torchruns_rank_copies_are_kept_off_the_run_dir_in_a_folder_removed_at_the_end(tmp_path, monkeypatch):
    # Was: --log-dir <run.dir>/logs/torchrun/node0. torchrun's --tee sends each rank's output through a file
    # there: with run.dir's disk full, a rank's last lines (its one-line error) were lost, and the console got
    # torchrun's ChildFailedError traceback instead (exit 1; tested by hand on a full tmpfs).
    from mnemo.launch import local
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan

    given = []

    def command(plan, log_dir):
        given.append(log_dir)
        return [sys.executable, "-c", f"import os; print('[rank0]: log dir there:', os.path.isdir({log_dir!r}))"]

    monkeypatch.setattr(local, "torchrun_command", command)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 0
    assert "[rank0]: log dir there: True" in console.getvalue()
    [log_dir] = given
    assert not Path(log_dir).resolve().is_relative_to(plan.run_dir.resolve())
    assert not os.path.lexists(log_dir)  # made for this run, removed with what torchrun wrote there
    assert sorted(os.listdir(plan.run_dir)) == ["logs"] and os.listdir(plan.run_dir / "logs") == ["node0.log"]


def test_a_second_launch_on_a_busy_run_dir_is_refused_before_writing_anything(tmp_path, monkeypatch):
    # Was: the launcher made logs/node0.log in the busy run dir and started torchrun; the refusal came from
    # rank 0 after a full start-up, with torchrun's traceback in that log.
    from mnemo.launch.local import NodeRunner, run_node
    from mnemo.launch.torchrun import NodePlan
    from mnemo.train.runlock import RunDirBusy, RunLock

    def no_start(self, log_dir):
        raise AssertionError("started")

    monkeypatch.setattr(NodeRunner, "_spawn", no_start)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    with RunLock(plan.run_dir):  # the running job's flock (another open file: held against this process too)
        with pytest.raises(RunDirBusy, match=rf"^run\.dir: {plan.run_dir} is in use by another job \(host .*pid"):
            run_node(plan)
        assert os.listdir(plan.run_dir) == ["run.lock"]  # no logs/node0.log
    with pytest.raises(AssertionError, match="started"):  # free again: the launcher goes on to start torchrun
        run_node(plan)


def test_a_second_launch_during_the_first_jobs_rank_start_up_is_refused_before_writing_anything(tmp_path, monkeypatch):
    # Was: the first launcher let go of run.lock at once, and the run dir was nobody's until its rank 0 took the
    # lock after its start-up (~6 s): a second launch then passed the check, appended its lines to the running
    # job's logs/node0.log and started torchrun and its ranks, which stopped on "run.dir: ... is in use".
    from mnemo.launch import local
    from mnemo.launch.local import run_node
    from mnemo.launch.torchrun import NodePlan
    from mnemo.train.runlock import RunDirBusy

    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    started, refused = [], []

    def command(plan_, log_dir):
        # The first job's torchrun about to start: no rank of it holds run.lock yet.
        started.append(log_dir)
        if len(started) == 1:
            log = plan.run_dir / "logs" / "node0.log"
            before = log.read_bytes()
            try:
                run_node(plan)
            except RunDirBusy as e:
                refused.append(str(e))
            assert log.read_bytes() == before  # nothing appended to the running job's node log
        return [sys.executable, "-c", "print('[rank0]: trained')"]

    monkeypatch.setattr(local, "torchrun_command", command)
    assert run_node(plan) == 0
    assert len(started) == 1 and len(refused) == 1  # the second launcher started no torchrun
    assert re.match(rf"^run\.dir: {plan.run_dir} is in use by another job \(host \S+, pid {os.getpid()},", refused[0])
    # The job over, its launcher's lock file is gone, and the next launch (a relaunch, a SLURM requeue) starts.
    assert os.listdir(plan.run_dir) == ["logs"]
    assert run_node(plan) == 0 and len(started) == 2
    # A launch that wrote nothing (refused by its ranks' checks, a port taken) leaves no run dir of its own.
    other = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "new", nproc_per_node=1)
    monkeypatch.setattr(local, "open_node_log", lambda plan_: (_ for _ in ()).throw(OSError("no log")))
    with pytest.raises(OSError, match="no log"):
        run_node(other)
    assert not os.path.lexists(other.run_dir)


def fake_torchrun(monkeypatch, script: str, given: list | None = None) -> None:
    """torchrun replaced by ``python -c script`` (its log dir in sys.argv[1])."""
    from mnemo.launch import local

    def command(plan, log_dir):
        if given is not None:
            given.append(log_dir)
        return [sys.executable, "-c", script, log_dir]

    monkeypatch.setattr(local, "torchrun_command", command)


def test_a_ranks_error_glued_to_a_cut_line_still_ends_the_node_with_2(tmp_path, monkeypatch):
    # Was: _RANK_USER_ERROR.match; rank 0's line cut short by a full disk came with rank 1's error glued to it,
    # the launcher missed it, printed torchrun's ChildFailedError traceback and exited 1.
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan

    glued = "[rank0]: [rank0] 2026-12-05 INFO mnemo.train: step [rank1]: mnemo: error: checkpoint: No space left"
    script = f"print({glued!r}); print('Traceback (most recent call last):'); print('ChildFailedError'); exit(1)"
    fake_torchrun(monkeypatch, script)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=2)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 2
    shown = console.getvalue()
    assert glued in shown and "ChildFailedError" not in shown, shown
    assert "ChildFailedError" in plan.log_path.read_text()


def test_a_temp_folder_without_room_is_refused_before_torchrun_starts(tmp_path, monkeypatch):
    # Was: TMPDIR on a 32 KiB tmpfs; the ranks' output went through files there and stopped at step 150 of 300,
    # without a word, and the launch exited 0.
    from mnemo.launch import local
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan
    from mnemo.train.errors import UserError

    monkeypatch.setattr(local.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(local, "free_bytes", lambda path: 32 << 10)
    fake_torchrun(monkeypatch, "raise SystemExit('started')")
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    with pytest.raises(UserError) as e:
        NodeRunner(plan, console=io.StringIO()).run()
    msg = str(e.value)
    assert msg.startswith(f"the temporary folder {tmp_path} has 32 KiB free: mnemo launch needs at least ")
    assert msg.endswith("(set TMPDIR to a folder with room)") and "\n" not in msg
    assert not [n for n in os.listdir(tmp_path) if n.startswith("mnemo-torchrun")]


def test_a_temp_folder_that_fills_up_while_the_ranks_run_is_said_and_a_lost_error_is_one_line(tmp_path, monkeypatch):
    from mnemo.launch import local
    from mnemo.launch.local import NodeRunner
    from mnemo.launch.torchrun import NodePlan
    from mnemo.train.errors import UserError

    room = iter([1 << 30])  # the check before the start; then none
    monkeypatch.setattr(local, "free_bytes", lambda path: next(room, 0))
    script = "import time; print('[rank0]: step 1', flush=True); time.sleep(1); print('ChildFailedError'); exit(1)"
    fake_torchrun(monkeypatch, script)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    with pytest.raises(UserError, match=r"^a rank failed after the temporary folder .* filled up: its output was"):
        NodeRunner(plan, console=console).run()
    said = [line for line in console.getvalue().splitlines() if "KiB left" in line]
    assert len(said) == 1 and said[0].startswith("[launch node0] the temporary folder "), console.getvalue()
    assert "is lost once it is full; training goes on" in said[0]


def test_torchrun_folders_of_launchers_killed_on_this_host_are_swept_at_the_next_launch(tmp_path, monkeypatch):
    # Was: a launcher killed with SIGKILL left $TMPDIR/mnemo-torchrun-node0-XXXX (full copies of every rank's
    # output) there for good: only its `finally` removed it.
    import socket

    from mnemo.launch import local
    from mnemo.launch.local import TORCHRUN_MARKER, NodeRunner
    from mnemo.launch.torchrun import NodePlan

    monkeypatch.setattr(local.tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = psutil_identity(os.getpid())
    host = socket.gethostname()
    folders = {
        "mnemo-torchrun-node0-dead0000": {"host": host, "pid": gone.pid, "started": 1.0},  # its launcher is gone
        "mnemo-torchrun-node0-reused00": {**me, "started": me["started"] - 100},  # its pid now another process's
        "mnemo-torchrun-node0-alive000": me,  # a launcher that still runs
        "mnemo-torchrun-node1-otherhst": {"host": host + "-other", "pid": gone.pid, "started": 1.0},  # elsewhere
        "mnemo-torchrun-node0-nomarker": None,  # not provably mnemo's
        "mnemo-torchrun-node0-tooLong99": {"host": host, "pid": gone.pid, "started": 1.0},  # not mkdtemp's name
    }
    for name, owner in folders.items():
        (tmp_path / name / "exits").mkdir(parents=True)
        if owner is not None:
            (tmp_path / name / TORCHRUN_MARKER).write_text(json.dumps(owner))
    given: list[str] = []
    script = f"import os, sys; print('[rank0]: marker', open(os.path.join(sys.argv[1], {TORCHRUN_MARKER!r})).read())"
    fake_torchrun(monkeypatch, script, given)
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    console = io.StringIO()
    assert NodeRunner(plan, console=console).run() == 0
    left = sorted(n for n in os.listdir(tmp_path) if n.startswith("mnemo-torchrun"))
    assert left == sorted(set(folders) - {"mnemo-torchrun-node0-dead0000", "mnemo-torchrun-node0-reused00"})
    [marker] = [line for line in console.getvalue().splitlines() if line.startswith("[rank0]: marker")]
    assert json.loads(marker.removeprefix("[rank0]: marker ")) == me  # this launcher's folder names it
    assert not os.path.lexists(given[0])


def psutil_identity(pid: int) -> dict:
    import socket

    import psutil

    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def test_node_log_is_never_appended_through_a_symlink(tmp_path, monkeypatch):
    # Was: open(log, "a") followed the link and appended the node's output to its target.
    from mnemo.launch.local import NodeRunner, run_node
    from mnemo.launch.torchrun import NodePlan
    from mnemo.train.errors import UserError

    def no_start(self, log_dir):
        raise AssertionError("started")

    monkeypatch.setattr(NodeRunner, "_spawn", no_start)
    victim = tmp_path / "victim.txt"
    victim.write_text("notes\n")
    plan = NodePlan(config=str(tmp_path / "c.yaml"), overrides=[], run_dir=tmp_path / "run", nproc_per_node=1)
    plan.log_path.parent.mkdir(parents=True)
    plan.log_path.symlink_to(victim)
    with pytest.raises(UserError, match=f"^{plan.log_path} is a symbolic link; mnemo launch appends"):
        run_node(plan)
    assert victim.read_text() == "notes\n"
    plan.log_path.unlink()
    os.mkfifo(plan.log_path)  # would block the open for ever
    with pytest.raises(UserError, match=f"^{plan.log_path} is not a regular file"):
        run_node(plan)


# --------------------------------------------------------------------------- #
# Secrets never printed, never on a command line


def _no_secret(*texts: str) -> None:
    for t in texts:
        assert SECRET not in t, t


@pytest.mark.parametrize("target", [["--slurm"], ["--hostfile", "hosts"], []])
def test_dry_run_shows_no_secret(ws, capsys, monkeypatch, target):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    rc, out, err = launch(capsys, "c.yaml", "--dry-run", *target, f"tracking.uri={SECRET_URI}")
    assert rc == 0, err
    script = ws / "runs/g/slurm/job.sbatch"
    _no_secret(out, err, script.read_text() if script.exists() else "")
    if target == ["--hostfile", "hosts"]:
        assert (
            "not shown: AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN, "
            "MLFLOW_TRACKING_URI" in out
        )
        for line in out.splitlines():
            if not line.startswith("#"):
                remote = shlex.split(shlex.split(line)[-1])
                assert "tracking.uri=" in remote and "--env-from-stdin" in remote
    if target == ["--slurm"]:
        # The job takes the URI from the environment sbatch exports, and refuses to start without it.
        assert ': "${MLFLOW_TRACKING_URI:?' in out and " tracking.uri= " in out


@pytest.mark.parametrize("target", [["--slurm"], ["--hostfile", "hosts"], []])
@pytest.mark.parametrize("password", ["SEC/RET7", "SEC#RET7", "SEC?RET7", "S/E@C#R?ET7"])
def test_a_password_with_an_unencoded_slash_hash_or_question_mark_is_a_credential(ws, capsys, target, password):
    # '/', '#' and '?' end a URI's authority, so tracking.uri=http://u:SEC/RET7@h looked like one without
    # credentials and went verbatim onto the srun line of job.sbatch and into the dry-run output.
    rc, out, err = launch(capsys, "c.yaml", "--dry-run", *target, f"tracking.uri=http://u:{password}@127.0.0.1:1")
    assert rc == 0, err
    script = ws / "runs/g/slurm/job.sbatch"
    for text in (out, err, script.read_text() if script.exists() else ""):
        assert "RET7" not in text and password not in text, text
    assert "MLFLOW_TRACKING_URI" in out


def test_other_overrides_with_credentials_are_refused(ws, capsys):
    err = fails(capsys, "c.yaml", "--dry-run", f"data.tokenizer=https://bob:{SECRET}@h/t.model")
    assert err.startswith("mnemo: error: data.tokenizer: ") and "https://***@h/t.model" in err
    _no_secret(err)
    # Refused as such before the path checks, which named data.tokenizer and showed the password
    # ("data.tokenizer: no such file: https:/bob:PASSWORD@h/ds/tokenizer.model").
    for target in (["--slurm"], []):
        err = fails(capsys, "c.yaml", "--dry-run", *target, f"data.path=https://bob:{SECRET}@h/ds")
        assert err.startswith("mnemo: error: data.path: 'https://***@h/ds' carries credentials"), err
        _no_secret(err)


def test_error_messages_redact_credentials(ws, capsys):
    _no_secret(fails(capsys, "c.yaml", "--dry-run", "--slurm", f"tracking.uri={SECRET_URI}\n"))


def _fake_ssh(ws: Path) -> Path:
    """An ssh that records its argv (what ps shows) and runs the remote command here, stdin attached."""
    d = ws / "fakebin"
    d.mkdir()
    ssh = d / "ssh"
    ssh.write_text(
        "#!/bin/bash\n"
        'printf "%s\\0" "$@" >> "$SSH_ARGV"\n'
        'while [ "$1" = -o ]; do shift 2; done\n'
        '[ "$1" = -- ] && shift\n'
        "shift\n"
        'exec bash -c "$1"\n'
    )
    ssh.chmod(0o755)
    return ssh


def test_secrets_reach_the_node_on_stdin_not_argv(ws, monkeypatch):
    from mnemo.launch import remote
    from mnemo.launch.hostfile import parse_hostfile_text

    # The node's python: records its argv and the first stdin line (what `mnemo launch --env-from-stdin` reads).
    node = ws / "node.sh"
    node.write_text(
        '#!/bin/bash\nIFS= read -r line\nprintf "%s" "$line" > "$NODE_STDIN"\nprintf "%s\\0" "$@" > "$NODE_ARGV"\n'
    )
    node.chmod(0o755)
    ssh = _fake_ssh(ws)
    monkeypatch.setenv("SSH_ARGV", str(ws / "ssh_argv"))
    monkeypatch.setenv("NODE_STDIN", str(ws / "node_stdin"))
    monkeypatch.setenv("NODE_ARGV", str(ws / "node_argv"))
    env = remote.forwarded_env(
        {
            "MLFLOW_TRACKING_PASSWORD": SECRET,
            "AWS_SESSION_TOKEN": SECRET,
            "MLFLOW_TRACKING_URI": SECRET_URI,
            "NCCL_DEBUG": "INFO",
            "HOME": "/root",
        }
    )
    assert set(env) == {"MLFLOW_TRACKING_PASSWORD", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI", "NCCL_DEBUG"}
    cmds = remote.node_commands(
        parse_hostfile_text("n0 slots=1\n", "hf"),
        config=str(ws / "c.yaml"),
        overrides=[],
        nproc_per_node=1,
        master_addr="n0",
        master_port=29500,
        rdzv_id="r",
        max_restarts=0,
        cwd=str(ws),
        python=str(node),
        env=env,
    )
    assert remote.run_hostfile(cmds, str(ssh)) == 0
    ssh_argv = (ws / "ssh_argv").read_text()
    _no_secret(ssh_argv, (ws / "node_argv").read_text(), remote.render(cmds))
    assert "NCCL_DEBUG=INFO" in ssh_argv and "--env-from-stdin" in (ws / "node_argv").read_text()
    assert json.loads((ws / "node_stdin").read_text()) == {
        "AWS_SESSION_TOKEN": SECRET,
        "MLFLOW_TRACKING_PASSWORD": SECRET,
        "MLFLOW_TRACKING_URI": SECRET_URI,
    }


def test_the_secrets_line_is_read_from_a_descriptor_above_1023():
    """select() refuses descriptors >= 1024; a launcher run by a process holding many files gets such
    descriptors, so the launchers wait on them with a selector (epoll)."""
    import resource

    from mnemo.launch.remote import read_env_line

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    if max(soft, hard if hard != resource.RLIM_INFINITY else high + 1) <= high:
        pytest.skip(f"RLIMIT_NOFILE {soft}/{hard}: no descriptor {high} possible here")
    if soft <= high:
        resource.setrlimit(resource.RLIMIT_NOFILE, (high + 1, hard))
    r, w = os.pipe()
    try:
        os.dup2(r, high)
        os.write(w, json.dumps({"MLFLOW_TRACKING_PASSWORD": SECRET}).encode() + b"\n")
        assert read_env_line(high, timeout=5) == {"MLFLOW_TRACKING_PASSWORD": SECRET}
    finally:
        for fd in (r, w, high):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_node_reads_exactly_the_secret_line_then_leaves_stdin(ws, capsys, monkeypatch):
    """`mnemo launch --env-from-stdin` takes the first line into its environment; the rest stays unread."""
    r, w = os.pipe()
    os.write(w, json.dumps({"MLFLOW_TRACKING_PASSWORD": SECRET}).encode() + b"\nREST")

    class _Stdin:
        def fileno(self):
            return r

    monkeypatch.setattr(sys, "stdin", _Stdin())
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "placeholder")  # restored after the test
    rc, out, err = launch(capsys, "c.yaml", "--dry-run", "--env-from-stdin")
    assert rc == 0, err
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    _no_secret(out, err)
    os.close(w)
    assert os.read(r, 100) == b"REST", "the stop-on-EOF watcher must find the rest of stdin untouched"
    os.close(r)


# --------------------------------------------------------------------------- #
# Secrets never saved; resuming with the real URI is not a change


def test_redact_uri():
    from mnemo.data_pipeline.redact import has_credentials, is_secret_env, redact_tree, redact_uri

    assert redact_uri(SECRET_URI) == "http://***@127.0.0.1:1"
    assert redact_uri(f"https://tok{SECRET}@h/x?a=b") == "https://***@h/x?a=b"
    assert redact_uri(f"http://u:p@ss{SECRET}@h/p@th") == "http://***@h/p@th"  # unencoded '@' in the password
    assert (
        redact_uri(f"see tracking.uri={SECRET_URI}, and http://h")
        == "see tracking.uri=http://***@127.0.0.1:1, and http://h"
    )
    # '/', '#' or '?' in a password (unencoded): all up to the last '@' before a blank is the userinfo
    for password in ("SEC/RET7", "SEC#RET7", "SEC?RET7", "S/E@C#R?ET7", "8080x/y"):
        for text, shown in {
            f"http://u:{password}@h": "http://***@h",
            f"tracking.uri=https://:{password}@h:5000/p?a=1 and more": "tracking.uri=https://***@h:5000/p?a=1 and more",
        }.items():
            assert redact_uri(text) == shown and has_credentials(text), text
    # ... and a port, a path or a fragment holding '@' or ':' is no password
    for plain in (
        "http://h:5000",
        "sqlite:////tmp/a@b/mlflow.db",
        "user@host",
        "a b",
        "http://host:8080/path@v2",
        "https://host:/a@b",
        "http://host/path@v2:x",
        "http://host/p?q=u:p@x",
        "http://host#f:x@y",
        "http://[::1]:5000/x@y",
        "git@github.com:x/y.git",
        "see http://h:1/ and a:b@c",
    ):
        assert redact_uri(plain) == plain and not has_credentials(plain)
    assert redact_uri(redact_uri(SECRET_URI)) == redact_uri(SECRET_URI)
    assert redact_tree({"a": [SECRET_URI, 1], "b": {"c": SECRET_URI}}) == {
        "a": ["http://***@127.0.0.1:1", 1],
        "b": {"c": "http://***@127.0.0.1:1"},
    }
    assert is_secret_env("MLFLOW_TRACKING_PASSWORD") and is_secret_env("AWS_SECRET_ACCESS_KEY")
    assert is_secret_env("MY_API_KEY") and is_secret_env("MLFLOW_TRACKING_URI", SECRET_URI)
    assert not is_secret_env("MLFLOW_TRACKING_URI", "http://h:5000") and not is_secret_env("NCCL_DEBUG", "INFO")


def test_redact_uri_hides_a_password_with_blanks():
    # Before: the userinfo stopped at a blank, so the URI was shown as given, and has_credentials said no (so
    # launch put it on command lines).
    from mnemo.data_pipeline.redact import has_credentials, redact_tree, redact_uri

    for blank in (" ", "\t", "\n", "\xa0", " x y\t"):
        for text, shown in {
            f"http://alice:PW{blank}{SECRET}@127.0.0.1:1": "http://***@127.0.0.1:1",
            f"see http://alice:PW{blank}{SECRET}@h:1/p and http://u:{SECRET}@g": "see http://***@h:1/p and http://***@g",
            f"https://:{blank}{SECRET}@h/x?a=1": "https://***@h/x?a=1",
            f"'http://a:{SECRET}/x{blank}y@h'": "'http://***@h'",
        }.items():
            assert redact_uri(text) == shown and has_credentials(text), repr(text)
            assert redact_uri(shown) == shown
    assert redact_tree({"a": [f"http://a:P W{SECRET}@h"]}) == {"a": ["http://***@h"]}
    # a port before a blank, an e-mail address after a URI stay readable
    for plain in ("http://h:5000 is down; write to admin@example.com", "http://h:5000\nadmin@example.com"):
        assert redact_uri(plain) == plain and not has_credentials(plain), plain


def test_redact_uri_hides_credentials_of_a_uri_that_lost_a_slash():
    # Before: only scheme://user:pass@ counted, so pathlib's copy of a URI (https:/u:p@h/x: `--data: no such
    # directory: ...`, `config file not found: ...`) and https:u:p@h were shown as given.
    from mnemo.data_pipeline.redact import has_credentials, redact_uri, redact_uri_value

    for text, shown in {
        f"https:/alice:{SECRET}@data.example/ds": "https:/***@data.example/ds",
        f"--data: no such directory: s3:/u:{SECRET}@b/x": "--data: no such directory: s3:/***@b/x",
        f"tracking.uri=https:alice:{SECRET}@h:5000": "tracking.uri=https:***@h:5000",
        f"x@https:/u:p@ss{SECRET}@h 'https:/a:{SECRET}@g'": "x@https:/***@h 'https:/***@g'",
        # a token alone after a lost slash, three slashes, no scheme (Before: shown)
        f"no such directory: https:/{SECRET}@h/x": "no such directory: https:/***@h/x",
        f"s3:///alice:{SECRET}@bucket/x and s3:///{SECRET}@b": "s3:///***@bucket/x and s3:///***@b",
        f"tasks: '//alice:{SECRET}@h' is not": "tasks: '//***@h' is not",
        f"//{SECRET}@h/x": "//***@h/x",
    }.items():
        assert redact_uri(text) == shown and has_credentials(text), text
        assert redact_uri(shown) == shown
    plains = ("file:/tmp/a@b", "mailto:a@b", "http://host/a:b:c@d", "C:/x/a:b@c", "error: a:b@c", "x@y:z")
    for plain in (*plains, "file:///tmp/a@b", "runs//a:b@c", "x/ //h:80/a@b", "C:/a@b"):
        assert redact_uri(plain) == plain and not has_credentials(plain), plain
    # A value known to be a URI: a userinfo with no // before it is one too (http:// forgotten, a token user).
    for uri, shown in {
        f"alice:{SECRET}@mlflow.example:5000": "***@mlflow.example:5000",
        f"{SECRET}@mlflow.example": "***@mlflow.example",
        f"https:{SECRET}@h": "***@h",
        f"https:/a:{SECRET}@h": "https:/***@h",
        "http://h:5000": "http://h:5000",
        "sqlite:////tmp/a@b/x.db": "sqlite:////tmp/a@b/x.db",
    }.items():
        assert redact_uri_value(uri) == shown, uri


def test_redact_uri_takes_linear_time():
    # Every letter of "a.b.c..." (\b) and every "scheme://u:" started a scan to the end of the text: a
    # 200 kB config value took seconds to report.
    import time

    from mnemo.data_pipeline.redact import redact_uri

    for text in ("a." * 100_000, "http://a:b" * 20_000, "http://a:b?" * 20_000, "=http://:" * 20_000):
        start = time.perf_counter()
        assert redact_uri(text) == text
        assert time.perf_counter() - start < 1.0, text[:20]


def test_config_yaml_meta_json_and_export_hold_no_secret(tmp_path):
    from mnemo.train.checkpoint import CheckpointManager, read_meta
    from mnemo.train.config import load_config, to_dict, to_yaml

    cfg = load_config(None, [f"tracking.uri={SECRET_URI}", "run.dir=r"])
    assert cfg.tracking.uri == SECRET_URI, "the real URI stays in memory"
    text = to_yaml(cfg)
    _no_secret(text)
    assert "http://***@127.0.0.1:1" in text

    class FakeEngine:
        def save_checkpoint(self, save_dir, tag, save_latest=True):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)

    mgr = CheckpointManager(tmp_path)
    path = mgr.save(5, FakeEngine(), {"step": 5}, {"step": 5, "config": to_dict(cfg), "note": SECRET_URI})
    _no_secret((path / "meta.json").read_text())
    assert read_meta(path)["config"]["tracking"]["uri"] == "http://***@127.0.0.1:1"


def test_resume_with_the_real_uri_is_no_change_and_prints_no_secret():
    from mnemo.train.config import load_config, to_dict
    from mnemo.train.resume import check_resume_compatible

    cfg = load_config(None, [f"tracking.uri={SECRET_URI}"])
    saved = to_dict(cfg)
    saved["tracking"]["uri"] = "http://***@127.0.0.1:1"  # what meta.json holds
    assert check_resume_compatible(saved, cfg, {}, "", {}, Path("ck")) == []
    # A checkpoint written before redaction holds the real URI; a new one is reported redacted.
    old = to_dict(load_config(None, [f"tracking.uri=http://bob:{SECRET}@h2"]))
    changes = check_resume_compatible(old, cfg, {}, "", {}, Path("ck"))
    assert changes == ["tracking.uri: 'http://***@h2' -> 'http://***@127.0.0.1:1'"]


def test_cli_errors_never_print_credentials(capsys):
    # A bad value that is a URI with a password is named in the error, its userinfo hidden.
    from mnemo.cli import main as cli_main

    rc = cli_main(["train", "configs/debug.yaml", "tracking.enabled=http://u:S3CRET@127.0.0.1:1"])
    err = capsys.readouterr().err
    assert rc == 2 and "tracking.enabled" in err and "S3CRET" not in err and "http://***@127.0.0.1:1" in err


@pytest.mark.parametrize("content", ["my notes\n", "12 steps\n", "notes on job 77\n1200\n", "1200\nnotes", None])
def test_sbatch_script_keeps_a_users_preempted_file_and_does_not_requeue_on_it(tmp_path, capsys, monkeypatch, content):
    # Was: the script's `rm -f "$RUN_DIR/PREEMPTED"` deleted any file of that name, and a file there after the
    # run (one the trainer refused to start beside) would requeue the job for ever. Only the trainer's marker
    # (a regular file holding a step number) counts; None: a symbolic link to a user's file.
    monkeypatch.chdir(tmp_path)
    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"data:\n  path: {data}\n")
    rc, _, err = launch(capsys, "c.yaml", "--slurm", "--dry-run", "run.dir=runs/p")
    assert rc == 0, err
    marker = tmp_path / "runs/p/PREEMPTED"
    if content is None:
        (tmp_path / "mine.txt").write_text("7\n")
        marker.symlink_to(tmp_path / "mine.txt")
    else:
        marker.write_text(content)
    stubs = _stubs(tmp_path)
    (stubs / "scontrol").write_text(
        '#!/bin/bash\ncase "$1 $2" in "show hostnames") echo node-a ;; "show node") echo "NodeAddr=10.0.0.5" ;;'
        ' requeue*) touch "$SRUN_ARGV.requeued" ;; esac\n'
    )
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "SRUN_ARGV": str(tmp_path / "argv"),
        "SLURM_JOB_ID": "78",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node-a",
    }
    script = tmp_path / "runs/p/slurm/job.sbatch"
    r = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.lexists(marker) and (content is None or marker.read_text() == content)
    assert "requeueing" not in r.stdout and not (tmp_path / "argv.requeued").exists()
    assert content is not None or (tmp_path / "mine.txt").read_text() == "7\n"
