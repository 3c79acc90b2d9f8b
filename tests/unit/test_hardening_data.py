"""`mnemo prepare` and the corpus readers against bad inputs and hostile files.

Each bad input must end in a counted skip or a one-line error naming the file:
never a traceback, a silent partial read, unbounded memory, or deleted user files.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import threading
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.prepare import prepare
from mnemo.data_pipeline.inputs import ReadStats, plan_inputs
from mnemo.data_pipeline.outputs import OUTPUTS_FILE, STATE_DIR
from mnemo.data_pipeline.readers import iter_documents
from mnemo.data_pipeline.verify import iter_shard_samples
from mnemo.cli import main
from tests.unit.stdlib import stdlib_tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 3, vocab_size=400).path


def jsonl(n: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"text": f"document {i} " + "lorem ipsum " * 8}) + "\n" for i in range(start, start + n)
    ).encode()


def read(paths, **kw) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return [d.text for d in iter_documents(plan_inputs([str(p) for p in paths]), stats=stats, **kw)], stats


def cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stderr of `mnemo ARGS` run in process."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The single `mnemo: error: ...` line of ``err`` (no traceback, nothing else)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("mnemo: training a")]
    assert len(lines) == 1 and lines[0].startswith("mnemo: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- --out never holds user files


def test_out_equal_to_the_input_dir_is_refused_and_the_input_kept(model, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-00000.jsonl").write_bytes(jsonl(50))  # a common corpus naming
    before = (corpus / "part-00000.jsonl").read_bytes()
    for extra in ([], ["--overwrite"]):
        rc, err = cli(
            capsys, "prepare", "--input", corpus, "--out", corpus, "--tokenizer", model, "--workers", "1", *extra
        )
        assert rc == 2 and "contains the input" in one_error_line(err) and "part-00000.jsonl" in err
    # --out an ancestor of the input is the same thing.
    with pytest.raises(DataError, match="contains the input"):
        prepare([str(corpus)], str(tmp_path), tokenizer=model, workers=1, overwrite=True)
    assert sorted(os.listdir(corpus)) == ["part-00000.jsonl"]
    assert (corpus / "part-00000.jsonl").read_bytes() == before


def test_out_holding_a_users_part_file_is_refused_and_the_file_kept(model, tmp_path, capsys):
    (tmp_path / "in.jsonl").write_bytes(jsonl(20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.jsonl").write_text("the user's own corpus\n")
    (out / "part-00001").mkdir()
    (out / "part-00001" / "notes.txt").write_text("also theirs")
    for extra in ([], ["--overwrite"]):
        rc, err = cli(
            capsys,
            "prepare",
            "--input",
            tmp_path / "in.jsonl",
            "--out",
            out,
            "--tokenizer",
            model,
            "--workers",
            "1",
            *extra,
        )
        assert rc == 2 and "holds no mnemo dataset" in one_error_line(err)
    assert (out / "part-00000.jsonl").read_text() == "the user's own corpus\n"
    assert (out / "part-00001" / "notes.txt").read_text() == "also theirs"


def test_overwrite_removes_only_the_listed_outputs(model, tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(40))
    (tmp_path / "b.jsonl").write_bytes(jsonl(5, 100))
    out = tmp_path / "out"
    prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1, unit_bytes=1500)
    listed = json.loads((out / OUTPUTS_FILE).read_text())["entries"]
    assert "part-00003" in listed and all((out / n).exists() for n in listed if n != STATE_DIR)
    # A file the user drops in, named like an output, makes --overwrite refuse rather than delete it.
    (out / "part-00007-mine.txt").write_text("mine")
    with pytest.raises(DataError, match=r"does not name \(part-00007-mine.txt\)"):
        prepare([str(tmp_path / "b.jsonl")], str(out), tokenizer=model, workers=1, overwrite=True)
    assert (out / "part-00007-mine.txt").read_text() == "mine"
    (out / "part-00007-mine.txt").unlink()
    # ... and so does a file dropped into a listed part (removing the part deleted it with the shards).
    (out / "part-00001" / "mine.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds part-00001/mine.txt, inside an output of mnemo's"):
        prepare([str(tmp_path / "b.jsonl")], str(out), tokenizer=model, workers=1, overwrite=True)
    assert (out / "part-00001" / "mine.txt").read_text() == "mine" and (out / "part-00001" / "index.json").exists()
    (out / "part-00001" / "mine.txt").unlink()
    m = prepare([str(tmp_path / "b.jsonl")], str(out), tokenizer=model, workers=1, overwrite=True)
    assert m["num_documents"] == 5 and not (out / "part-00003").exists()
    assert sorted(os.listdir(out)) == sorted(
        [OUTPUTS_FILE, "index.json", "manifest.json", "part-00000", "tokenizer.model"]
    )


def test_a_dataset_without_a_list_of_outputs_is_known_by_its_manifest(model, tmp_path):
    """Datasets written before mnemo kept .mnemo-outputs.json: the manifest names their parts."""
    (tmp_path / "a.jsonl").write_bytes(jsonl(40))
    out = tmp_path / "out"
    prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1, unit_bytes=1500)
    (out / OUTPUTS_FILE).unlink()
    (out / "part-00009").mkdir()  # not in the manifest: not mnemo's
    with pytest.raises(DataError, match=r"holds files .* \(part-00009\)"):
        prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1, overwrite=True)
    (out / "part-00009").rmdir()
    m = prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1, overwrite=True)
    assert m["num_documents"] == 40 and (out / OUTPUTS_FILE).exists()


@pytest.mark.parametrize("crash_on", ["manifest.json", "tokenizer.model"])
def test_crash_leftovers_do_not_block_a_rerun(model, tmp_path, monkeypatch, crash_on):
    """A run killed while moving a finished file into place (its temp file written) reruns, with or without
    --overwrite."""
    (tmp_path / "a.jsonl").write_bytes(jsonl(30))
    out = tmp_path / "out"
    real_replace = os.replace

    def dies(src, dst, *a, **k):
        if os.path.basename(str(dst)) == crash_on:
            raise KeyboardInterrupt  # stands for a kill between writing the temp file and renaming it
        return real_replace(src, dst, *a, **k)

    kw = dict(workers=1, vocab_size=300, sample_docs=100)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            prepare([str(tmp_path / "a.jsonl")], str(out), **kw)
    assert not (out / "manifest.json").exists()
    assert prepare([str(tmp_path / "a.jsonl")], str(out), **kw)["num_documents"] == 30
    with monkeypatch.context() as m:
        m.setattr(os, "replace", dies)
        with pytest.raises(KeyboardInterrupt):
            prepare([str(tmp_path / "a.jsonl")], str(out), overwrite=True, **kw)
    assert prepare([str(tmp_path / "a.jsonl")], str(out), overwrite=True, **kw)["num_documents"] == 30
    assert not any(".tmp" in n for n in os.listdir(out))


def test_a_run_killed_before_listing_its_outputs_reruns(model, tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(10))
    out = tmp_path / "out"
    (out / STATE_DIR).mkdir(parents=True)
    (out / STATE_DIR / f"{OUTPUTS_FILE}.tmp4242").write_text('{"entr')
    m = prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1)
    assert m["num_documents"] == 10 and not (out / STATE_DIR).exists()


# ----------------------------------------------------------------------------- compressed and Parquet damage


def _damaged(tmp_path: Path, kind: str, damage: str) -> Path:
    data = jsonl(2000)
    if kind == "gz":
        comp = bytearray(gzip.compress(data))
    else:
        comp = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    if damage == "truncated":
        comp = comp[: len(comp) // 3]
    else:  # bytes flipped inside the compressed data (gzip: a bad deflate block; zstd: a bad block)
        for j in range(24, 40):
            comp[j] ^= 0xA5
    p = tmp_path / f"docs.jsonl.{'gz' if kind == 'gz' else 'zst'}"
    p.write_bytes(bytes(comp))
    return p


@pytest.mark.parametrize("kind", ["gz", "zst"])
@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_compressed_jsonl_is_an_error_naming_the_file(tmp_path, kind, damage, capsys):
    p = _damaged(tmp_path, kind, damage)
    with pytest.raises(DataError, match=rf"input .*{p.name}: truncated or corrupt (gzip|zstd) data"):
        read([p])
    rc, err = cli(capsys, "prepare", "--input", p, "--out", tmp_path / "out", "--vocab-size", "300", "--workers", "1")
    assert rc == 2 and p.name in one_error_line(err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_multi_frame_and_empty_compressed_files_read_whole(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(
        b"".join(zstandard.ZstdCompressor().compress(jsonl(3, i * 3)) for i in range(3))
    )
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(2)) + gzip.compress(jsonl(2, 2)))
    (tmp_path / "c.jsonl.gz").write_bytes(b"")
    (tmp_path / "d.jsonl.zst").write_bytes(b"")
    texts, stats = read([tmp_path])
    assert [t.split()[1] for t in texts] == [str(i) for i in range(9)] + ["0", "1", "2", "3"]
    assert stats.counts == {}


def test_corrupt_parquet_pages_are_an_error_naming_the_file(tmp_path):
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " + "word " * 40 for i in range(2000)]}), p, row_group_size=500)
    data = bytearray(p.read_bytes())
    for j in range(2000, 2016):
        data[j] ^= 0x5A
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"rows.parquet: corrupt Parquet data"):
        read([p])


# ----------------------------------------------------------------------------- bad lines


def test_deeply_nested_json_line_is_counted_and_skipped(tmp_path, capsys):
    p = tmp_path / "deep.jsonl"
    p.write_bytes(
        jsonl(1) + b"[" * 100_000 + b"]" * 100_000 + b"\n" + jsonl(1, 1) + b'{"text": ' + b"[" * 100_000 + b"\n"
    )
    texts, stats = read([p])
    assert len(texts) == 2 and stats.counts == {"invalid_json": 2}
    assert stats.examples == [f"{p}:2: invalid_json", f"{p}:4: invalid_json"]
    with pytest.raises(DataError, match=r"deep.jsonl:2: JSON nested deeper .* \(--strict\)"):
        read([p], strict=True)
    rc, err = cli(
        capsys, "prepare", "--input", p, "--out", tmp_path / "out", "--vocab-size", "300", "--workers", "1", "--strict"
    )
    assert rc == 2 and "deep.jsonl:2" in one_error_line(err)


def test_integers_longer_than_pythons_digit_limit_keep_the_document(tmp_path):
    """Python refuses int() of over 4300 digits (a ValueError inside json.loads): valid JSON all the same."""
    big = "7" * 5000
    p = tmp_path / "big.jsonl"
    p.write_text(
        f'{{"text": "keep me", "id": {big}}}\n'
        f'{{"text": "and me", "id": 5, "count": -{big}, "n": [1, {big}]}}\n'
        f'{{"text": "broken", "id": {big}\n'
    )
    stats = ReadStats()
    docs = list(iter_documents(plan_inputs([str(p)], id_field="id"), id_field="id", stats=stats))
    assert [(d.text, d.doc_id) for d in docs] == [("keep me", big), ("and me", "5")]
    assert stats.counts == {"invalid_json": 1} and stats.examples == [f"{p}:3: invalid_json"]


def test_odd_values_in_records_never_crash_the_writer(model, tmp_path):
    """Lone surrogates in an id, a non-string text, an id of any JSON type, an undecodable file name."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "r.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"text": "one", "id": "\ud800x"}),
                json.dumps({"text": {"nested": "no"}, "id": "b"}),
                json.dumps({"text": "three", "id": [1, {"k": None}]}),
                json.dumps({"text": "four", "id": 4.5}),
            ]
        )
        + "\n"
    )
    with open(os.path.join(os.fsencode(d), b"caf\xe9.txt"), "wb") as f:  # not valid UTF-8
        f.write(b"named in latin-1")
    out = tmp_path / "out"
    m = prepare([str(d)], str(out), tokenizer=model, workers=1, id_field="id")
    assert m["num_documents"] == 4 and m["skipped"] == {"non_string_text": 1}
    index = json.loads((out / "index.json").read_text())
    samples = [s for _, _, s in iter_shard_samples(str(out), index)]
    assert [s["doc_id"] for s in samples] == [f"{d}/caf\ufffd.txt", "\ufffdx", '[1, {"k": null}]', "4.5"]


