"""Bad input through the real `mnemo` entry point: one line naming the culprit, non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mnemo(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnemo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def assert_one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode != 0
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("mnemo: error:"), res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


def test_unknown_config_key(data_dir):
    assert_one_line_error(mnemo("train", "configs/debug.yaml", "train.nokey=1"), "train.nokey")


def test_missing_data_dir():
    assert_one_line_error(
        mnemo("train", "configs/debug.yaml", "data.path=/nonexistent/mnemo-data"),
        "data.path",
        "/nonexistent/mnemo-data",
    )


def test_data_dir_without_shards(data_dir):
    assert_one_line_error(mnemo("train", "configs/debug.yaml", f"data.path={data_dir}"), "index.json", str(data_dir))


def test_missing_config_file():
    assert_one_line_error(mnemo("train", "configs/nope.yaml"), "configs/nope.yaml")


def test_missing_corpus_path(tmp_path):
    assert_one_line_error(
        mnemo("prepare", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), str(tmp_path / "nope")
    )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_empty_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    assert_one_line_error(
        mnemo("prepare", "--input", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--vocab-size", "300"),
        str(tmp_path / "empty"),
    )


def test_launch_validates_before_spawning(tmp_path):
    res = mnemo("launch", "configs/debug.yaml", "--nproc-per-node", "2", "--dry-run", "train.nokey=1")
    assert_one_line_error(res, "train.nokey")


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_steps=inf", "train.max_steps"),
        ("train.batch_size=nan", "train.batch_size"),
        ("train.lr=nan", "train.lr"),
        ("memory.long.layers=[2,2]", "memory.long.layers[1]"),
    ],
)
def test_non_finite_and_duplicate_config_values(override, key):
    assert_one_line_error(mnemo("train", "configs/debug.yaml", override), key)


def test_export_into_its_own_source(tmp_path):
    # An export folder as the source (no DeepSpeed needed): --out the same folder.
    src = tmp_path / "exported"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    res = mnemo("export", str(src), "--out", str(src))
    assert_one_line_error(res, "--out", str(src), "inside the checkpoint being exported")
    assert (src / "model.safetensors").read_bytes() == b"weights"


def test_eval_ivf_probe_below_one(data_dir):
    """Checked before the data dir and the (slow) model load: the checkpoint need not exist."""
    res = mnemo("eval", "/nonexistent/ckpt", "--data", str(data_dir), "--ltm-search", "ivf", "--ivf-probe", "0")
    assert_one_line_error(res, "--ivf-probe", "got 0")


@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/debug.yaml", "memory.long.layers=[2,2]"],
        ["train", "configs/debug.yaml", "model.size=huge"],
        ["launch", "configs/debug.yaml", "train.lr=-1"],
        ["eval", "/nonexistent/ckpt", "--data", "/nonexistent/data"],
        ["eval", "/nonexistent/ckpt", "--data", "/nonexistent/data", "--ltm-search", "ivf", "--ivf-probe", "0"],
        ["eval", "/nonexistent/ckpt", "--data", "/nonexistent/data", "--batch-size", "0"],
        ["eval", "/nonexistent/ckpt", "--lm-eval", "hellaswag", "--limit", "0"],
        ["generate", "/nonexistent/ckpt", "--prompt-file", "/nonexistent/p.txt", "--temperature", "nan"],
    ],
)
def test_config_and_flag_errors_come_before_importing_torch(args):
    """A typo is answered in a fraction of a second, not after torch's import (seconds; more on a busy node)."""
    code = (
        "import sys\n"
        "from mnemo.cli import main\n"
        "try:\n"
        f"    rc = main({args!r})\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print(rc, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    lines = res.stderr.strip().splitlines()
    assert lines[-1].split()[1] == "False" and lines[-1].split()[0] != "0", res.stderr
    assert any(line.startswith("mnemo: error:") for line in lines), res.stderr


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_gpu(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/debug.yaml", "train.device=cuda"],
        ["launch", "configs/debug.yaml", "--nproc-per-node", "2", "train.device=cuda"],
    ],
)
def test_train_device_cuda_without_a_gpu_is_one_line_before_any_rank(args, tmp_path):
    """Was `RuntimeError: Found no NVIDIA driver` from torch.cuda.set_device in every rank's trainer set-up."""
    res = mnemo(*args, f"run.dir={tmp_path / 'run'}")
    assert_one_line_error(res, "train.device=cuda", "no CUDA device")
    assert not (tmp_path / "run").exists()  # nothing started: no rank made the run dir


