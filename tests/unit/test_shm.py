"""Shared memory leaked by a killed job of this run is released; no other job's is touched.

A job killed with its whole process group (SIGKILL to a launcher's group takes
Python's resource tracker with it) leaves streaming's ``NNNNNN_*`` segments in
/dev/shm and its lock files in the temp folder. The trainer releases those whose
registered local folder lies in its own run directory; a live reader of another
folder (an evaluation, another user's job) must keep its segments and keep working.
"""

from __future__ import annotations

import multiprocessing
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mnemo.data_pipeline.shm import SHM_DIR, registered_locals, release_stale_shm

needs_shm = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm (POSIX shared memory not visible)")


def _reader(remote: str, local: str, ready) -> None:
    """A job reading a dataset cached in ``local``: registers it, reads a shard, then waits to be killed."""
    from streaming import StreamingDataset

    ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
    ds[0]  # reads a shard: its lock files are made
    ready.send(ds.num_samples)
    time.sleep(300)


def _write_mds(root: Path, n: int = 30) -> None:
    from streaming import MDSWriter

    with MDSWriter(out=str(root), columns={"tokens": "ndarray:uint16"}, size_limit=4096) as w:
        for i in range(n):
            w.write({"tokens": np.arange(i + 5, dtype=np.uint16)})


def _segments_naming(folder: Path) -> set[str]:
    """Prefixes whose NNNNNN_locals registers ``folder``."""
    out = set()
    for e in SHM_DIR.iterdir():
        if e.name.endswith("_locals"):
            try:
                if str(folder) in registered_locals(e.read_bytes()):
                    out.add(e.name.split("_")[0])
            except OSError:
                pass
    return out


def test_registered_locals_reads_streamings_layout_and_refuses_malformed_bytes():
    text = "/a/b\0/c d\0" + "17"
    data = struct.pack("=i", 4 + len(text.encode())) + text.encode() + b"\0\0\0"  # segments round up in size
    assert registered_locals(data) == ["/a/b", "/c d"]
    assert registered_locals(b"") == []
    assert registered_locals(struct.pack("=i", 999) + b"x") == []  # size past the end
    assert registered_locals(struct.pack("=i", 6) + b"\xff\xfe") == []  # not UTF-8


@needs_shm
def test_killed_jobs_leak_is_released_and_a_live_readers_segments_are_not(tmp_path):
    from streaming import StreamingDataset

    mds = tmp_path / "mds"
    _write_mds(mds)
    run_cache = (tmp_path / "run" / "data_cache").resolve()
    other = (tmp_path / "eval_cache").resolve()

    # A live reader of another cache folder, in this process.
    live = StreamingDataset(remote=str(mds), local=str(other), shuffle=False, batch_size=1)
    live_prefixes = _segments_naming(other)
    assert live_prefixes

    # The killed job, forked (streaming is imported here already). SIGKILL leaves its segments: the resource
    # tracker that could unlink them is this process's, which outlives the test (a killed launcher's process
    # group takes its own tracker with it).
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_reader, args=(str(mds), str(run_cache), send))
    p.start()
    try:
        assert recv.poll(120) and recv.recv() == 30
    finally:
        p.kill()
        p.join()
    (leaked,) = _segments_naming(run_cache)
    assert (Path(tempfile.gettempdir()) / f"{leaked}_cache_filelock").exists()

    # Owning only the run directory's cache: the live reader's folder is not released.
    removed = release_stale_shm(run_cache)
    assert f"{leaked}_locals" in removed and f"{leaked}_cache_filelock" in removed
    assert all(name.startswith(leaked + "_") for name in removed)
    assert _segments_naming(run_cache) == set()
    assert not list(SHM_DIR.glob(f"{leaked}_*"))
    assert _segments_naming(other) == live_prefixes
    assert int(np.asarray(live[3]["tokens"]).sum()) == sum(range(8))  # still reads

    # Nothing of ours is left: a second call releases nothing, and the cache opens again.
    assert release_stale_shm(run_cache) == []
    again = StreamingDataset(remote=str(mds), local=str(run_cache), shuffle=False, batch_size=1)
    assert again.num_samples == 30