# ----------------------------------------------------------------------------- files a walk cannot read


def test_broken_symlink_fifo_and_binary_text_are_skipped_and_counted(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("good text")
    (d / "b.txt").symlink_to(tmp_path / "nowhere.txt")
    os.mkfifo(d / "c.txt")  # opening it would block forever
    (d / "d.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00binary")
    corpus = plan_inputs([str(d)])
    assert [os.path.basename(f.path) for f in corpus.files] == ["a.txt", "d.txt"]
    assert corpus.file_stats.counts == {"unreadable_file": 2}
    assert corpus.file_stats.examples == [
        f"{d}/b.txt (broken symbolic link): unreadable_file",
        f"{d}/c.txt (not a regular file): unreadable_file",
    ]
    texts, stats = read([d])
    assert texts == ["good text"] and stats.counts == {"binary_file": 1}
    rc, err = cli(capsys, "prepare", "--input", d / "b.txt", "--out", tmp_path / "o")
    assert rc == 2 and one_error_line(err) == f"mnemo: error: input {d}/b.txt: broken symbolic link"


def test_symlinked_directories_are_walked_once_and_loops_counted(tmp_path):
    ext = tmp_path / "ext"
    (ext / "deep").mkdir(parents=True)
    (ext / "e.txt").write_text("external")
    (ext / "deep" / "f.txt").write_text("external deep")
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_text("local z")
    (d / "sub" / "s.txt").write_text("local sub")
    (d / "again").symlink_to(ext)  # walked (first in sorted order)
    (d / "linked").symlink_to(ext)  # the same directory again: its files are in already
    (d / "loop").symlink_to(d)  # the walk's own root
    (d / "sub" / "up").symlink_to("..")  # an ancestor
    (ext / "back").symlink_to(d)  # from inside the linked directory back to the root
    corpus = plan_inputs([str(d)])
    # Each directory's files (sorted), then its subdirectories (sorted), depth first.
    assert [os.path.relpath(f.path, d) for f in corpus.files] == [
        "z.txt",
        "again/e.txt",
        "again/deep/f.txt",
        "sub/s.txt",
    ]
    assert corpus.file_stats.counts == {"symlink_loop": 3, "duplicate_dir": 1}
    assert corpus.file_stats.examples == [
        f"{d}/again/back (link to {d}, a directory above it): symlink_loop",
        f"{d}/linked (link to {ext}, walked already as {d}/again): duplicate_dir",
        f"{d}/loop (link to {d}, a directory above it): symlink_loop",
        f"{d}/sub/up (link to {d}, a directory above it): symlink_loop",
    ]
    texts, stats = read([d])
    assert texts == ["local z", "external", "external deep", "local sub"]


@pytest.mark.timeout(60)
def test_recursive_glob_walks_each_directory_once_like_a_directory_input(tmp_path, monkeypatch):
    # glob.glob(recursive=True) follows links to a directory above: two of them made it walk forever.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("top")
    d = tmp_path / "tree" / "d"
    (d / "__pycache__").mkdir(parents=True)
    (d / "f.txt").write_text("deep")
    (d / "__pycache__" / "c.txt").write_text("skipped, as in a walk")
    (tmp_path / "tree" / "a.md").write_text("shallow")
    (tmp_path / "tree" / "b.png").write_bytes(b"\x89PNG")
    (d / "up").symlink_to("..")
    (d / "up2").symlink_to("..")
    loops = {"symlink_loop": 2}
    walked = plan_inputs(["tree"])
    assert [f.path for f in walked.files] == ["tree/a.md", "tree/d/f.txt"]
    assert walked.file_stats.counts == {**loops, "unsupported_file": 1}
    for pattern, paths, counts in [
        ("tree/**/*.txt", ["tree/d/f.txt"], loops),
        ("tree/**", ["tree/a.md", "tree/d/f.txt"], {**loops, "unsupported_file": 1}),
        ("**/*.txt", ["doc.txt", "tree/d/f.txt"], loops),
        ("t*/**/d/*", ["tree/d/f.txt"], loops),
        ("tree/*.md", ["tree/a.md"], {}),
    ]:
        corpus = plan_inputs([pattern])
        assert [f.path for f in corpus.files] == paths, pattern
        assert corpus.file_stats.counts == counts, pattern
    assert corpus.file_stats.examples == []
    assert plan_inputs([str(tmp_path / "tree/**/*.txt")]).file_stats.examples == [
        f"{tmp_path}/tree/d/up (link to {tmp_path}/tree, a directory above it): symlink_loop",
        f"{tmp_path}/tree/d/up2 (link to {tmp_path}/tree, a directory above it): symlink_loop",
    ]
    with pytest.raises(DataError, match=r"input nope/\*\*/\*.txt: no file matches this pattern"):
        plan_inputs(["nope/**/*.txt"])
    # A glob (or the part before its **) matching __pycache__ read it, where a directory walk skips it.
    (tmp_path / "flat" / "__pycache__").mkdir(parents=True)
    (tmp_path / "flat" / "__pycache__" / "p.txt").write_text("bytecode's neighbour")
    (tmp_path / "flat" / "x.txt").write_text("text")
    for pattern in ("flat/*", "flat/**"):
        assert [f.path for f in plan_inputs([pattern]).files] == ["flat/x.txt"], pattern
    with pytest.raises(DataError, match=r"input flat/\*/\*\*: no file matches this pattern"):
        plan_inputs(["flat/*/**"])  # its only directory is __pycache__


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_in_a_walk_is_counted_and_named_one_is_an_error(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("good")
    (d / "secret.txt").write_text("no")
    (d / "secret.txt").chmod(0)
    assert read([d])[0] == ["good"] and plan_inputs([str(d)]).file_stats.counts == {"unreadable_file": 1}
    with pytest.raises(DataError, match="secret.txt: permission denied"):
        plan_inputs([str(d / "secret.txt")])


@pytest.mark.parametrize("codec", ["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-be"])
def test_text_files_with_a_byte_order_mark_are_decoded(tmp_path, codec):
    text = "héllo wörld 日本 🎉\nline two\n"
    p = tmp_path / "t.txt"
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff", "utf-32-be": b"\x00\x00\xfe\xff"}.get(codec, b"")
    p.write_bytes(bom + text.encode(codec))
    texts, stats = read([p])
    assert texts == [text] and stats.counts == {}
    # Named explicitly with an unknown extension (NUL bytes in UTF-16/32) it is text, not "binary".
    q = tmp_path / "t.notes"
    q.write_bytes(p.read_bytes())
    assert read([q])[0] == [text]


def test_jsonl_byte_order_marks(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl(2))
    assert len(read([tmp_path / "a.jsonl"])[0]) == 2
    (tmp_path / "b.jsonl").write_bytes(jsonl(2).decode().encode("utf-16"))
    with pytest.raises(DataError, match=r"b.jsonl: UTF-16 text \(byte order mark\); JSONL must be UTF-8"):
        read([tmp_path / "b.jsonl"])


def test_input_that_changes_or_vanishes_after_planning_is_an_error(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(50))
    (tmp_path / "b.txt").write_text("text")
    corpus = plan_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")])
    (tmp_path / "a.jsonl").write_bytes(jsonl(20))
    with pytest.raises(DataError, match=r"a.jsonl: .* bytes now, .* when the inputs were planned"):
        list(iter_documents(corpus))
    (tmp_path / "a.jsonl").write_bytes(jsonl(50))
    mtime = corpus.files[0].mtime_ns  # a.jsonl as planned again: its old bytes and mtime
    os.utime(tmp_path / "a.jsonl", ns=(mtime, mtime))
    (tmp_path / "b.txt").unlink()
    with pytest.raises(DataError, match=r"b.txt: disappeared while reading"):
        list(iter_documents(corpus))


@pytest.mark.parametrize("name", ["b.txt", "b.jsonl", "b.jsonl.gz", "b.jsonl.zst", "b.parquet"])
def test_input_replaced_by_a_fifo_after_planning_is_an_error_not_a_hang(tmp_path, name):
    """Only planning looked at what each input is: a FIFO put in a file's place afterwards blocked the
    reader's open() forever (text, JSONL, pyarrow's compressed streams and Parquet alike)."""
    path = tmp_path / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"text": ["one", "two"]}), path)
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(jsonl(3)))
    elif name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(3)))
    else:
        path.write_bytes(jsonl(3))
    corpus = plan_inputs([str(path)])
    path.unlink()
    os.mkfifo(path)

    caught: list[BaseException] = []

    def read() -> None:
        try:
            list(iter_documents(corpus))
        except BaseException as e:
            caught.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # blocked in open(): a writer end opened and closed lets it go on to EOF
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail(f"reading {name} blocked on the FIFO")
    assert len(caught) == 1 and isinstance(caught[0], DataError), caught
    assert re.match(rf"input .*{name}: a FIFO \(named pipe\), not a regular file \(changed", str(caught[0]))