def test_check_train_device(monkeypatch):
    import torch

    from mnemo.train.errors import UserError
    from mnemo.train.rankenv import check_train_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^train\.device=cuda: no CUDA device available"):
        check_train_device("cuda")
    check_train_device("auto")  # falls back to the CPU
    check_train_device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_train_device("cuda")
    # More ranks on a machine than CUDA devices: was "invalid device ordinal" in torch.cuda.set_device of each
    # rank past the last device (after torch, DeepSpeed and the data had loaded).
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_train_device("cuda", 2)
    check_train_device("cpu", 8)
    for device in ("cuda", "auto"):
        with pytest.raises(
            UserError, match=r"^3 ranks on this machine, 2 CUDA device\(s\) visible: .*--nproc-per-node 2"
        ):
            check_train_device(device, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_train_device("auto", 3)  # trains on the CPU


def test_control_characters_in_an_error_are_shown_escaped_on_one_line(tmp_path):
    """A value holding a newline used to cut the message there ('mnemo: error: input no')."""
    bad = tmp_path / "no\nsuch\x1b]0;title\x07.txt"
    res = mnemo("prepare", "--input", str(bad), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "\x1b" not in res.stderr, res.stderr
    assert res.stderr == f"mnemo: error: input {tmp_path}/no\\nsuch\\x1b]0;title\\x07.txt: no such file or directory\n"


def test_exit_status_escapes_every_control_character():
    from mnemo.data_pipeline.errors import DataError
    from mnemo.train.errors import exit_status, visible

    assert visible("a\tb\nc\rd\x00e\x7ff\x9bg ü 日") == "a\\tb\\nc\\rd\\x00e\\x7ff\\x9bg ü 日"
    assert visible("a\tb\nc\x1b", keep="\n\t") == "a\tb\nc\\x1b"
    # a file name's bytes that are not UTF-8 (surrogate-escaped): the bytes, which any stdout can encode
    assert visible("dd\udcff \ud800") == "dd\\xff \\ud800"
    # Bidi overrides, isolates, marks and line separators reorder or break what a terminal shows ("n\u202etxt.exe"
    # reads as "nexe.txt"): escaped too; letters of right-to-left scripts are text and stay.
    assert visible("n\u202etxt.exe \u2066x\u2069 \u200f\u061c \u2028\u2029 مرحبا") == (
        "n\\u202etxt.exe \\u2066x\\u2069 \\u200f\\u061c \\u2028\\u2029 مرحبا"
    )

    def fail():
        raise DataError("  line one\nline two\t\x1b[2J  ")

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert exit_status(fail) == 2
    assert err.getvalue() == "mnemo: error: line one\\nline two\\t\\x1b[2J\n"


def test_brief_shows_a_byte_that_is_not_utf8_as_the_byte():
    """run.dir or data.path named with byte 0xff was quoted as 'r\\udcff' (Python's surrogate escape, which
    names no byte the user typed), while visible() writes the same name r\\xff: now brief() writes \\xff too."""
    from mnemo.data_pipeline.errors import brief

    assert brief("r\udcff") == r"'r\xff'"
    assert brief(["a\udc80", Path("b\udcfe")]) == r"['a\x80', PosixPath('b\xfe')]"
    # a backslash of the value followed by the letters "udcff" is no escape and stays; other escapes stay
    assert brief("a\\udcff \\\udcff") == r"'a\\udcff \\\xff'"
    assert brief("\ud800 \udc7f \x85") == r"'\ud800 \udc7f \x85'"


# A path component over 255 bytes: pathlib's exists/is_dir/is_file raise ENAMETOOLONG (as they do
# EACCES), which was a traceback wherever mnemo looked at a path the user gave.
LONG = "a" * 300


@pytest.fixture
def long_name_ws(tmp_path, monkeypatch):
    """A working dir with a config whose data dir passes launch's checks, and an export-like folder."""
    from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir

    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(f"run:\n  dir: runs/g\ndata:\n  path: {data}\n")
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "argv,what",
    [
        (["launch", "{L}.yaml", "--dry-run"], "config file"),
        (["train", "{L}.yaml"], "config file"),
        *(
            (cmd + ["c.yaml", f"{key}={{L}}"], key)
            for cmd in (["launch", "--dry-run"], ["train"])
            for key in ("run.dir", "data.path", "data.tokenizer", "checkpoint.resume", "init_from")
        ),
        (
            # Named: a last part of 300 bytes is refused as a name (docs/streams.md) before the path is looked at.
            ["launch", "--dry-run", "c.yaml", "data.path=", "data.sources=[{path: data}, {path: {L}, name: long}]"],
            "data.sources[1].path",
        ),
        (["eval", "{L}", "--data", "{L}"], "--data"),
        (["eval", "exported", "--data", "data", "--json", "{L}/x.json"], "--json"),
        (["eval", "exported", "--data", "data", "--plots", "{L}"], "--plots"),
        (["eval", "{L}", "--data", "data"], "checkpoint"),
        (["generate", "exported", "--prompt-file", "{L}"], "--prompt-file"),
        (["export", "{L}", "--out", "x"], "checkpoint"),
        (["export", "exported", "--out", "{L}"], "--out"),
    ],
)
def test_a_path_name_too_long_is_one_line_naming_the_key(long_name_ws, capsys, argv, what):
    from mnemo.cli import main

    long_path = str(long_name_ws / LONG)
    rc = main([a.replace("{L}", long_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"mnemo: error: {what}: ") and err.count("\n") == 1, err
    assert "File name too long" in err and len(err) < 400, err


def test_launch_refuses_a_tracking_uri_mlflow_cannot_open_before_any_rank_starts():
    # Before: rank 0 failed after building the engine and data, rank 1 died of gloo's "Connection closed by peer".
    res = mnemo("launch", "configs/debug.yaml", "--nproc-per-node", "2", "--dry-run", "tracking.uri=foo://bar")
    assert res.returncode == 2
    assert_one_line_error(res, "tracking.uri: 'foo://bar': unknown scheme 'foo'")
    res = mnemo("train", "configs/debug.yaml", "tracking.experiment= ")
    assert res.returncode == 2
    assert_one_line_error(res, "tracking.experiment: ' ': only blanks")


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails as the kernel's would."""

    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _torch_save_on_a_full_disk():
    import torch

    torch.save({"w": torch.zeros(1000)}, _FullDisk())  # RuntimeError "unexpected pos", the OSError its context


def _raise(e: BaseException):
    def command():
        raise e

    return command


def _copy_into_a_full_cache(tmp):
    """shutil.copy (streaming's copy of a local dataset's file into data.cache_dir) on a full disk: its
    OSError names the source as ``filename`` and the target as ``filename2``."""

    def command():
        import shutil
        from unittest import mock

        (tmp / "data").mkdir()
        (tmp / "data" / "index.json").write_text("{}" * 100)
        (tmp / "cache").mkdir()

        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        with mock.patch("os.sendfile", full), mock.patch("shutil._USE_CP_SENDFILE", True):
            shutil.copy(tmp / "data" / "index.json", tmp / "cache" / "index.json.tmp")

    return command


def test_a_full_target_of_a_copy_is_named_not_its_source(capsys, tmp_path):
    """data.cache_dir on a full disk was "mnemo: error: .../data/base/index.json: No space left on device",
    the dataset's own file: the copy's target (in the cache folder) is named now; a refused path, both."""
    from mnemo.train.errors import exit_status

    assert exit_status(_copy_into_a_full_cache(tmp_path)) == 2
    assert capsys.readouterr().err == f"mnemo: error: {tmp_path}/cache/index.json.tmp: No space left on device\n"
    for code, line in ((errno.EROFS, "b: Read-only file system"), (errno.EACCES, "a -> b: Permission denied")):
        assert exit_status(_raise(OSError(code, os.strerror(code), "a", None, "b"))) == 2
        assert capsys.readouterr().err == f"mnemo: error: {line}\n"


@pytest.mark.parametrize(
    "command, line",
    [
        (_raise(OSError(errno.ENOSPC, "No space left on device", "run/x.json")), "run/x.json: No space left on device"),
        (_raise(OSError(errno.EDQUOT, "Disk quota exceeded", "p/a.png")), "p/a.png: Disk quota exceeded"),
        (_raise(OSError(errno.EROFS, "Read-only file system", "out/m")), "out/m: Read-only file system"),
        (_raise(PermissionError(errno.EACCES, "Permission denied", "out/m")), "out/m: Permission denied"),
        (_raise(OSError(errno.ENOSPC, "No space left on device")), "No space left on device"),
        (_torch_save_on_a_full_disk, "No space left on device"),
    ],
)
def test_a_full_disk_is_one_line_not_a_traceback(capsys, command, line):
    """A full disk (quota, read-only file system) in any command was a traceback (torch.save's "unexpected
    pos" RuntimeError chained from the OSError, atomic_write's OSError after a whole evaluation); now one line,
    status 2, as prepare's DataError for the same."""
    from mnemo.train.errors import exit_status

    assert exit_status(command) == 2
    assert capsys.readouterr().err == f"mnemo: error: {line}\n"


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EIO, "Input/output error", "x"),  # not the machine's state: left as it was
        PermissionError(errno.EPERM, "Operation not permitted"),  # no path: e.g. a signal to another's process
        ValueError("a bug"),
    ],
)
def test_other_errors_are_not_taken_for_a_full_disk(error, capsys):
    from mnemo.train.errors import exit_status

    assert exit_status(_raise(error)) == 1  # a bug's traceback, not a one-line user error
    assert capsys.readouterr().err.startswith("Traceback (most recent call last):\n")