def _registration(*folders: str, prefix: int = 0) -> bytes:
    text = "\0".join(folders) + f"\0{prefix}"
    return struct.pack("=i", 4 + len(text.encode())) + text.encode()


def test_only_registrations_wholly_inside_the_owned_folder_go(tmp_path, monkeypatch):
    """Folders elsewhere, mixed registrations, garbage and other names stay; the released prefix's temp-folder
    locks go with it."""
    shm, tmp, run = tmp_path / "shm", tmp_path / "tmp", tmp_path / "run"
    shm.mkdir(), tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    (shm / "000007_locals").write_bytes(_registration(str(run / "data_cache" / "a"), str(run / "data_cache")))
    (shm / "000007_barrier").write_bytes(b"x")
    (tmp / "000007_cache_filelock").write_bytes(b"")
    (shm / "000008_locals").write_bytes(_registration(str(run / "data_cache"), str(tmp_path / "other")))  # mixed
    (shm / "000009_locals").write_bytes(b"\xff" * 64)  # garbage
    (shm / "000010_locals").write_bytes(_registration(str(tmp_path / "run2" / "data_cache")))  # a sibling
    (shm / "000008_barrier").write_bytes(b"x")
    (shm / "psm_other").write_bytes(b"x")
    removed = release_stale_shm(run / "data_cache", shm_dir=shm)
    assert sorted(removed) == ["000007_barrier", "000007_cache_filelock", "000007_locals"]
    assert sorted(p.name for p in shm.iterdir()) == [
        "000008_barrier",
        "000008_locals",
        "000009_locals",
        "000010_locals",
        "psm_other",
    ]
    assert not (tmp / "000007_cache_filelock").exists()


class _FakeDataset:
    num_samples = 3
    samples_per_shard = [3]
    shards: list = []


def _streaming_racing(monkeypatch, fails: int) -> list[int]:
    """streaming.StreamingDataset whose first ``fails`` constructions lose the prefix race; returns the call count."""
    from mnemo.data_pipeline.lean_imports import import_streaming

    import_streaming()
    import streaming

    calls = [0]

    def make(**kw):
        calls[0] += 1
        if calls[0] <= fails:
            raise FileExistsError(17, "File exists", "/001472_locals")
        return _FakeDataset()

    monkeypatch.setattr(streaming, "StreamingDataset", make)
    return calls


def test_a_prefix_taken_at_the_same_moment_is_tried_again(monkeypatch, tmp_path):
    """Two jobs starting at once picked the same shared-memory prefix: the loser tries again (a raw
    FileExistsError traceback before)."""
    from mnemo.data_pipeline.streams import MDSSource

    calls = _streaming_racing(monkeypatch, fails=1)
    src = MDSSource(str(tmp_path))
    assert calls[0] == 2 and src.num_samples == 3


def test_a_prefix_always_taken_is_one_line_naming_the_key(monkeypatch, tmp_path):
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.shm import PREFIX_TRIES
    from mnemo.data_pipeline.streams import MDSSource

    calls = _streaming_racing(monkeypatch, fails=100)
    with pytest.raises(DataError) as e:
        MDSSource(str(tmp_path), key="data.sources[0].path")
    msg = str(e.value)
    assert calls[0] == PREFIX_TRIES and "\n" not in msg
    assert msg.startswith("data.sources[0].path: ") and "/001472_locals" in msg and "start this job again" in msg


def test_other_file_exists_errors_are_not_retried(monkeypatch):
    from mnemo.data_pipeline.shm import streaming_dataset

    calls = [0]

    def make():
        calls[0] += 1
        raise FileExistsError(17, "File exists", "/tmp/x")

    with pytest.raises(FileExistsError):
        streaming_dataset(make, "data.path")
    assert calls[0] == 1


