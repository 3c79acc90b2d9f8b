"""`mnemo data verify` / `inspect`: a damaged shard is found and named."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.prepare import prepare
from mnemo.data_pipeline.verify import inspect, other_tokenizer, read_manifest, verify
from tests.unit.stdlib import small_code_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return small_code_dataset(tmp_path_factory.mktemp("v"), 30, vocab_size=400, unit_bytes=2000)


@pytest.fixture
def copy(dataset, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(dataset, d)
    return d


def _shard(d: Path, k: int = 1) -> tuple[str, Path]:
    index = json.loads((d / "index.json").read_text())
    name = index["shards"][k]["zip_data"]["basename"]
    return name, d / name


def test_good_dataset_verifies(dataset):
    rep = verify(str(dataset))
    m = read_manifest(str(dataset))
    assert rep["ok"] and rep["documents"] == m["num_documents"] == 30 and rep["tokens"] == m["num_tokens"]
    assert rep["shards"] > 3


def test_flipped_byte_names_the_shard(copy):
    name, path = _shard(copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {name}: sha1 does not match index.json \(corrupted\)"):
        verify(str(copy))


def test_truncated_shard_is_named(copy):
    name, path = _shard(copy, 2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"shard {name}: \d+ bytes, index.json says \d+ \(truncated"):
        verify(str(copy))


def test_missing_shard_is_named(copy):
    name, path = _shard(copy, 0)
    path.unlink()
    with pytest.raises(DataError, match=rf"shard {name}: missing"):
        verify(str(copy))


def test_index_and_manifest_disagreeing_is_found(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["num_documents"] += 1
    m["parts"] = []
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="30 samples in the shards, manifest.json says 31"):
        verify(str(copy))


def test_part_count_mismatch_names_the_part(copy):
    m = json.loads((copy / "manifest.json").read_text())
    m["parts"][1]["documents"] += 2
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="part part-00001: .* manifest.json says"):
        verify(str(copy))


def test_tokenizer_copy_must_match(copy):
    (copy / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(DataError, match="tokenizer.model: sha256 differs"):
        verify(str(copy))


def test_inspect_refuses_a_tokenizer_copy_that_is_not_the_manifests(copy):
    """inspect decoded the samples with whatever tokenizer.model was there (another one: garbage, exit 0)."""
    from tests.unit.launch_workspace import stub_tokenizer_bytes

    (copy / "tokenizer.model").write_bytes(stub_tokenizer_bytes())  # another tokenizer, a working one
    with pytest.raises(DataError, match=r"tokenizer\.model: sha256 differs from manifest\.json$"):
        inspect(str(copy))


def test_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        verify(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="manifest.json: missing"):
        verify(str(tmp_path))


def test_a_file_given_as_the_dataset_is_named_as_a_file(tmp_path):
    """A file as --data / data.path said "no such directory: FILE", though the file is there."""
    from mnemo.data_pipeline.paths import not_a_dataset_dir

    f = tmp_path / "corpus.jsonl"
    f.write_text("{}")
    assert not_a_dataset_dir(f) == f"{f} is not a directory (give the folder that `mnemo prepare --out` wrote)"
    assert not_a_dataset_dir(tmp_path / "nope") == f"no such directory: {tmp_path / 'nope'}"


def test_verify_of_a_file_fifo_or_device_says_not_a_directory(tmp_path):
    """`mnemo data verify FILE` said "data dir FILE: no such directory" (os.path.isdir is False for it)."""
    f = tmp_path / "corpus.jsonl"
    f.write_text("{}")
    os.mkfifo(tmp_path / "fifo")
    for path in (f, tmp_path / "fifo", "/dev/null"):
        with pytest.raises(DataError, match=rf"^{path} is not a directory \(give the folder that `mnemo prepare"):
            verify(str(path))


def test_other_tokenizer(dataset):
    m = read_manifest(str(dataset))
    assert other_tokenizer(m, m["tokenizer_sha256"]) is None
    assert other_tokenizer(m, "0" * 64) == m["tokenizer_sha256"]
    # Unknown on either side is no mismatch.
    assert other_tokenizer(m, None) is None and other_tokenizer({}, "0" * 64) is None


def test_inspect_report(dataset):
    rep = inspect(str(dataset), num_samples=2)
    assert rep["documents"] == 30 and rep["passkey_documents"] == 0
    p = rep["length_percentiles"]
    assert p["p0"] <= p["p50"] <= p["p90"] <= p["p100"]
    assert sum(c for _, _, c in rep["length_histogram"]) == 30
    assert [s["text"][:9] for s in rep["samples"]] == ["def f0():", "def f1():"]


def test_inspect_percentiles_are_not_cut_to_whole_tokens(dataset, monkeypatch):
    """int(np.percentile(...)) printed p50=4 for documents of 2 and 7 tokens, beside mean=4.5."""
    import numpy as np

    from mnemo.data_pipeline import verify as verify_module

    m = read_manifest(str(dataset))
    docs = [np.array([5] * (n - 1) + [m["eos_id"]], m["token_dtype"]) for n in (2, 7)]  # as inspect checks them
    samples = [("s", i, {"tokens": t, "doc_id": f"d{i}", "source": "x"}) for i, t in enumerate(docs)]
    monkeypatch.setattr(verify_module, "iter_shard_samples", lambda data_dir, index: iter(samples))
    rep = inspect(str(dataset), num_samples=0)
    assert rep["length_percentiles"]["p50"] == 4.5 and rep["length_mean"] == 4.5
    assert rep["length_percentiles"]["p0"] == 2 and rep["length_percentiles"]["p10"] == 2.5
    assert type(rep["length_percentiles"]["p0"]) is int  # a whole count stays an int in --json
    line = next(x for x in verify_module.format_inspect(rep).splitlines() if x.startswith("tokens per document"))
    assert line == "tokens per document: p0=2 p10=2.5 p50=4.5 p90=6.5 p99=7 p100=7 mean=4.5", line


def test_cli_verify_names_the_bad_shard(copy, capsys):
    from mnemo.cli import main

    name, path = _shard(copy)
    path.write_bytes(b"\0" * path.stat().st_size)
    assert main(["data", "verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mnemo: error: shard ") and name in err and "\n" not in err


def test_verify_inspect_and_eval_read_a_file_url_as_data_path_does(dataset, tmp_path, capsys):
    """`mnemo prepare --out file:///x` and data.path=file:///x work; `mnemo data verify/inspect file:///x` and
    `mnemo eval --data file:///x` said "no such directory". A remote URL is refused in one line naming it."""
    from mnemo.cli import main

    url = dataset.resolve().as_uri()  # file:///...
    assert main(["data", "verify", url, "--roundtrip-docs", "0"]) == 0
    assert capsys.readouterr().out.startswith(f"{url}: OK (")
    assert main(["data", "inspect", url, "--samples", "0"]) == 0
    capsys.readouterr()
    for argv in (["data", "verify", "s3://user:pw@bucket/x"], ["eval", str(tmp_path), "--data", "s3://bucket/x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("mnemo: error: ") and "a remote dataset; this reads a local one" in err, err
        assert "pw" not in err and err.count("\n") == 1
    # A token longer than the quoted part: hidden before the cut (a cut inside user:token@ left its start).
    long = f"https://user:{'SECRETTOKEN' * 20}@host/{'p' * 300}"
    assert main(["data", "verify", long]) == 2
    err = capsys.readouterr().err
    assert "SECRET" not in err and "a remote dataset" in err, err


def _has_controls(text: str, keep: str = "\n") -> bool:
    return any((ord(c) < 32 or 0x7F <= ord(c) <= 0x9F) and c not in keep for c in text)


def test_cli_inspect_shows_control_characters_escaped(dataset, tmp_path, capsys):
    """A document (or file name) holding escape sequences must not reach the terminal raw."""
    from mnemo.cli import main

    src = tmp_path / "src"
    src.mkdir()
    doc = "hello \x1b[31mred\x1b[0m\tbell\x07\rCR \x9b2J\nnext line\n"
    (src / "e\x1b]0;x\x07.txt").write_text(doc)
    out = tmp_path / "data"
    prepare([str(src)], str(out), tokenizer=str(dataset.parent / "t.model"), workers=1)
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not _has_controls(printed, keep="\n\t"), repr(printed)
    assert "hello \\x1b[31mred\\x1b[0m\tbell\\x07\\rCR \\x9b2J\nnext line" in printed
    assert "/e\\x1b]0;x\\x07.txt, " in printed  # the source: the file name
    assert main(["data", "inspect", str(out), str(out), "--tokens", "100"]) == 0  # the mixture table too
    assert not _has_controls(capsys.readouterr().out, keep="\n\t")
    # --json is JSON: every control character is a \u escape there, and the text comes back exact.
    assert main(["data", "inspect", str(out), "--json"]) == 0
    printed = capsys.readouterr().out
    assert not _has_controls(printed) and json.loads(printed)["samples"][0]["text"] == doc


def test_cli_inspect_sample_headers_are_one_line_each(dataset, tmp_path, capsys):
    """A newline in a file name went into its sample's `--- id (source, N tokens)` header raw: the name could
    forge a header of its own. The header's id and source are escaped whole; the document keeps its lines."""
    from mnemo.cli import main

    src = tmp_path / "src"
    src.mkdir()
    (src / "a\n--- evil (evil, 1 tokens)\nFAKE.txt").write_text("real text\nline two\n")
    out = tmp_path / "data"
    prepare([str(src)], str(out), tokenizer=str(dataset.parent / "t.model"), workers=1)
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--samples", "1"]) == 0
    printed = capsys.readouterr().out
    headers = [line for line in printed.splitlines() if line.startswith("--- ")]
    assert len(headers) == 1 and "a\\n--- evil (evil, 1 tokens)\\nFAKE.txt" in headers[0], printed
    assert "real text\nline two" in printed


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tokens", "inf"], "--tokens"),
        (["--tokens", "nan"], "--tokens"),
        (["--tokens", "1e400"], "--tokens"),
        (["--tokens", "-1"], "--tokens"),
        (["--tokens", "1.5"], "--tokens"),
        (["--samples", "-1"], "--samples"),
        (["--weights", "inf,1"], "--weights"),
        (["--weights", "1e308,1e-320"], "--weights"),  # 1e308,1e308 is 0.5/0.5, as in training (mixture.shares)
        (["--weights", "nan,1"], "--weights"),
        (["--weights", "1,,2"], "--weights"),  # was read as 1,2
        (["--weights", "1,2,"], "--weights"),
        # Quoted whole: an error line of 5,000 digits and more (now cut, as every other value).
        (["--weights", "2" * 5000 + ",x"], "--weights"),
        (["--weights", "2" * 5000 + ",,1"], "--weights"),
        (["--weights", "2" * 5000 + ",-1"], "--weights"),
    ],
)
def test_cli_inspect_numeric_flags_are_checked(dataset, capsys, args, needle):
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "inspect", str(dataset), str(dataset), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err) < 400, err
    assert err.startswith(f"mnemo: error: argument {needle}: ") and len(err.strip().splitlines()) == 1, err
    assert err.rstrip().endswith("(see: mnemo data inspect --help)"), err  # before: argparse's usage block