def test_a_file_met_twice_or_hard_linked_is_read_once_and_counted(model, tmp_path, capsys):
    """A file given twice, or a hard link to one, was dropped with no count and no name."""
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_bytes(jsonl(3))
    os.link(d / "a.jsonl", d / "b.jsonl")
    out = tmp_path / "out"
    rc, err = cli(capsys, "prepare", "--input", d / "a.jsonl", d, "--out", out, "--tokenizer", model, "--workers", "1")
    assert rc == 0, err
    assert "skipped: duplicate_file=2 (see manifest.json)" in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_documents"] == 3 and m["skipped"] == {"duplicate_file": 2}
    assert m["skipped_examples"] == [
        f"{d / 'a.jsonl'} (same file as {d / 'a.jsonl'}): duplicate_file",
        f"{d / 'b.jsonl'} (same file as {d / 'a.jsonl'}): duplicate_file",
    ]


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux /proc")
def test_a_proc_file_whose_size_says_zero_is_an_honest_error():
    """It said 'N bytes now, 0 when the inputs were planned (changed while being read); rerun when it no
    longer changes': a rerun never helps, the size of a /proc file is always 0."""
    with pytest.raises(DataError, match=r"^input /proc/cpuinfo: its size says 0 bytes but it holds data .*copy it"):
        list(iter_documents(plan_inputs(["/proc/cpuinfo"])))