def test_a_full_dev_shm_is_one_line_before_any_segment_is_made(monkeypatch, tmp_path):
    """A /dev/shm without room for streaming's segments killed the rank with SIGBUS when it wrote one (exit 135,
    no message; torchrun's ChildFailedError under mnemo launch). Now: one line naming /dev/shm, its free space
    and the way out, before streaming makes anything."""
    import mnemo.data_pipeline.shm as shm
    from mnemo.data_pipeline.errors import DataError

    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    free = {"bytes": 12 << 10}
    monkeypatch.setattr(shm, "free_bytes", lambda path: free["bytes"] if Path(path) == shm_dir else None)
    calls = []

    def make():
        calls.append(1)
        return "dataset"

    with pytest.raises(DataError) as e:
        shm.streaming_dataset(make, "data.sources[1].path", shards=3, shm_dir=shm_dir)
    msg = str(e.value)
    assert calls == [] and "\n" not in msg
    assert msg.startswith(f"data.sources[1].path: {shm_dir} has 12 KiB free and ") and "--shm-size" in msg
    # A normal machine's /dev/shm (docker's default, 64 MiB, nearly full) is never refused, even for a dataset
    # of 100,000 shards.
    assert shm.shm_bytes_needed(100_000) < 8 << 20
    free["bytes"] = 8 << 20
    assert shm.streaming_dataset(make, "data.path", shards=100_000, shm_dir=shm_dir) == "dataset"


def test_the_prefix_lock_lives_in_the_shared_memory_folder_it_guards(tmp_path):
    # Was $TMPDIR for every node: nodes on one host with a /dev/shm each (the test clusters) took one lock,
    # and a leader holding it waited in streaming's job-wide barrier for the other, which waited for the lock.
    from mnemo.data_pipeline.shm import PREFIX_LOCK, prefix_lock_path

    a, b = tmp_path / "shm_a", tmp_path / "shm_b"
    a.mkdir()
    b.mkdir()
    assert prefix_lock_path(a) == str(a / PREFIX_LOCK) and prefix_lock_path(b) == str(b / PREFIX_LOCK)
    assert prefix_lock_path(tmp_path / "none").endswith(PREFIX_LOCK)  # no such folder: the temp folder's


@needs_shm
def test_a_readers_lock_file_goes_when_it_is_done(tmp_path):
    """streaming makes /tmp/NNNNNN_cache_filelock when it first copies a shard and never removes it; it skips a
    prefix whose lock file exists, so every training run retired a number for good and left a file (12 runs,
    12 files). Done reading, the job removes its own: the one of the prefix its dataset picked."""
    from streaming import MDSWriter

    from mnemo.data_pipeline.streams import MDSSource

    data = tmp_path / "data"
    with MDSWriter(out=str(data), columns={"tokens": "ndarray:uint16"}, size_limit=4096, compression="zstd") as w:
        for i in range(30):
            w.write({"tokens": np.arange(i + 5, dtype=np.uint16)})
    src = MDSSource(str(data), cache_dir=str(tmp_path / "cache"))
    assert src.get(3)["tokens"].tolist() == list(range(8))  # a shard copied: its cache lock taken
    mine = Path(tempfile.gettempdir()) / f"{src.ds._shm_prefix_int:06d}_cache_filelock"
    assert mine.is_file()
    assert src.release_lock_files() == [mine.name]
    assert not mine.exists()
    assert src.release_lock_files() == []  # nothing else is ever removed