def _under_a_limit(limit: str, value: int, body: str) -> subprocess.CompletedProcess:
    """``body`` run as a command of exit_status in a Python whose soft ``resource.LIMIT`` is ``value``."""
    code = (
        "import os, resource, sys\n"
        "from mnemo.train.errors import exit_status\n"
        "def command():\n"
        f"    resource.setrlimit(resource.{limit}, ({value}, resource.getrlimit(resource.{limit})[1]))\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "sys.exit(exit_status(command))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_file_over_the_size_limit_is_one_line_not_a_traceback(tmp_path):
    """`ulimit -f`: a checkpoint's torch.save ("unexpected pos", no OSError chained), an export's safetensors
    ("File too large (os error 27)") and eval's --json (OSError EFBIG) were tracebacks, exit 1, where a full
    disk is one line: the file system's numbers do not show a per-process limit."""
    torch_save = (
        "import torch\nfrom mnemo.train.errors import write_errors\n"
        f"with write_errors('checkpoint of step 2', {str(tmp_path)!r}, hidden=(RuntimeError,)):\n"
        f"    torch.save({{'w': torch.zeros(100_000)}}, {str(tmp_path / 'rank.pt')!r})"
    )
    done = _under_a_limit("RLIMIT_FSIZE", 65536, torch_save)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"mnemo: error: checkpoint of step 2: {tmp_path}: File too large (this process writes files of at most"
        " 65,536 bytes: ulimit -f)\n"
    )
    json_out = tmp_path / "e.json"
    atomic = f"from mnemo.data_pipeline.files import atomic_write\natomic_write({str(json_out)!r}, b'x' * 100_000)"
    done = _under_a_limit("RLIMIT_FSIZE", 65536, atomic)
    assert done.returncode == 2 and done.stderr == f"mnemo: error: {json_out}: File too large\n", done.stderr


def _emfile_line(soft: int) -> str:
    """The line for open files run out at soft limit ``soft`` under this machine's hard limit."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    most = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    limit = f"ulimit -n is {soft}; raise it, up to its hard limit {most}: ulimit -n {most}"
    return f"mnemo: error: too many open files ({limit})\n"


def test_too_many_open_files_is_one_line_naming_ulimit_n():
    """`ulimit -n 64` with 4 data.sources: streaming's shared memory raised EMFILE, a traceback; prepare's
    os.pipe() at `ulimit -n 16` too. Now one line, status 2, that names the limit."""
    opened = "files = [open(os.devnull) for _ in range(100)]"
    wrapped = "try:\n    os.pipe()\nexcept OSError as e:\n    raise RuntimeError('shared memory') from e"
    for body in (opened, "files = [open(os.devnull) for _ in range(100)]\n" + wrapped):
        done = _under_a_limit("RLIMIT_NOFILE", 32, body)
        assert done.returncode == 2 and done.stderr == _emfile_line(32)
    # Where the soft limit is the hard one, the hard one is what to raise (before: "raise it" either way; and
    # where mnemo had raised the soft one only so far, the user's hard limit was higher than the one named).
    done = _under_a_limit("RLIMIT_NOFILE", 32, "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n" + opened)
    line = "mnemo: error: too many open files (ulimit -n is 32, its hard limit too; raise the hard limit (ulimit -Hn))"
    assert done.returncode == 2 and done.stderr == line + "\n", done.stderr


def _nofile(soft: int, hard: int | None = None):
    """A preexec_fn: the child's open-files limit (``ulimit -n``) ``soft``, and ``hard`` where given."""
    import resource

    def limit():
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard is None else hard)
        )

    return limit