def test_a_token_count_is_read_exactly():
    """--tokens went through float(): 12345678901234567 became ...568, and 30 nines a budget of
    1,000,000,000,000,000,019,884,624,838,656 tokens."""
    import argparse

    from mnemo.commands.data import _count

    assert _count("12345678901234567") == 12345678901234567
    assert _count("9" * 30) == int("9" * 30)
    assert _count("1e9") == 10**9 and _count("2_000_000") == 2_000_000 and _count("1.5e3") == 1500
    for bad in ("1e400", "1e99999", "1.5", "-1", "nan", "inf", "1e-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            _count(bad)


def test_cli_verify_roundtrip_docs_below_zero_is_an_error(dataset, capsys):
    from mnemo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "verify", str(dataset), "--roundtrip-docs", "-5"])
    assert e.value.code == 2 and "argument --roundtrip-docs: " in capsys.readouterr().err


@contextmanager
def _within(seconds: int):
    """TimeoutError when the block takes longer: a FIFO opened for reading waits forever for a writer."""

    def too_slow(*_):
        raise TimeoutError("blocked")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    "what, why",
    [("directory", "a directory, not a file"), ("fifo", "a FIFO (named pipe), not a regular file")],
)
def test_verify_a_tokenizer_copy_that_is_no_regular_file_is_one_line(copy, capsys, what, why):
    """A directory there was an IsADirectoryError traceback; a FIFO hung verify forever."""
    from mnemo.cli import main

    tok = copy / "tokenizer.model"
    tok.unlink()
    tok.mkdir() if what == "directory" else os.mkfifo(tok)
    with _within(20):
        rc = main(["data", "verify", str(copy), "--roundtrip-docs", "0"])
    assert rc == 2 and capsys.readouterr().err.strip() == f"mnemo: error: tokenizer {tok}: {why}"