def test_an_empty_out_or_input_is_refused_by_name(model, tmp_path, capsys, monkeypatch):
    """--out '' was taken as the current directory; --input '' said 'input : no such file or directory'."""
    (tmp_path / "a.jsonl").write_bytes(jsonl(3))
    monkeypatch.chdir(tmp_path)
    for args, needle in [
        (["prepare", "--input", "a.jsonl", "--out", "", "--tokenizer", model], "--out is empty"),
        (["prepare", "--input", "a.jsonl", "", "--out", "o", "--tokenizer", model], "--input: an empty path"),
        (["tokenizer", "train", "--input", "a.jsonl", "--vocab-size", "300", "--out", ""], "--out is empty"),
    ]:
        rc, err = cli(capsys, *args)
        assert rc == 2 and one_error_line(err).startswith(f"mnemo: error: {needle}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


# ----------------------------------------------------------------------------- --max-doc-bytes


def test_documents_over_the_bound_are_skipped_and_counted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "big.txt").write_text("x" * 101)
    (d / "fits.txt").write_text("y" * 100)
    (d / "lines.jsonl").write_bytes(
        b'{"text": "' + b"z" * 200 + b'"}\n' + b'{"text": "ok"}\n' + b'{"text": "' + b"w" * 86 + b'"}'
    )  # the last line: exactly 100 bytes
    pq.write_table(pa.table({"text": ["p" * 101, "small", "é" * 51]}), d / "rows.parquet")
    (d / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "' + b"q" * 5000 + b'"}\n{"text": "after"}\n'))
    texts, stats = read([d], max_doc_bytes=100)
    assert texts == ["after", "y" * 100, "ok", "w" * 86, "small"]
    assert stats.counts == {"too_large": 5}
    assert f"{d}/lines.jsonl:1: too_large" in stats.examples and f"{d}/rows.parquet:row 2: too_large" in stats.examples


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_the_bound_counts_a_jsonl_line_without_its_newline_crlf_included(tmp_path, newline):
    """A line of exactly N bytes ending in CRLF was skipped as too_large; with LF it was kept."""
    line = b'{"text": "' + b"w" * 88 + b'"}'
    over = b'{"text": "' + b"x" * 89 + b'"}'
    assert len(line) == 100 and len(over) == 101
    (tmp_path / "a.jsonl").write_bytes(line + newline + over + newline + line + newline)
    texts, stats = read([tmp_path / "a.jsonl"], max_doc_bytes=100)
    assert texts == ["w" * 88, "w" * 88] and stats.counts == {"too_large": 1}


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz"])
def test_a_long_line_is_skipped_without_being_held_whole(tmp_path, suffix):
    line = b'{"text": "' + b"a" * (24 << 20) + b'"}\n'
    data = jsonl(1) + line + jsonl(1, 1)
    p = tmp_path / f"long.{suffix}"
    p.write_bytes(gzip.compress(data, compresslevel=1) if suffix.endswith("gz") else data)
    del line, data
    tracemalloc.start()
    try:
        texts, stats = read([p], max_doc_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(texts) == 2 and stats.counts == {"too_large": 1}
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB for a 24 MiB line with a 1 MiB bound"


def test_max_doc_bytes_flag(model, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl(3) + b'{"text": "' + b"v" * 3000 + b'"}\n')
    out = tmp_path / "out"
    rc, err = cli(
        capsys,
        "prepare",
        "--input",
        tmp_path / "a.jsonl",
        "--out",
        out,
        "--tokenizer",
        model,
        "--workers",
        "1",
        "--max-doc-bytes",
        "2K",
    )
    assert rc == 0
    assert (
        "skipped: too_large=1 (too_large: documents over --max-doc-bytes 2,048 bytes, left out whole, "
        "not split) (see manifest.json)"
    ) in err
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_documents"] == 3 and m["max_doc_bytes"] == 2048 and m["skipped"] == {"too_large": 1}
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    assert "--max-doc-bytes N" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", "--input", "x", "--out", "y", "--max-doc-bytes", "0"])
    assert "not a positive byte count" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["9223372036854775807", "8388608T", "99999999999999999999999G", "9" * 5000])