def test_the_cli_raises_a_low_open_files_limit_toward_its_hard_one():
    """`ulimit -n 16; mnemo train`: c10d's store client retried for 600 s on EMFILE (24: a gloo traceback). The
    mnemo command raises its soft limit to min(hard, 4096), which what it starts inherits; the hard one stays."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    code = (
        "import resource, sys\n"
        "from mnemo import cli\n"
        "sys.argv = ['mnemo', 'data', 'verify', '/nonexistent']\n"
        "rc = cli.main()\n"
        "print(rc, *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONUTF8": "1"}
    for soft, cap, want in ((16, None, min(hard, 4096)), (16, 64, 64)):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            preexec_fn=_nofile(soft, cap),
        )
        assert done.stdout.split() == ["2", str(want), str(hard if cap is None else cap)], done.stderr


@pytest.mark.parametrize(
    "args,need",
    [
        (["train", "configs/debug.yaml"], "a run needs at least 64"),
        (["launch", "configs/debug.yaml", "--nproc-per-node", "2"], "a run of 2 ranks needs at least 144"),
    ],
)
def test_a_hard_open_files_limit_below_what_a_run_needs_is_one_line_before_starting(tmp_path, args, need):
    """`ulimit -n 16` (soft and hard): the CLI cannot raise it, and the run hung in c10d's store for 600 s; now one
    line naming `ulimit -n` before anything starts."""
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-m", "mnemo", *args, f"run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        preexec_fn=_nofile(16, 16),
    )
    assert_one_line_error(res, "ulimit -n is 16 (its hard limit, ulimit -Hn, is 16)", need, "raise the hard limit")
    assert not (tmp_path / "run").exists()


def test_a_run_of_many_ranks_raises_the_soft_limit_past_4096_where_the_hard_one_allows():
    body = "from mnemo.train.rankenv import check_open_files, open_files_needed\ncheck_open_files(200)\n"
    body += "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0] == open_files_needed(200) > 4096)"
    done = _under_a_limit("RLIMIT_NOFILE", 4096, body)
    assert done.returncode == 0 and done.stdout == "True\n", done.stderr


def test_too_many_open_files_in_a_cpp_librarys_words_is_the_same_line():
    """`ulimit -n 24; mnemo train`: gloo's RuntimeError "[enforce fail at .../loop.cc:48] ... pipe: Too many open
    files" (no errno, the words only) was a traceback; ENFILE's words, which hold EMFILE's, keep their own line."""
    gloo = "[enforce fail at gloo/transport/tcp/loop.cc:48] rv != -1. -1 vs -1. pipe: Too many open files"
    done = _under_a_limit("RLIMIT_NOFILE", 32, f"raise RuntimeError({gloo!r})")
    assert done.returncode == 2 and done.stderr == _emfile_line(32)
    done = _under_a_limit("RLIMIT_NOFILE", 32, "raise RuntimeError('socket: Too many open files in system')")
    assert done.returncode == 2, done.stderr
    assert "(its limit, sysctl fs.file-max, is reached)" in done.stderr


def test_a_library_that_cannot_be_mapped_under_ulimit_v_is_one_line():
    """`ulimit -v 2000000; mnemo data verify D` (prepare, eval, export at 1-3 GB): importing torch was the loader's
    ImportError "libtorch_cpu.so: failed to map segment from shared object", a traceback. Now the line of
    `ulimit -v`, status 2; the same words without an address-space limit stay a traceback (not a limit)."""
    done = _under_a_limit("RLIMIT_AS", 1 << 30, "import torch")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("mnemo: error: out of host memory (libtorch"), done.stderr
    assert done.stderr.endswith(
        "failed to map segment from shared object): ulimit -v is 1048576 (KiB); raise it, or free memory\n"
    )
    unlimited = "raise ImportError('libx.so: failed to map segment from shared object')"
    done = _under_a_limit("RLIMIT_AS", -1, unlimited)  # resource.RLIM_INFINITY
    assert done.returncode == 1 and "Traceback" in done.stderr, done.stderr


def test_no_memory_left_is_one_line_naming_ulimit_v():
    """`ulimit -v 4000000`: a MemoryError while DeepSpeed imported torch._inductor was a traceback."""
    done = _under_a_limit("RLIMIT_AS", 2 << 30, "b = bytearray(4 << 30)")
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr
        == "mnemo: error: out of host memory (MemoryError): ulimit -v is 2097152 (KiB); raise it, or free memory\n"
    )


def _fork_refused(monkeypatch):
    import multiprocessing

    def fork():  # os.fork under `ulimit -u`: its EAGAIN shows at the line that called fork, as this one's does
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # fork(2) refused

    monkeypatch.setattr(os, "fork", fork)
    multiprocessing.get_context("fork").Process(target=print).start()


def _thread_refused():
    raise RuntimeError("can't start new thread")


@pytest.mark.parametrize("command", [_thread_refused, _fork_refused])
def test_no_thread_or_process_to_be_had_is_one_line_naming_ulimit_u(capsys, monkeypatch, command):
    """`ulimit -u 20`: a DataLoader's thread that could not start (RuntimeError), `-u 4`: a fork refused with
    EAGAIN (BlockingIOError) were tracebacks; now one line, status 2, naming the limit."""
    import resource

    from mnemo.train.errors import exit_status

    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    shown = "unlimited" if soft == resource.RLIM_INFINITY else soft
    assert exit_status(lambda: command(monkeypatch) if command is _fork_refused else command()) == 2
    assert (
        capsys.readouterr().err == f"mnemo: error: cannot start a thread or process (ulimit -u is {shown}; raise it)\n"
    )


def test_a_cpp_thread_refused_under_ulimit_v_names_both_limits():
    """`ulimit -v 4000000; mnemo eval`: sentencepiece's encoding thread could not get its stack, and C++'s
    std::system_error came as RuntimeError "Resource temporarily unavailable", a traceback."""
    body = "resource.setrlimit(resource.RLIMIT_NPROC, (500, resource.getrlimit(resource.RLIMIT_NPROC)[1]))\n"
    body += "raise RuntimeError(os.strerror(11))"
    done = _under_a_limit("RLIMIT_AS", 2 << 30, body)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "mnemo: error: cannot start a thread or process "
        "(ulimit -u is 500, ulimit -v is 2097152 (KiB); raise the one that is low)\n"
    )


def test_a_non_blocking_read_that_would_block_is_not_taken_for_a_process_limit(capsys):
    from mnemo.train.errors import exit_status

    def command():
        r, w = os.pipe()
        os.set_blocking(r, False)
        try:
            os.read(r, 1)  # BlockingIOError EAGAIN: a bug of the reader, not the machine's limit
        finally:
            os.close(r)
            os.close(w)

    assert exit_status(command) == 1
    assert "BlockingIOError" in capsys.readouterr().err


def test_a_suppressed_context_is_not_taken_for_the_cause(capsys):
    from mnemo.train.errors import exit_status

    def command():
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise KeyError("a bug") from None

    assert exit_status(command) == 1
    assert capsys.readouterr().err.endswith("KeyError: 'a bug'\n")