@pytest.mark.parametrize("name", ["index.json", "manifest.json", "shard"])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_fifo_or_device_in_the_dataset_is_one_line_not_a_hang(copy, capsys, name, command):
    """A FIFO there hung verify and inspect; a link to /dev/zero read until memory ran out."""
    from mnemo.cli import main

    path = _shard(copy)[1] if name == "shard" else copy / name
    for kind, why in [("fifo", "a FIFO (named pipe), not a regular file"), ("dev", "a character device")]:
        path.unlink()
        os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
        with _within(20):
            rc = main(["data", command, str(copy)] + (["--roundtrip-docs", "0"] if command == "verify" else []))
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("mnemo: error: ") and why in err and "\n" not in err, err
        assert (path.name if name == "shard" else str(path)) in err


def test_a_json_file_over_the_bound_is_not_read(tmp_path):
    from mnemo.data_pipeline.verify import read_json_file

    (tmp_path / "index.json").write_text(json.dumps({"shards": ["x" * 200]}))
    with pytest.raises(DataError, match=r"index.json: 2\d\d bytes, over the 100-byte bound for this file \(idx\)"):
        read_json_file(str(tmp_path / "index.json"), "idx", limit=100)


def test_reading_a_small_json_file_reserves_no_more_than_its_size(tmp_path):
    """read_bounded asked read() for the bound plus one byte, which Python allocates up front: 256 MiB for a
    3-byte file, which a `ulimit -v` of 4 GB refused in mnemo prepare."""
    import tracemalloc

    from mnemo.data_pipeline.files import MAX_JSON_BYTES, load_json

    (tmp_path / "a.json").write_text("[1]")
    tracemalloc.start()
    try:
        assert load_json(tmp_path / "a.json") == [1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_JSON_BYTES // 100, f"{peak:,} bytes allocated to read 3"


@pytest.mark.parametrize("size, grew_past", [(50, False), (100, False), (101, True), (3000, True)])
def test_a_file_that_grows_while_read_is_bounded_exactly(tmp_path, monkeypatch, size, grew_past):
    """The size read_bounded sees first may be stale: what the file holds then is read to one byte past the bound."""
    from mnemo.data_pipeline import files

    path = tmp_path / "a.json"
    path.write_bytes(b"x" * size)
    real_fstat = os.fstat

    def fstat(fd):  # the file held 3 bytes when its size was looked at
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, *st[1:6], 3, *st[7:]))

    monkeypatch.setattr(files.os, "fstat", fstat)
    if grew_past:
        with pytest.raises(files.NotRegularFile, match="grew past the 100-byte bound"):
            files.read_bounded(path, 100)
    else:
        assert files.read_bounded(path, 100) == b"x" * size