@needs_shm
def test_the_last_reader_on_the_machine_removes_the_lock_files_with_no_collective(tmp_path):
    """A run that ends on an exception cannot wait for its other ranks: each one lets go of its hold as it is
    done, and the last one removes streaming's lock files (and mnemo's readers file); an earlier one removes
    nothing, so a rank still reading keeps its lock."""
    from streaming import MDSWriter

    from mnemo.data_pipeline import shm
    from mnemo.data_pipeline.streams import MDSSource

    data = tmp_path / "data"
    with MDSWriter(out=str(data), columns={"tokens": "ndarray:uint16"}, size_limit=4096, compression="zstd") as w:
        for i in range(30):
            w.write({"tokens": np.arange(i + 5, dtype=np.uint16)})
    src = MDSSource(str(data), cache_dir=str(tmp_path / "cache"))
    src.hold_lock_files()  # this rank
    other = shm.hold_lock_files(src.ds)  # another local rank of the job (flock: one holder per descriptor)
    assert src.get(3)["tokens"].tolist() == list(range(8))
    prefix = src.ds._shm_prefix_int
    mine = Path(tempfile.gettempdir()) / f"{prefix:06d}_cache_filelock"
    readers = Path(tempfile.gettempdir()) / f"{prefix:06d}_{shm.READERS_FILE}"
    assert mine.is_file() and readers.is_file()
    assert src.release_lock_files(last_reader=True) == []  # the other still reads
    assert mine.is_file()
    assert shm.release_lock_files(src.ds, other) == [mine.name, readers.name]
    assert not mine.exists() and not readers.exists()
    assert src.release_lock_files(last_reader=True) == []  # nothing held, nothing removed