def test_a_failed_atomic_write_names_its_file(tmp_path, monkeypatch):
    """A write or fsync error names no file: atomic_write names the target, so the one line says which."""
    from mnemo.data_pipeline.files import atomic_write

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as got:
        atomic_write(tmp_path / "e.json", b"{}")
    assert got.value.filename == str(tmp_path / "e.json")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["launch", "c.yaml", "--nproc-per-node", "x"],
            "argument --nproc-per-node: expected an integer in ASCII digits (at most 30), got 'x' "
            "(see: mnemo launch --help)",
        ),
        (["launch", "c.yaml", "--slurm", "--nodes", "abc", "--dry-run"], "(see: mnemo launch --help)"),
        (["train", "c.yaml", "--x"], "unrecognized arguments: --x (see: mnemo train --help)"),
        (["eval", "ckpt", "--data", "d", "--bogus"], "unrecognized arguments: --bogus (see: mnemo eval --help)"),
        (["data", "verify", "d", "--nope"], "unrecognized arguments: --nope (see: mnemo data verify --help)"),
    ],
)
def test_argparse_errors_are_one_line_naming_the_command(capsys, argv, line):
    """Before: mnemo launch printed argparse's usage block (its parser class replaced the one-line one), and an
    unknown flag after a command pointed at `mnemo --help` (the top parser reported the leftovers)."""
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("mnemo: error: ") and line in err, err


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["train", "c.yaml", "--tracking-uri", "http://alice:SECH1@mlflow.example:5000"],
            "unrecognized arguments: --tracking-uri http://***@mlflow.example:5000 (see: mnemo train --help)",
        ),
        (
            ["launch", "c.yaml", "--master-port", "http://u:SECF1@h"],
            "argument --master-port: expected an integer in ASCII digits (at most 30), got 'http://***@h' "
            "(see: mnemo launch --help)",
        ),
        (["train", "c.yaml", "--x", "a\nb"], "unrecognized arguments: --x a\\nb (see: mnemo train --help)"),
    ],
)
def test_argparse_errors_hide_credentials_and_stay_on_one_line(capsys, argv, line):
    """Before: argparse's message quoted the arguments as given, a URI's password (and a newline) included."""
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"mnemo: error: {line}\n", err
    assert "SEC" not in err


@pytest.mark.parametrize(
    "argv, line",
    [
        # (a URL as --data is refused as remote before any path is made of it; still redacted)
        (["eval", "run1", "--data", "https://alice:SECP1@data.example/ds"], "--data 'https://***@data.example/ds': a"),
        (["train", "https://alice:SECP2@cfg.example/debug.yaml"], "config file not found: https:/***@cfg.example"),
        (["generate", "run1", "--prompt-file", "https://alice:SECP3@x.example/p"], "--prompt-file: https:/***@x."),
    ],
)
def test_a_uri_that_pathlib_took_a_slash_from_is_shown_redacted(tmp_path, monkeypatch, capsys, argv, line):
    """Before: Path("https://u:p@h/x") is https:/u:p@h/x, which redact_uri did not take for a URI."""
    from mnemo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("run:\n  dir: r\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnemo: error: ") and line in err and "SECP" not in err, err


@pytest.mark.parametrize(
    "argv, line",
    [
        # a message that quotes the part after the scheme's ':' (parse_tasks splits a task at ':')
        (["train", "c.yaml", "eval.tasks=[http://alice:SECT1@h]"], "'//***@h' is not a new param=value of http"),
        (["train", "c.yaml", "train.passkey.tasks=[http://SECT2@h]"], "'//***@h' is not a new param=value"),
        # a token-only userinfo after pathlib took a slash
        (["eval", "run1", "--data", "https://SECT3@h/x"], "--data 'https://***@h/x': a remote dataset"),
        # three slashes: the authority is empty, the userinfo follows
        (["export", "run1", "--out", "s3:///alice:SECT4@bucket/x"], "--out s3:///***@bucket/x: a local folder"),
        (["train", "c.yaml", "run.dir=s3:///alice:SECT5@bucket/x"], "run.dir: s3:///***@bucket/x: a local folder"),
    ],
)
def test_a_userinfo_without_its_scheme_after_a_lost_or_extra_slash_is_shown_redacted(
    tmp_path, monkeypatch, capsys, argv, line
):
    """Before: redact_uri took only scheme://userinfo@ and scheme:/user:pass@ for credentials, so each of
    these printed its password or token."""
    from mnemo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "c.yaml").write_text("data:\n  path: data\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnemo: error: ") and line in err and "SECT" not in err, err


def test_a_hostfile_uri_is_shown_redacted(capsys):
    from mnemo.launch.hostfile import parse_hostfile
    from mnemo.train.errors import exit_status

    assert exit_status(lambda: parse_hostfile("https://alice:SECP4@x.example/hosts")) == 2
    assert capsys.readouterr().err == "mnemo: error: hostfile not found: https:/***@x.example/hosts\n"


@pytest.mark.parametrize("user, rc, debug", [(True, 2, True), (False, 1, True), (False, 1, False)])
def test_debug_prints_the_traceback_with_credentials_hidden(capsys, user, rc, debug):
    """Before: --debug (and MNEMO_DEBUG=1 on the ranks) re-raised, and Python printed the URI's password; so
    did a bug's traceback without --debug (a ValueError quoting a tracking.uri)."""
    from mnemo.train.errors import UserError, exit_status

    error = UserError if user else ValueError

    def command():
        raise error("https://alice:SECD9@models.example/ck: not a mnemo checkpoint")

    assert exit_status(command, debug=debug) == rc
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n") and "in command\n" in err, err
    assert err.endswith(f"{error.__name__}: https://***@models.example/ck: not a mnemo checkpoint\n"), err
    assert "SECD9" not in err