@pytest.mark.parametrize(
    "name", ["/etc/hostname", "../../../../etc/passwd", "part-00000/../../x", "part-00000//x", ".hidden", ""]
)
def test_shard_names_outside_the_dataset_are_refused_before_any_open(copy, capsys, name):
    """An absolute name or one climbing out with '..' had verify and inspect read files outside the dir."""
    from mnemo.cli import main
    from mnemo.data_pipeline.streams import MDSSource

    index = json.loads((copy / "index.json").read_text())
    index["shards"][1]["raw_data"]["basename"] = name
    (copy / "index.json").write_text(json.dumps(index))
    for command in ("verify", "inspect"):
        assert main(["data", command, str(copy), *(["--roundtrip-docs", "0"] if command == "verify" else [])]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"mnemo: error: {copy / 'index.json'}: shard file name {name!r} is not a relative name inside the "
            f"dataset dir (like part-00000/shard.00000.mds.zstd)"
        )
    # Training hands the dir to streaming, which would open (and decompress into) that name.
    with pytest.raises(DataError, match=rf"^data.path: {copy / 'index.json'}: shard file name"):
        MDSSource(str(copy))


@pytest.mark.parametrize(
    "field, value", [("samples", "3"), ("samples", 3.0), ("samples", True), ("bytes", "254"), ("samples", -1)]
)
def test_index_counts_of_the_wrong_type_name_the_field(copy, field, value):
    """'samples': "3" gave 'holds 3 samples, index.json says 3'."""
    index = json.loads((copy / "index.json").read_text())
    entry = index["shards"][0]
    (entry if field == "samples" else entry["zip_data"])[field] = value
    (copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"index.json: shard \S+: field '{field}' is .*, not a whole number >= 0$"):
        verify(str(copy), roundtrip_docs=0)