@pytest.mark.parametrize("command", ["prepare", "tokenizer train"])
def test_a_huge_max_doc_bytes_is_one_line_naming_the_flag(tmp_path, capsys, command, value):
    """It was taken, and a JSONL input then ended in an OverflowError traceback (readline(bound + 2)
    past a C ssize_t)."""
    (tmp_path / "a.jsonl").write_bytes(jsonl(3))
    args = ["--input", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--max-doc-bytes", value]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*command.split(), *args, *(["--vocab-size", "300"] if command != "prepare" else [])])
    line = one_error_line(capsys.readouterr().err)
    assert e.value.code == 2 and "argument --max-doc-bytes: " in line and "is over the largest byte count" in line
    assert len(line) < 300 and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
    with pytest.raises(DataError, match=r"--max-doc-bytes must be at most 4,611,686,018,427,387,904"):
        read([tmp_path / "a.jsonl"], max_doc_bytes=1 << 63)


# ----------------------------------------------------------------------------- data verify on damaged metadata


def test_verify_and_inspect_report_malformed_metadata_in_one_line(model, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_bytes(jsonl(5))
    out = tmp_path / "out"
    prepare([str(tmp_path / "a.jsonl")], str(out), tokenizer=model, workers=1)
    index, manifest = (out / "index.json").read_text(), (out / "manifest.json").read_text()
    both = ("verify", "inspect")
    for name, text, needle, commands in [
        ("index.json", "[]", "index.json: not a JSON object", both),
        ("index.json", '{"shards": [{}]}', "index.json: a shard entry is {}, not an object with 'raw_data'", both),
        ("index.json", '{"shards": 5}', "malformed (TypeError", both),
        ("manifest.json", "[1, 2]", "manifest.json: not a JSON object", both),
        (
            "manifest.json",
            json.dumps({**json.loads(manifest), "token_dtype": "nope"}),
            "malformed (TypeError",
            ("verify",),
        ),
    ]:  # inspect only prints the dtype
        (out / "index.json").write_text(index)
        (out / "manifest.json").write_text(manifest)
        (out / name).write_text(text)
        for command in commands:
            rc, err = cli(capsys, "data", command, out)
            assert rc == 2 and needle in one_error_line(err), (name, text, command)


def test_a_fifo_in_out_is_one_line_not_a_hang(model, tmp_path, capsys):
    """prepare reads --out's manifest.json (is it done?): a FIFO there hung it."""
    import signal

    (tmp_path / "a.jsonl").write_bytes(jsonl(3))
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "manifest.json")

    def too_slow(*_):
        raise TimeoutError("prepare blocked")

    old = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        rc, err = cli(capsys, "prepare", "--input", tmp_path / "a.jsonl", "--out", out, "--tokenizer", model)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert rc == 2
    assert (
        one_error_line(err)
        == f"mnemo: error: {out}/manifest.json: unreadable (a FIFO (named pipe), not a regular file)"
    )