def test_a_threads_error_and_the_mlflow_senders_are_printed_with_credentials_hidden(capsys, monkeypatch):
    """Python (a thread's uncaught error) and multiprocessing (the MLflow sender process's) print tracebacks
    themselves, as they are: a tracking.uri's password quoted in the error was shown. Both go through the
    redaction of the CLI's own traceback now."""
    import threading

    import mnemo.train.tracking.sender as sender_mod
    from mnemo.train.errors import exit_status

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)

    def fail():
        raise RuntimeError("cannot reach https://alice:SECT1@mlflow.example/")

    def command():
        t = threading.Thread(target=fail, name="reader")
        t.start()
        t.join()
        return 0

    assert exit_status(command) == 0
    err = capsys.readouterr().err
    assert err.startswith("Exception in thread reader:\nTraceback") and "in fail\n" in err, err
    assert err.endswith("RuntimeError: cannot reach https://***@mlflow.example/\n") and "SECT1" not in err, err

    class Broken:
        def __init__(self, settings, emit):
            raise ValueError(f"bad store {settings['uri']}")

    monkeypatch.setattr(sender_mod, "_Sender", Broken)
    monkeypatch.setattr(sender_mod, "quiet_url_printing", lambda uri: None)
    monkeypatch.setattr(sender_mod.signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as e:
        sender_mod.sender_main({"uri": "https://alice:SECT2@mlflow.example/"}, None, None)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("mnemo: the MLflow sender failed:\nTraceback") and "SECT2" not in err, err
    assert err.endswith("ValueError: bad store https://***@mlflow.example/\n"), err


@pytest.mark.parametrize(
    "argv, line",
    [
        (["export", "run1", "--out", "s3://u:SECB6@b/x"], "--out s3://***@b/x: a local folder is needed"),
        (["tokenizer", "train", "--input", "c", "--vocab-size", "320", "--out", "https://u:SECB7@h/x"], "a local file"),
        (["eval", "run1", "--data", "d", "--json", "s3://u:SECB8@b/r.json"], "--json: s3://***@b/r.json: a local file"),
        (["eval", "run1", "--data", "d", "--plots", "gs://u:SECB9@b/p"], "--plots: gs://***@b/p: a local folder"),
        (["eval", "run1", "--data", "d", "--plots", "file:///tmp/p"], "--plots: file:///tmp/p: a file:// URL"),
        # file:/x is a file URL wherever a dataset path is read (is_file_url); as an output it made a folder "file:".
        (["train", "c.yaml", "run.dir=file:/tmp/r"], "run.dir: file:/tmp/r: a file:// URL"),
        (["export", "run1", "--out", "file:x"], "--out file:x: a file:// URL"),
        (["train", "c.yaml", "run.dir=https://u:SECC1@h/run"], "run.dir: https://***@h/run: a local folder"),
        (["train", "c.yaml", "data.cache_dir=s3://u:SECC2@h/c"], "data.cache_dir: s3://***@h/c: a local folder"),
        # A slash lost (as pathlib writes s3://): still a URL with credentials, not a folder named s3:.
        (["export", "run1", "--out", "s3:/u:SECC3@b/x"], "--out s3:/***@b/x: looks like a URL with credentials"),
        (
            ["tokenizer", "train", "--input", "c", "--vocab-size", "320", "--out", "s3:/u:SEC/C4@b/t.model"],
            "a local file",
        ),
        (["eval", "run1", "--data", "d", "--json", "https:/u:SECC5@h/r.json"], "--json: https:/***@h/r.json: looks"),
        (["train", "c.yaml", "data.cache_dir=s3:/u:SECC6@h/c"], "data.cache_dir: s3:/***@h/c: looks like a URL"),
        # Any path redact_uri would change (Before: a local folder with the password in its name, exit 0):
        # no slash, a URL after a path prefix, a query token; the one rule of what is a credential.
        (["export", "run1", "--out", "s3:alice:SECC7@bucket/x"], "--out s3:***@bucket/x: looks like a URL"),
        (["export", "run1", "--out", "./s3://alice:SECC8@bucket/x"], "--out ./s3://***@bucket/x: looks like"),
        (["export", "run1", "--out", "out/s3://alice:SECC9@b/x"], "--out out/s3://***@b/x: looks like a URL"),
        (["eval", "run1", "--data", "d", "--json", "r/x?token=SECD1"], "--json: r/x?token=*** looks like a URL"),
        (["train", "c.yaml", "run.dir=out/s3://alice:SECD2@b/x"], "run.dir: out/s3://***@b/x: looks like a URL"),
        # URL schemes are case-insensitive: these made local folders "FILE:", "File:" and "hdfs:".
        (["eval", "run1", "--data", "d", "--json", "FILE:ev3.json"], "--json: FILE:ev3.json: a file:// URL"),
        (["export", "run1", "--out", "FILE:exq"], "--out FILE:exq: a file:// URL"),
        (["train", "c.yaml", "run.dir=File:rq"], "run.dir: File:rq: a file:// URL"),
        (["eval", "run1", "--data", "d", "--json", "hdfs:/x.json"], "--json: hdfs:/x.json: looks like a URL"),
        (["export", "run1", "--out", "S3:/bucket/x"], "--out S3:/bucket/x: looks like a URL"),
        (["train", "c.yaml", "data.cache_dir=DBFS:/c"], "data.cache_dir: DBFS:/c: a local folder is needed"),
    ],
)
def test_an_output_path_with_a_url_scheme_is_refused_not_made_a_local_folder(tmp_path, monkeypatch, capsys, argv, line):
    """Before: each made a local folder named after the URL (s3:/u:SECB6@b/x), and printed it."""
    from mnemo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "c.yaml").write_text("data:\n  path: data\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnemo: error: ") and line in err and "SEC" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "data"]


def test_a_stdout_that_cannot_encode_a_character_gets_an_escape_not_a_traceback(tmp_path):
    # PYTHONIOENCODING=ascii (or a C locale without UTF-8 mode): a success line naming t\xf6k.model was a
    # UnicodeEncodeError after the work was done (exit 1); so was a rank's first line.
    (tmp_path / "c.txt").write_text("".join(f"line {i} caf\u00e9 na\u00efve \u00fcber {i * 7}\n" for i in range(300)))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "ascii"}
    out = tmp_path / "t\u00f6k.model"
    res = subprocess.run(
        [sys.executable, "-m", "mnemo", "tokenizer", "train", "--input", "c.txt", "--vocab-size", "300", "--out", out],
        cwd=tmp_path,
        capture_output=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.startswith(f"wrote {tmp_path}/t\\xf6k.model: 300 pieces".encode()), res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "mnemo.launch.worker"], capture_output=True, env={**env, "MNEMO_NODE_RANK": "\u00e9"}
    )
    assert res.returncode == 2 and res.stdout.startswith(b"mnemo worker: node \\xe9/1"), res.stderr.decode()