def test_the_lock_files_of_a_dead_jobs_prefix_go_and_a_live_ones_stay(tmp_path, monkeypatch):
    """A rank killed with SIGKILL left its prefix's lock files in the temp folder for good (streaming then skips
    that number), a resume of the run too. A prefix whose readers file no process holds is a dead mnemo job's:
    its files go at the next run's start; one held by a live reader, a young one (made, not yet locked), a
    link and another program's lock files without a readers file stay."""
    import fcntl
    import os

    from mnemo.data_pipeline import shm

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = time.time() - 2 * shm.DEAD_READERS_AGE_S

    def prefix(n: int, readers: bool = True, age: float = old) -> list[Path]:
        files = [tmp_path / f"{n:06d}_cache_filelock", tmp_path / f"{n:06d}_barrier_filelock"]
        if readers:
            files.append(tmp_path / f"{n:06d}_{shm.READERS_FILE}")
        for f in files:
            f.write_bytes(b"")
            os.utime(f, (age, age))
        return files

    live, dead, young, foreign = prefix(1), prefix(2), prefix(3, age=time.time()), prefix(4, readers=False)
    linked = prefix(5, readers=False)
    (tmp_path / f"000005_{shm.READERS_FILE}").symlink_to(tmp_path / "elsewhere")
    fd = os.open(live[-1], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a live reader (another open file: flock tells them apart)
        removed = shm.release_dead_jobs_lock_files()
    finally:
        os.close(fd)
    assert sorted(removed) == sorted(f.name for f in dead)
    assert not any(f.exists() for f in dead)
    assert all(f.exists() for f in [*live, *young, *foreign, *linked])


@needs_shm
def test_a_mixtures_datasets_hold_shared_memory_files_in_proportion_to_their_number(tmp_path):
    """To pick its prefix each StreamingDataset opened every prefix on the machine and kept them open until exit
    (streaming registers each segment's cleanup with atexit): 20 sources of a mixture held 2,527 files, and
    ~25 failed with "too many open files" among other jobs' datasets. The segments only looked at are closed."""
    import os

    from mnemo.data_pipeline.streams import MDSSource

    data = tmp_path / "data"
    _write_mds(data)

    def shm_files() -> int:
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/") for fd in _fds())

    def _fds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                os.readlink(f"/proc/self/fd/{fd}")
                out.append(fd)
            except OSError:  # the listing's own descriptor, closed by now
                pass
        return out

    before = shm_files()
    sources = [MDSSource(str(data), cache_dir=str(tmp_path / f"c{i}")) for i in range(12)]
    per_source = (shm_files() - before) / len(sources)
    # Each dataset keeps its own 6 segments (12 files here: 2 per segment); before, the i-th also held those
    # of every earlier prefix: 78 per source for 12.
    assert per_source <= 16, per_source
    assert [s.get(2)["tokens"].tolist() for s in sources[:2]] == [list(range(7))] * 2


def _import_streaming_first() -> None:
    """Import streaming before the temp folder is a test's: importing it makes ``torchinductor_<user>`` there."""
    from mnemo.data_pipeline.lean_imports import import_streaming

    import_streaming()


def test_a_prefix_whose_maker_died_between_its_segments_is_retired_not_deleted(tmp_path, monkeypatch, caplog):
    """A process SIGKILLed while its StreamingDataset started left a lone, unwritten <prefix>_locals: below a
    prefix that a killed rank left without its ``_locals``, streaming chose it again and again and failed to
    create it, so every dataset on the machine failed ("created by another process starting at the same
    moment"). The prefix is retired by its temp-folder locks, which streaming skips; no segment is deleted."""
    import logging
    import os

    from mnemo.data_pipeline import shm

    shm_dir, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm_dir.mkdir(), tmp.mkdir()
    _import_streaming_first()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    now = time.time()
    old = now - 2 * shm.UNFINISHED_AFTER_S
    made = ("barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times")

    def segment(name: str, age: float = old) -> None:
        (shm_dir / name).write_bytes(bytes(75))
        os.utime(shm_dir / name, (age, age))

    segment("000004_locals")  # alone, old: its maker died in between
    segment("000005_locals", age=now)  # alone, but being made right now
    for name in ("locals", *made):  # a whole prefix (a live job's, or one leaked whole): streaming skips it
        segment(f"000006_{name}")
    segment("000007_locals")  # alone, already retired
    for kind in ("barrier_filelock", "cache_filelock"):
        (tmp / f"000007_{kind}").write_bytes(b"")
    before = sorted(p.name for p in shm_dir.iterdir())
    with caplog.at_level(logging.WARNING, logger="mnemo.data_pipeline.shm"):
        assert shm.retire_unfinished_prefixes(shm_dir, now=now) == [4]
    assert sorted(p.name for p in tmp.iterdir()) == [
        "000004_barrier_filelock",
        "000004_cache_filelock",
        "000007_barrier_filelock",
        "000007_cache_filelock",
    ]
    assert sorted(p.name for p in shm_dir.iterdir()) == before  # nothing deleted
    assert [r.getMessage() for r in caplog.records] == [
        f"shared memory: {shm_dir}/000004_locals left alone by a process killed while it made its segments: "
        "mosaicml-streaming skips that prefix from now on"
    ]
    assert shm.retire_unfinished_prefixes(shm_dir, now=now) == []  # once


def _pick_prefix(monkeypatch, shm_dir: Path) -> int:
    """The prefix that streaming's own chooser (``get_shm_prefix``, as a dataset's local leader) picks and
    registers among the segments in ``shm_dir``, a folder standing for /dev/shm (the real one holds other
    jobs'): FileExistsError, as streaming's, when the ``_locals`` it picked is there."""
    from types import SimpleNamespace

    from mnemo.data_pipeline.lean_imports import import_streaming

    prefix_mod = import_streaming().base.shared.prefix

    def shared_memory(name: str, create: bool | None = None, size: int = 0, auto_cleanup: bool = True):
        path = shm_dir / name.lstrip("/")
        if create:
            with open(path, "xb") as fh:  # FileExistsError, as shm_open(O_CREAT | O_EXCL)
                fh.write(bytes(size))
        return SimpleNamespace(buf=memoryview(bytearray(path.read_bytes())))  # FileNotFoundError when missing

    monkeypatch.setattr(prefix_mod, "SharedMemory", shared_memory)
    prefix, _ = prefix_mod.get_shm_prefix(["/mine"], [None], SimpleNamespace(is_local_leader=True))
    return prefix


_MADE = ("barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times")
_LONG_AGO = 3600.0  # an age past every threshold of shm.py


def _fake_machine(tmp_path, monkeypatch) -> tuple[Path, Path, Callable[..., None]]:
    """A shared-memory folder and a temp folder (streaming's and mnemo's), and a maker of aged segments."""
    import os

    shm_dir, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm_dir.mkdir(), tmp.mkdir()
    _import_streaming_first()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    def segment(name: str, age: float, data: bytes = bytes(75)) -> None:
        (shm_dir / name).write_bytes(data)
        os.utime(shm_dir / name, (time.time() - age, time.time() - age))

    return shm_dir, tmp, segment


def test_a_killed_programs_segments_below_a_live_job_are_retired_and_streaming_picks_a_free_prefix(
    tmp_path, monkeypatch, caplog
):
    """A killed job of another program (LLM Foundry) left ``000000_resume`` alone, and a live job holds prefix 1
    (no ``_resume``: mnemo never makes one). streaming's ``_resume`` search picked 1, whose ``_locals`` is
    there: every new dataset on the machine failed. retire_unfinished_prefixes looked only at prefixes with a
    ``_locals`` and retired nothing. Now the leftover is retired (nothing deleted) and streaming picks 2."""
    import logging

    from mnemo.data_pipeline import shm

    shm_dir, tmp, segment = _fake_machine(tmp_path, monkeypatch)
    old = _LONG_AGO
    segment("000000_resume", old)  # the killed job's
    segment("000001_locals", old, _registration("/live/cache", prefix=1))  # a live job's, running for a while
    for name in _MADE:
        segment(f"000001_{name}", old)
    segment("000003_epoch_shape", 1.0)  # without a _locals but made just now: not provably a leftover
    before = sorted(p.name for p in shm_dir.iterdir())
    with pytest.raises(FileExistsError, match="000001_locals"):
        _pick_prefix(monkeypatch, shm_dir)  # streaming's own choice, on this machine as it is

    with caplog.at_level(logging.WARNING, logger="mnemo.data_pipeline.shm"):
        assert shm.retire_unfinished_prefixes(shm_dir) == [0]
    assert sorted(p.name for p in shm_dir.iterdir()) == before  # nothing deleted
    assert sorted(p.name for p in tmp.iterdir()) == ["000000_barrier_filelock", "000000_cache_filelock"]
    assert [r.getMessage() for r in caplog.records] == [
        f"shared memory: {shm_dir}/000000_* without a _locals segment, left by a killed process: "
        "mosaicml-streaming skips that prefix from now on"
    ]
    assert _pick_prefix(monkeypatch, shm_dir) == 2  # registered: the live job's prefix untouched
    assert (shm_dir / "000002_locals").is_file()
    assert shm.retire_unfinished_prefixes(shm_dir) == []  # once


@pytest.mark.parametrize("maker_killed", [True, False], ids=["maker-killed", "a-job-starting-now"])
def test_a_killed_ranks_segments_below_a_lone_locals_are_retired(tmp_path, monkeypatch, maker_killed):
    """A killed rank left ``000000_barrier``, ... without a ``_locals``; prefix 1 has a ``_locals`` alone (its
    maker killed in between, or a job making its segments right now). streaming's ``_barrier`` search picked 1
    and failed to create its ``_locals``. Only an old lone ``_locals`` was retired: with one being made, every
    dataset failed. Now prefix 0 is retired (and an old lone ``_locals`` too): streaming picks 2."""
    from mnemo.data_pipeline import shm

    shm_dir, tmp, segment = _fake_machine(tmp_path, monkeypatch)
    for name in _MADE:
        segment(f"000000_{name}", _LONG_AGO)
    segment("000001_locals", _LONG_AGO if maker_killed else 1.0)
    with pytest.raises(FileExistsError, match="000001_locals"):
        _pick_prefix(monkeypatch, shm_dir)
    assert shm.retire_unfinished_prefixes(shm_dir) == ([0, 1] if maker_killed else [0])
    assert _pick_prefix(monkeypatch, shm_dir) == 2


def test_a_link_planted_at_a_lock_files_name_is_never_followed(tmp_path, monkeypatch, caplog):
    """Retiring a prefix made its lock files with ``Path.touch``, which follows a link: one planted at
    ``/tmp/NNNNNN_barrier_filelock`` (the temp folder is everyone's) made this user create, or touch, the file
    it names. The link is left alone now, with a warning; the prefix is retired by its other lock file, or not
    at all."""
    import logging
    import os

    from mnemo.data_pipeline import shm

    shm_dir, tmp, segment = _fake_machine(tmp_path, monkeypatch)
    segment("000004_locals", _LONG_AGO)  # alone, its maker killed
    segment("000005_locals", _LONG_AGO)
    victim = tmp_path / "victim"
    os.symlink(victim / "a", tmp / "000004_barrier_filelock")
    os.symlink(victim / "b", tmp / "000005_barrier_filelock")
    os.symlink(victim / "c", tmp / "000005_cache_filelock")
    victim.mkdir()
    with caplog.at_level(logging.WARNING, logger="mnemo.data_pipeline.shm"):
        retired = shm.retire_unfinished_prefixes(shm_dir)
    assert list(victim.iterdir()) == []  # nothing made through a link
    assert retired == [4]
    assert (tmp / "000004_cache_filelock").is_file() and not (tmp / "000004_cache_filelock").is_symlink()
    assert all((tmp / n).is_symlink() for n in ("000004_barrier_filelock", "000005_barrier_filelock"))
    messages = [r.getMessage() for r in caplog.records]
    assert (
        f"shared memory: {tmp}/000004_barrier_filelock left alone, a symbolic link (never followed): prefix 000004"
        " retired by its other lock file" in messages
    )
    assert (
        f"shared memory: {tmp}/000005_barrier_filelock, {tmp}/000005_cache_filelock left alone, a symbolic link"
        " (never followed): prefix 000005 not retired" in messages
    )


# Two local ranks of one job (gloo, a file rendezvous) build one StreamingDataset through streaming_dataset; the
# race is forced: ``shift`` makes rank 1's scan of /dev/shm see a prefix other than rank 0's (another job's
# segments came or went between the two scans) in the first N attempts, ``taken`` makes rank 0's create of its
# ``_locals`` fail as if another process had made it first. Each rank prints the prefixes rank 0 registered,
# which of them still exist, the barriers each rank called, and the dataset read or the one-line error.
_RACE_WORKER = """
import datetime, json, os, sys, tempfile
rank, world, rendezvous, case, data, tmp = sys.argv[1:3] + sys.argv[3:]
rank, world = int(rank), int(world)
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
os.environ["TMPDIR"] = tmp  # streaming's lock files and the retired prefixes' ones: the test's own
tempfile.tempdir = None
import torch.distributed as dist
# A rank left waiting in a barrier that the other never calls fails in seconds, not in gloo's 30 minutes.
dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=10))
from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.shm import SHM_DIR, streaming_dataset
streaming = import_streaming()
from streaming import StreamingDataset
import streaming.base.dataset as dataset_mod
prefix_mod = streaming.base.shared.prefix
kind, _, times = case.partition(":")
times = 99 if times == "always" else int(times)
import mnemo.data_pipeline.shm as shm_mod
shm_mod.PREFIX_TRIES = 3  # the give-up case in fewer seconds
if kind == "full" and rank == 0:  # this rank's machine has a full /dev/shm, the other rank's has room
    shm_mod.free_bytes = lambda path: 8192
attempts = [0]

# Each attempt's prefix as this rank's StreamingDataset got it (rank 0 only: rank 1 fails in the shifted ones).
registered = []
get_shm_prefix = dataset_mod.get_shm_prefix
def counted_get_shm_prefix(*args, **kwargs):
    attempts[0] += 1
    prefix, shm = get_shm_prefix(*args, **kwargs)
    registered.append(prefix)
    return prefix, shm
dataset_mod.get_shm_prefix = counted_get_shm_prefix

scan = prefix_mod._check_and_find_retrying
def shifted_scan(*args, **kwargs):
    # attempts[0] counts this rank's calls of get_shm_prefix, the current one included (incremented above)
    shift = rank == 1 and kind == "shift" and attempts[0] <= times
    return scan(*args, **kwargs) + (1 if shift else 0)
prefix_mod._check_and_find_retrying = shifted_scan

shared_memory = prefix_mod.SharedMemory
def taken_locals(name=None, create=None, size=0, auto_cleanup=True):
    if rank == 0 and kind == "taken" and create and name.endswith("_locals") and attempts[0] <= times:
        raise FileExistsError(17, "File exists", "/" + name)
    return shared_memory(name, create, size, auto_cleanup)
prefix_mod.SharedMemory = taken_locals

barriers = [0]
barrier = dist.barrier
def counted_barrier(*args, **kwargs):
    barriers[0] += 1
    return barrier(*args, **kwargs)
dist.barrier = counted_barrier

out = {}
try:
    ds = streaming_dataset(lambda: StreamingDataset(local=data, shuffle=False, batch_size=1), "data.path")
    out["tokens"] = [int(t) for t in ds[3]["tokens"]]
    out["prefix"] = ds._shm_prefix_int
except DataError as e:
    out["error"] = str(e)
out["registered"] = registered
out["alive"] = [(SHM_DIR / f"{p:06d}_locals").exists() for p in registered]
out["barriers"] = barriers[0]
dist.barrier()  # both ranks done looking before either exits (its atexit unlinks its segments)
print("RESULT " + json.dumps(out), flush=True)
"""


def _race(tmp_path: Path, case: str) -> list[dict]:
    from tests.unit.gloo_ranks import run_ranks

    data, tmp = tmp_path / "data", tmp_path / "tmp"
    _write_mds(data)
    tmp.mkdir()
    return run_ranks(tmp_path, _RACE_WORKER, 2, (case, str(data), str(tmp)))


@needs_shm
def test_local_ranks_that_saw_different_prefixes_try_again_together(tmp_path):
    """Another job ended (its segments unlinked) between the scans of /dev/shm of rank 0 and rank 1: rank 1 looked
    for a prefix rank 0 never registered, and stopped with streaming's raw multi-line RuntimeError ("... was not
    registered by local leader") while rank 0 waited in a barrier. Now every rank learns of it and all try again;
    rank 0's segments of the failed attempt are gone."""
    r0, r1 = _race(tmp_path, "shift:1")
    assert r0["tokens"] == r1["tokens"] == list(range(8))
    first, second = r0["registered"]
    assert r0["prefix"] == r1["prefix"] == second and r0["alive"][1]
    # The first attempt's segments were removed: its number was free again (or another process took it since).
    assert first == second or not r0["alive"][0]
    # Every rank called the same barriers: ours and streaming's, in each attempt.
    from mnemo.data_pipeline.shm import STREAMING_BARRIERS

    assert r0["barriers"] == r1["barriers"] == 2 * (1 + STREAMING_BARRIERS)


@needs_shm
def test_a_locals_segment_taken_in_a_process_group_is_tried_again_by_every_rank(tmp_path):
    """In a process group the local leader that lost the race for its ``_locals`` stopped alone (one try),
    its other ranks left in streaming's barrier."""
    r0, r1 = _race(tmp_path, "taken:2")
    assert r0["tokens"] == r1["tokens"] == list(range(8))
    assert r0["prefix"] == r1["prefix"] and r0["alive"] == [True]


@needs_shm
def test_ranks_that_keep_seeing_different_prefixes_stop_with_one_line_naming_the_key(tmp_path):
    r0, r1 = _race(tmp_path, "shift:always")  # PREFIX_TRIES is 3 there
    for r in (r0, r1):
        assert r["error"].startswith("data.path: ") and "\n" not in r["error"]
        assert r["error"].endswith("(3 tries): start this job again")
    assert len(r0["registered"]) == 3 and not any(r0["alive"])  # none of its attempts left behind


@needs_shm
def test_a_full_dev_shm_on_one_machine_stops_every_rank_with_one_line(tmp_path):
    """The rank whose /dev/shm is full names it; every other rank stops with the same line (no rank left waiting
    in a collective), and none makes a segment."""
    r0, r1 = _race(tmp_path, "full:0")
    assert r0["error"].startswith("data.path: /dev/shm has 8 KiB free and ")
    assert r1["error"].startswith("data.path: the /dev/shm of another machine of this job has 8 KiB free and ")
    assert r0["error"].endswith(r1["error"].partition(" has ")[2]) and r0["registered"] == r1["registered"] == []