def test_a_good_local_dataset_still_opens_for_training(copy):
    from mnemo.data_pipeline.streams import MDSSource

    src = MDSSource(str(copy))
    assert src.num_samples == 30 and src.get(0)["tokens"][-1] == read_manifest(str(copy))["eos_id"]


def test_training_reads_a_compressed_dataset_without_writing_into_it(copy, tmp_path):
    """streaming decompressed each shard beside its .zstd, in the dataset dir: a read-only shared dataset
    could not be trained from, and that stale copy was read instead of a shard changed since. With a
    cache folder (the trainer always gives one) the dataset dir is left as it was."""
    from mnemo.data_pipeline.streams import MDSSource

    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    assert any(str(p).endswith(".zstd") for p in before)
    cache = tmp_path / "cache"
    docs = [MDSSource(str(copy), cache_dir=str(cache)).get(i)["tokens"].tolist() for i in range(3)]
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    assert list(cache.rglob("*.mds")), "the decompressed shards go to the cache"
    # The same documents as read in place (streaming decompressing into the dataset dir).
    in_place = MDSSource(str(copy))
    assert docs == [in_place.get(i)["tokens"].tolist() for i in range(3)]
    # Another dataset in the same cache folder gets a folder of its own (named by its index.json).
    index = json.loads((copy / "index.json").read_text())
    index["shards"] = index["shards"][:1]
    other = tmp_path / "other"
    shutil.copytree(copy, other)
    (other / "index.json").write_text(json.dumps(index))
    assert MDSSource(str(other), cache_dir=str(cache)).num_samples < 30
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2