def test_a_locale_that_is_not_utf8_reads_the_command_line_as_utf8(tmp_path):
    # LC_ALL=C PYTHONUTF8=0: Python decoded argv as ASCII, so data.path=dC\u00e9 was "not valid UTF-8 (rename it)"
    # and --text-field t\u00ebxt silently matched nothing. mnemo now runs itself again in UTF-8 mode.
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "LC_ALL": "C", "PYTHONUTF8": "0"}
    missing = tmp_path / "dC\u00e9"
    res = subprocess.run(
        [sys.executable, "-m", "mnemo", "data", "verify", str(missing)], capture_output=True, env=env, timeout=120
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.decode() == f"mnemo: error: no such directory: {missing}\n"


def test_the_utf8_restart_happens_once(monkeypatch):
    import types

    from mnemo import cli

    started = []
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(utf8_mode=0))
    monkeypatch.setattr(sys, "getfilesystemencoding", lambda: "ascii")
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((argv, env["PYTHONUTF8"])))
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "mnemo", "data", "verify", "x"])
    monkeypatch.setenv("PYTHONUTF8", "0")
    cli.utf8_mode_or_reexec()
    assert started == [([sys.executable, "-m", "mnemo", "data", "verify", "x"], "1")]
    monkeypatch.setenv("PYTHONUTF8", "1")  # the restarted process, were it still without UTF-8 mode
    cli.utf8_mode_or_reexec()
    assert len(started) == 1


def test_a_reader_that_leaves_the_pipe_early_ends_the_command_quietly(tmp_path, capsys):
    """`mnemo data inspect D | head` ended in a BrokenPipeError traceback (and Python's own 'Exception
    ignored' at exit). Now it is quiet, status 128 + SIGPIPE as a Unix tool's; a broken pipe that is not
    stdout's (a socket) is still an error."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys\nfrom mnemo.train.errors import exit_status\n"
        "def run():\n    for _ in range(2000):\n        print('x' * 1000)\n"
        "sys.exit(exit_status(run))\n"
    )
    p = subprocess.run(
        f'{sys.executable} -c "$CODE" | head -c 10 > /dev/null; echo "${{PIPESTATUS[0]}}" >&2',
        shell=True,
        executable="/bin/bash",
        env={**os.environ, "CODE": code},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.stderr.strip() == str(128 + signal.SIGPIPE), p.stderr
    from mnemo.train.errors import exit_status

    def socket_broke():
        raise BrokenPipeError(32, "Broken pipe")

    assert exit_status(socket_broke) == 1
    assert capsys.readouterr().err.endswith("BrokenPipeError: [Errno 32] Broken pipe\n")


def test_the_export_line_escapes_the_control_characters_of_its_name(monkeypatch, capsys):
    """`mnemo export RUN --out $'e\\x1b[31mRED'` printed the escape sequence raw; `--out $'ex\\xff'` printed a
    surrogate (`exported to ex\\udcff`) that strict UTF-8 stdout cannot encode."""
    import mnemo.train.export as export_mod
    from mnemo.cli import main

    out = Path("e\x1b[31mRED\n" + os.fsdecode(b"\xff"))
    monkeypatch.setattr(export_mod, "export", lambda *a, **kw: out)
    assert main(["export", "RUN", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line == "exported to e\\x1b[31mRED\\n\\xff\n", line
    line.encode("utf-8")


def test_local_output_names_with_a_colon_are_no_url():
    from mnemo.data_pipeline.paths import remote_output_problem

    names = (
        "runs/a:b",
        "ex:1",
        "t:v.model",
        "mydata:v1",
        "a:b.json",
        "a:/b@c",
        "x:/y:z",
        "./s3:/u:p@b",
        "notes:v1.json",
    )
    for name in names:
        assert remote_output_problem(name) is None, name


def test_the_pythons_a_command_starts_leave_the_working_directory_off_their_path(tmp_path):
    """`mnemo train` started multiprocessing's resource tracker and a spawned child (`python -c ...`, the working
    directory first on sys.path): a multiprocessing.py where the user typed the command ran in both. The CLI now
    sets PYTHONSAFEPATH=1 for every process it starts."""
    (tmp_path / "multiprocessing.py").write_text("open('PWNED', 'w').close()\n")
    code = (
        "import subprocess, sys\n"
        "sys.argv = ['mnemo', 'data', 'verify', 'no-such-dataset']\n"
        "from mnemo.cli import main\n"
        "main()\n"
    )
    child = "import multiprocessing.resource_tracker"  # what the tracker's `python -c` imports first
    code += f"subprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    p = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "no-such-dataset" in p.stderr, p.stderr
    assert not (tmp_path / "PWNED").exists()


def test_a_hard_open_files_limit_below_a_large_jobs_extrapolated_need_is_a_warning_not_a_refusal():
    """The per-peer figure is measured at 2 ranks: a 300-rank job under `ulimit -Hn 4096` is warned, not refused."""
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))\n"
        "from mnemo.train.rankenv import check_open_files\n"
        "check_open_files(300)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "(4096, 4096)\n", done.stderr
    assert done.stderr.startswith("mnemo: warning: ulimit -Hn is 4096; a run of 300 ranks may need about "), done.stderr


@pytest.mark.parametrize("rank", ["0", "5"])
def test_only_rank_0_of_a_job_warns_of_its_open_files(tmp_path, rank):
    """Was: every rank printed the extrapolated warning (64 ranks: 65 copies with the launcher's). Every rank still
    raises its soft limit; rank 0 alone says so (the launcher warns for its node)."""
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))\n"
        "from mnemo.train.entry import run_train\n"
        "from mnemo.train.errors import UserError\n"
        "try:\n"
        f"    run_train({str(tmp_path / 'missing.yaml')!r}, [])\n"
        "except UserError:\n"
        "    print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    env = dict(os.environ, WORLD_SIZE="300", RANK=rank, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    env["TORCHELASTIC_RUN_ID"] = "test"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and done.stdout == "(4096, 4096)\n", done.stderr
    warned = "mnemo: warning: ulimit -Hn is 4096; a run of 300 ranks may need about " in done.stderr
    assert warned == (rank == "0"), done.stderr


def test_a_rank_whose_peer_left_says_so_in_one_line(capsys):
    """A rank failing on one node made every other rank print a 30-line gloo traceback ("Connection closed by
    peer") under its own one-line error. The others now say in one line that another rank stopped; exit 1."""
    from mnemo.train.errors import exit_status

    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.3]:36514"

    def command():
        try:
            raise RuntimeError(gloo)
        except RuntimeError as e:
            raise RuntimeError("streaming barrier failed") from e

    assert exit_status(command) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnemo: error: another rank of this job stopped (Connection"), err
    assert "pair.cc:534] Connection closed by peer" in err
    # Any other RuntimeError is still a bug's traceback.
    assert exit_status(lambda: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))) == 1
    assert capsys.readouterr().err.startswith("Traceback (most recent call last):")


def test_a_ctrl_c_a_library_turned_into_its_own_error_is_an_interrupt(capsys):
    """A second Ctrl-C inside a checkpoint's torch.save: its zip writer finishes the file while the
    KeyboardInterrupt unwinds and raises RuntimeError("unexpected pos ...") with the interrupt as its context:
    a traceback and exit 1 ("a bug"). It is `mnemo: interrupted`, 130."""
    from mnemo.train.errors import exit_status

    def command():
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 338688 vs 338576")

    assert exit_status(command) == 130
    assert capsys.readouterr().err == "mnemo: interrupted\n"


def test_a_ctrl_c_while_the_process_shuts_down_ends_it_quietly(tmp_path):
    """A second Ctrl-C that landed in Python's shutdown (a process pool's threads joined, a library's exit hook)
    printed "Exception ignored ... KeyboardInterrupt" with a traceback after `mnemo: interrupted`. The command is
    over by then: the process ends at once, status 130, nothing more printed."""
    code = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))  # a late Ctrl-C\n"
        "from mnemo import cli\n"
        "sys.exit(cli.main())\n"
    )
    cmd = [sys.executable, "-X", "utf8", "-c", code, "data", "inspect", str(tmp_path / "none")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 130 and p.stderr.startswith("mnemo: error: ") and p.stderr.count("\n") == 1, p.stderr


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["tokenizer", "train", "--input", "c.txt", "~/c2.txt", "--vocab-size", "300", "--out", "t.model"], "--input"),
        (["tokenizer", "train", "--input", "c.txt", "--vocab-size", "300", "--out", "~/t.model"], "--out"),
        (["prepare", "--input", "~/c.txt", "--out", "d"], "--input"),
        (["prepare", "--input", "c.txt", "--out=~/d"], "--out"),
        (["prepare", "--input", "c.txt", "--out", "d", "--tokenizer", "~/t.model"], "--tokenizer"),
        (["data", "verify", "~/d"], "DATA_DIR"),
        (["data", "inspect", "d", "~/d"], "DATA_DIR"),
        (["train", "~/c.yaml"], "config"),
        (["export", "~/ckpt", "--out", "e"], "checkpoint"),
        (["export", "ckpt", "--out", "~/x"], "--out"),
        (["eval", "~/ckpt", "--data", "d"], "checkpoint"),
        (["eval", "ckpt", "--data", "~/x"], "--data"),
        (["eval", "ckpt", "--data", "d", "--json", "~/x"], "--json"),
        (["eval", "ckpt", "--data", "d", "--plots", "~/x"], "--plots"),
        (["eval", "ckpt", "--data", "d", "--baseline", "~/x"], "--baseline"),
        (["eval", "ckpt", "--lm-eval", "hellaswag", "--lm-eval-include", "~/x"], "--lm-eval-include"),
        (["generate", "~/ckpt", "--prompt-file", "p.txt"], "checkpoint"),
        (["generate", "ckpt", "--prompt-file", "~/x"], "--prompt-file"),
        (["launch", "~/c.yaml", "--dry-run"], "config"),
        (["launch", "c.yaml", "--hostfile", "~/x", "--dry-run"], "--hostfile"),
    ],
)
def test_a_path_argument_starting_with_a_tilde_is_refused_by_every_command(argv, flag, capsys, tmp_path, monkeypatch):
    """Before: `prepare --out '~/d'` wrote $HOME/d while `export --out '~/x'` (and tokenizer train --out, eval
    --json/--plots) wrote ./~/x, both saying "wrote ~/x"; reads were mixed too. Every path argument now gets
    the one rule of the config path keys: one line naming the flag and the expanded path to write instead."""
    from mnemo.cli import main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    home = tmp_path / "home"
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert (
        err.startswith(f"mnemo: error: argument {flag}: ~/") and "starts with '~', which mnemo does not expand" in err
    )
    assert f"write the full path, such as {home}/" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no ./~ folder


def test_a_tilde_inside_a_path_or_of_an_unknown_user_is_not_expanded(capsys, tmp_path, monkeypatch):
    """Only a leading ~ or ~user is the shell's; `a~/b` is a name. `~nobody-such/x` has no expansion to give."""
    from mnemo.commands import path_arg

    assert path_arg("a~/b") == "a~/b" and path_arg("./~x") == "./~x"
    with pytest.raises(
        argparse.ArgumentTypeError, match=r"^~no-such-user-xyz/x starts with '~no-such-user-xyz'.*full path$"
    ):
        path_arg("~no-such-user-xyz/x")


@pytest.mark.parametrize(
    "args",
    [
        ["prepare", "--input", str(REPO / "README.md"), "--out", "d", "--workers", "1"],
        ["train", str(REPO / "configs" / "debug.yaml")],
        ["launch", str(REPO / "configs" / "debug.yaml"), "--slurm", "--dry-run"],
        ["data", "verify", "d"],
    ],
)
def test_a_deleted_working_directory_is_one_line_saying_so(tmp_path, args):
    """Before: `mkdir g; cd g; rmdir ../g; mnemo prepare --out d ...` (or launch --slurm --dry-run) printed
    `mnemo: error: [Errno 2] No such file or directory`, naming no path; train, export and eval died inside
    torch's import. The CLI checks the working directory once, before any command's work."""
    gone = tmp_path / "g"
    gone.mkdir()
    res = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && shift && exec "$@"', "sh", str(gone), sys.executable, "-m", "mnemo"]
        + args,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    assert_one_line_error(res, "the working directory no longer exists", "cd to a directory that exists")
    assert list(tmp_path.iterdir()) == []