def test_each_machine_decompresses_into_its_own_cache_folder(copy, tmp_path, monkeypatch):
    """Two nodes on one shared data.cache_dir raced: one deleted a shard's .zstd (its copy decompressed)
    while the other was opening it, and that rank died (FileNotFoundError). Nothing coordinates two machines
    there (streaming's shared memory is per machine), so each host reads through a folder of its own."""
    import socket

    from mnemo.data_pipeline.streams import MDSSource, node_cache_dir

    cache = tmp_path / "cache"
    folders = {}
    for host in ("node0", "node1", "node0"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        folders.setdefault(host, set()).add(node_cache_dir(str(cache)))
        src = MDSSource(str(copy), cache_dir=node_cache_dir(str(cache)))
        assert len(src.get(0)["tokens"]) > 0
    assert {h: len(f) for h, f in folders.items()} == {"node0": 1, "node1": 1}  # stable for a host
    assert folders["node0"] != folders["node1"]
    assert sorted(p.name for p in cache.iterdir()) == ["node-node0", "node-node1"]
    for d in cache.iterdir():  # each holds its own decompressed copy
        assert list(d.rglob("*.mds")), d
    # A host name that is no plain file name is hashed, never a path of its own.
    monkeypatch.setattr(socket, "gethostname", lambda: "../../x y")
    odd = node_cache_dir(str(cache))
    assert os.path.dirname(odd) == str(cache) and os.path.basename(odd).startswith("node-h")


def _samples_of_shard(src, k: int) -> list[int]:
    """The sample ids of shard ``k`` of an MDSSource."""
    start = int(src.samples_per_shard[:k].sum())
    return list(range(start, start + int(src.samples_per_shard[k])))


def _docs(src) -> list[list[int]]:
    return [src.get(i)["tokens"].tolist() for i in range(src.num_samples)]


def _closed(src) -> None:
    """Let go of an MDSSource: its cache folder may be opened again (streaming refuses one registered by a live one)."""
    del src
    gc.collect()


def test_a_damaged_shard_at_training_time_is_one_line_and_its_copy_is_not_reused(copy, tmp_path):
    """A truncated .zstd was a zstd.Error traceback in the rank; and its copy stayed in the cache folder, named
    by index.json's hash (the same once the dataset was repaired), so every later run there failed the same way."""
    from mnemo.data_pipeline.streams import MDSSource

    name, path = _shard(copy)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    cache = tmp_path / "cache"
    src = MDSSource(str(copy), cache_dir=str(cache))
    with pytest.raises(DataError) as e:
        src.get(_samples_of_shard(src, 1)[0])
    assert str(e.value) == (
        f"data.path: {copy}: shard {name}: {len(good) // 2} bytes, index.json says {len(good)} (truncated or "
        f"replaced); repair the dataset or prepare it again (`mnemo data verify {copy}` checks every shard)"
    )
    _closed(src)
    path.write_bytes(good)  # repaired: `mnemo data verify` is content, and so is training on the same cache
    verify(str(copy), roundtrip_docs=0)
    want = _docs(MDSSource(str(copy), cache_dir=str(tmp_path / "fresh")))
    assert _docs(MDSSource(str(copy), cache_dir=str(cache))) == want


def test_a_same_size_damage_is_found_by_the_hash_index_json_records(copy, tmp_path):
    """A flipped byte keeps the size: streaming checked no hash, and a frame that still decompressed was read."""
    from mnemo.data_pipeline.streams import MDSSource

    name, path = _shard(copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    src = MDSSource(str(copy), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"^data.path: {copy}: shard {name}: sha1 does not match index.json"):
        src.get(_samples_of_shard(src, 1)[-1])


@pytest.mark.parametrize("bad", ["short zstd", "flipped zstd", "short mds"])
def test_a_cached_copy_that_does_not_match_the_dataset_is_copied_again(copy, tmp_path, bad):
    """A copy left in the cache folder (by a run that stopped on a damaged shard, or killed while copying, or cut
    short since) was reused as it was: a decompression error, or documents read short, at every run."""
    from mnemo.data_pipeline.streams import MDSSource, decompress_cache

    name, path = _shard(copy)
    cache = tmp_path / "cache"
    want = _docs(MDSSource(str(copy), cache_dir=str(cache)))
    gc.collect()
    zipped = Path(decompress_cache(str(copy), str(cache))) / name
    raw = zipped.with_suffix("")  # shard.00001.mds, decompressed
    assert raw.is_file() and not zipped.exists()
    if bad == "short mds":
        raw.write_bytes(raw.read_bytes()[:-10])
    else:
        raw.unlink()
        data = bytearray(path.read_bytes())
        if bad == "short zstd":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0xFF
        zipped.write_bytes(bytes(data))
    assert _docs(MDSSource(str(copy), cache_dir=str(cache))) == want
    index = json.loads((copy / "index.json").read_text())
    assert raw.stat().st_size == index["shards"][1]["raw_data"]["bytes"]  # decompressed again, whole


def test_readers_waiting_for_a_damaged_shard_are_not_left_waiting(copy, tmp_path):
    """streaming marks a shard as in preparation while it copies and decompresses it; when that failed, the mark
    stayed, and every other reader of the shard (a prefetch thread, another local rank) waited forever."""
    from mnemo.data_pipeline.streams import MDSSource

    _, path = _shard(copy)
    path.write_bytes(path.read_bytes()[:100])
    src = MDSSource(str(copy), cache_dir=str(tmp_path / "cache"))
    ids = _samples_of_shard(src, 1)[:3]
    assert len(ids) >= 2
    got: dict[int, str] = {}

    def read(i: int) -> None:
        try:
            src.get(i)
            got[i] = "read"
        except Exception as e:
            got[i] = type(e).__name__

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == {i: "DataError" for i in ids}


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("when", ["first", "again"])
def test_a_bug_while_reading_a_shard_is_its_own_error_not_a_damaged_shard(copy, tmp_path, monkeypatch, cache, when):
    """A KeyError of a bug (in mnemo or streaming) while streaming read a sound shard was `mnemo: error: data.path:
    DIR: shard NAME cannot be read (KeyError: ...)`, exit 2, no traceback: it goes on (exit_status: a traceback)."""
    from mnemo.data_pipeline.streams import MDSSource

    src = MDSSource(str(copy), cache_dir=str(tmp_path / "cache") if cache else None)
    real = src.ds.get_item
    calls: list[int] = []

    def get_item(i):
        calls.append(i)
        if when == "again" and len(calls) == 1:
            raise ValueError("Checksum failure: a copy damaged in the cache")  # then read again from a fresh copy
        raise KeyError("column_sizes")

    monkeypatch.setattr(src.ds, "get_item", get_item)
    i = _samples_of_shard(src, 1)[0]
    if when == "again" and not cache:
        with pytest.raises(DataError, match=r"cannot be read \(ValueError: Checksum failure"):
            src.get(i)  # read in place: nothing to read again
        return
    with pytest.raises(KeyError, match="column_sizes"):
        src.get(i)
    monkeypatch.setattr(src.ds, "get_item", real)
    assert src.get(i)["tokens"].size  # its copy dropped (cache), read afresh


def test_a_full_cache_folder_is_named_on_the_one_line(copy, tmp_path, monkeypatch, capsys):
    """A data.cache_dir on a full disk: streaming's write of the decompressed shard (out.write) raises an OSError
    naming no file, and the one line was a bare `mnemo: error: No space left on device` (README: FILE: reason)."""
    import errno
    import io

    import streaming.base.stream as stream_module

    from mnemo.data_pipeline.streams import MDSSource, decompress_cache
    from mnemo.train.errors import exit_status

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() to a full file system raises

    real_open = open
    monkeypatch.setattr(
        stream_module,
        "open",
        lambda f, mode="r", *a, **k: FullDisk() if "w" in mode else real_open(f, mode, *a, **k),
        raising=False,
    )
    cache = tmp_path / "cache"
    src = MDSSource(str(copy), cache_dir=str(cache))
    assert exit_status(lambda: src.get(0)) == 2
    assert (
        capsys.readouterr().err == f"mnemo: error: {decompress_cache(str(copy), str(cache))}: No space left on device\n"
    )


@pytest.mark.parametrize("bad", ["a text byte", "an offset"])
def test_a_damaged_decompressed_copy_is_read_again_from_the_dataset(copy, tmp_path, bad):
    """What a same-size damage of a decompressed copy in the cache raises (a UnicodeDecodeError, an IndexError:
    streaming's decoders) is a damaged copy: dropped, copied again from the sound dataset, read."""
    import struct

    from mnemo.data_pipeline.streams import MDSSource, decompress_cache

    name, _ = _shard(copy)
    cache = tmp_path / "cache"
    want = _docs(MDSSource(str(copy), cache_dir=str(cache)))
    gc.collect()
    raw = (Path(decompress_cache(str(copy), str(cache))) / name).with_suffix("")
    data = bytearray(raw.read_bytes())
    if bad == "a text byte":
        at = data.index(b".py")  # the source column: a lone continuation byte is no UTF-8
        data[at] = 0x80
    else:
        data[8:12] = struct.pack("<I", len(data) + 100)  # sample 0 begins past the end: nothing there to read
    raw.write_bytes(bytes(data))
    assert _docs(MDSSource(str(copy), cache_dir=str(cache))) == want


def test_verify_hides_the_credentials_of_a_manifest_input_it_names(monkeypatch, capsys):
    """Was: `round trip: not checked (input https://u:inspPW@h/x.txt?token=inspTOK is gone)`, in clear."""
    import mnemo.data_pipeline.verify as verify_module
    from mnemo.cli import main
    from mnemo.data_pipeline.tokenizer import corpus_round_trip

    url = "https://u:inspPW@h/x.txt?token=inspTOK"
    roundtrip = corpus_round_trip(None, [{"path": url, "size": 3, "mtime_ns": 1}])
    rep = {"shards": 1, "documents": 1, "tokens": 2, "roundtrip": roundtrip}
    monkeypatch.setattr(verify_module, "verify", lambda data_dir, roundtrip_docs: rep)
    assert main(["data", "verify", "d"]) == 0
    out = capsys.readouterr().out
    assert "round trip: not checked (input https://***@h/x.txt?token=*** is gone)" in out, out
    assert "inspPW" not in out and "inspTOK" not in out


def test_shards_without_a_tokens_column_are_one_line_for_every_reader(copy):
    """index.json naming the token column "toks": training (check_index, its pre-start check) and evaluation's
    reader raised KeyError: 'tokens' tracebacks; each names the shard and its columns now."""
    from mnemo.data_pipeline.verify import check_index
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.heldout import open_mds

    for index in copy.rglob("index.json"):
        obj = json.loads(index.read_text())
        for shard in obj["shards"]:
            shard["column_names"] = ["toks" if c == "tokens" else c for c in shard["column_names"]]
        index.write_text(json.dumps(obj))
    with pytest.raises(DataError, match=r"index\.json: shard \S+: no 'tokens' column \(columns: \[.*'toks'"):
        check_index(str(copy))
    with pytest.raises(EvalError, match=r"--data: cannot read .*: shard \S+: no 'tokens' column"):
        open_mds(str(copy)).get(0)
    with pytest.raises(DataError, match=r"shard \S+: no 'tokens' column"):
        verify(str(copy))


def test_eval_data_with_token_ids_outside_the_model_vocabulary_is_one_line(dataset):
    """`mnemo eval --data` on ids >= the model's vocabulary was torch's IndexError traceback in the embedding;
    the held-out reader checks each document as training's streams do, naming the shard, sample and id."""
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.heldout import read_heldout_docs

    assert read_heldout_docs(str(dataset), 0.2, vocab_size=400)
    with pytest.raises(
        EvalError, match=r"^--data: \S+: shard \d+, sample \d+: token id \d+ is outside the vocabulary \(0\.\.2\)"
    ):
        read_heldout_docs(str(dataset), 0.2, vocab_size=3)


def test_inspect_names_the_shard_and_a_token_id_outside_the_vocabulary(dataset, tmp_path):
    """`mnemo data inspect` decoded an id >= the vocabulary with the tokenizer: "index.json or manifest.json is
    malformed (IndexError: OUT_OF_RANGE: piece id is out of range.)". It names the shard, sample and id now."""
    import numpy as np
    from streaming import MDSWriter

    d = tmp_path / "oov"
    manifest = json.loads((dataset / "manifest.json").read_text())
    with MDSWriter(out=str(d), columns=manifest["columns"]) as w:
        tokens = np.array([5, 60000, manifest["eos_id"]], dtype=manifest["token_dtype"])
        w.write({"tokens": tokens, "doc_id": "a", "source": "x", "answer_start": -1, "answer_len": 0})
    shutil.copy(dataset / "manifest.json", d / "manifest.json")
    shutil.copy(dataset / "tokenizer.model", d / "tokenizer.model")
    with pytest.raises(DataError, match=r"^shard shard\.00000\.mds: sample 0 has token id 60000 >= vocab size \d+$"):
        inspect(str(d))


@pytest.mark.parametrize(
    "vocab, says",
    [
        (10**12, r"vocab_size 1000000000000 is not the vocab size \d+ of the tokenizer \S+tokenizer\.model"),
        (1e3, r"vocab_size is 1000\.0, not a whole number >= 1"),
    ],
)
def test_verify_and_inspect_check_the_manifest_vocab_size_as_training_does(copy, vocab, says):
    """verify said OK for manifest.json vocab_size 10**12 or 1e3 (training refused both): one check now,
    verify.check_vocab_size, against the dataset's tokenizer copy."""
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": vocab}))
    for look in (verify, inspect):
        with pytest.raises(DataError, match=rf"manifest\.json: {says}$"):
            look(str(copy))
