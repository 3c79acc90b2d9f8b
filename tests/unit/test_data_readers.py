"""Corpus readers: every input format, work-unit splitting, and each bad input."""

from __future__ import annotations

import gzip
import io
import json
import re
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.inputs import Piece, ReadStats, plan_inputs, split_units
from mnemo.data_pipeline.readers import iter_documents, iter_piece, iter_unit


def texts(corpus, **kw) -> list[str]:
    return [d.text for d in iter_documents(corpus, **kw)]


def write_jsonl(path, records, compress=None) -> None:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def test_directories_recursive_sorted_hidden_and_binaries_skipped(tmp_path):
    d = tmp_path / "c"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "__pycache__").mkdir()
    (d / "b.py").write_text("print('b')\n")
    (d / "a.md").write_text("# A\n")
    (d / "sub" / "c.txt").write_text("c text")
    (d / "sub" / "deeper" / "d.rst").write_text("d\n=\n")
    (d / "Makefile").write_text("all:\n\techo hi\n")
    (d / ".git" / "config.txt").write_text("hidden")
    (d / ".hidden.py").write_text("hidden")
    (d / "__pycache__" / "b.cpython-311.pyc").write_bytes(b"\0\1\2")
    (d / "image.png").write_bytes(b"\x89PNG\0\0")
    corpus = plan_inputs([str(d)])
    names = [os.path.relpath(f.path, d) for f in corpus.files]
    assert names == ["Makefile", "a.md", "b.py", "sub/c.txt", "sub/deeper/d.rst"]
    assert corpus.skipped_files == 1  # image.png; hidden entries and __pycache__ are not even counted
    assert texts(corpus) == ["all:\n\techo hi\n", "# A\n", "print('b')\n", "c text", "d\n=\n"]


def test_mixed_inputs_keep_the_given_order_and_dedupe(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "1.py").write_text("one")
    (tmp_path / "g" / "2.py").write_text("two")
    corpus = plan_inputs(
        [str(tmp_path / "y.txt"), str(tmp_path / "g" / "*.py"), str(tmp_path / "x.txt"), str(tmp_path / "y.txt")]
    )
    assert texts(corpus) == ["y", "one", "two", "x"]
    # The repeat was dropped without a word; now counted and named like every other skip.
    assert corpus.file_stats.counts == {"duplicate_file": 1}
    assert corpus.file_stats.examples == [f"{tmp_path / 'y.txt'} (same file as {tmp_path / 'y.txt'}): duplicate_file"]


def test_explicit_unknown_extension_text_is_read_binary_is_an_error(tmp_path):
    (tmp_path / "NOTES").write_text("plain notes")
    assert texts(plan_inputs([str(tmp_path / "NOTES")])) == ["plain notes"]
    (tmp_path / "blob.bin").write_bytes(b"abc\0def")
    with pytest.raises(DataError, match="blob.bin: looks binary"):
        plan_inputs([str(tmp_path / "blob.bin")])


def test_jsonl_plain_gz_zst_with_ids(tmp_path):
    recs = [{"text": f"doc {i}\n\tindented", "id": f"id-{i}", "n": i} for i in range(5)]
    for suffix, comp in ((".jsonl", None), (".jsonl.gz", "gz"), (".jsonl.zst", "zst")):
        p = tmp_path / f"c{suffix}"
        write_jsonl(p, recs, comp)
        docs = list(iter_documents(plan_inputs([str(p)]), id_field="id"))
        assert [d.text for d in docs] == [r["text"] for r in recs]
        assert [d.doc_id for d in docs] == [r["id"] for r in recs]
        assert {d.source for d in docs} == {str(p)}
    docs = list(iter_documents(plan_inputs([str(tmp_path / "c.jsonl")])))
    assert [d.doc_id for d in docs] == [f"{tmp_path / 'c.jsonl'}:{i + 1}" for i in range(5)]  # file:line
    # another text field, and a non-string id
    p = tmp_path / "other.jsonl"
    write_jsonl(p, [{"content": "hello", "n": 7}])
    docs = list(iter_documents(plan_inputs([str(p)]), text_field="content", id_field="n"))
    assert [(d.text, d.doc_id) for d in docs] == [("hello", "7")]


def _parquet(path, n=50, group=7, name="text"):
    table = pa.table({name: [f"row {i}\n  text" for i in range(n)], "id": [f"r{i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=group)


def test_parquet_rows_in_order_with_ids(tmp_path):
    p = tmp_path / "c.parquet"
    _parquet(p)
    docs = list(iter_documents(plan_inputs([str(p)]), id_field="id"))
    assert [d.text for d in docs] == [f"row {i}\n  text" for i in range(50)]
    assert [d.doc_id for d in docs] == [f"r{i}" for i in range(50)]


def test_parquet_without_text_column_names_file_and_columns(tmp_path):
    p = tmp_path / "c.parquet"
    _parquet(p, name="body")
    with pytest.raises(DataError) as e:
        plan_inputs([str(p)])
    msg = str(e.value)
    assert str(p) in msg and "'text'" in msg and "body, id" in msg
    assert len(plan_inputs([str(p)], text_field="body").files) == 1
    with pytest.raises(DataError, match="no column 'uid'"):
        plan_inputs([str(p)], text_field="body", id_field="uid")


@pytest.mark.parametrize("dup", ["text", "id"])
def test_parquet_with_a_duplicated_text_or_id_column_is_an_error_before_reading(tmp_path, dup):
    p = tmp_path / "dup.parquet"
    names = ["text", "id", dup]
    schema = pa.schema([(n, pa.string()) for n in names])
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])], schema=schema), p)
    with pytest.raises(DataError) as e:
        plan_inputs([str(p)], id_field="id")
    msg = str(e.value)
    assert msg.startswith(f"input {p}: column {dup!r}") and "2 times" in msg
    assert "\n" not in msg


def test_parquet_with_another_column_duplicated_is_read(tmp_path):
    p = tmp_path / "dup.parquet"
    schema = pa.schema([("text", pa.string()), ("x", pa.int64()), ("x", pa.int64())])
    pq.write_table(pa.Table.from_arrays([pa.array(["a", "b"]), pa.array([1, 2]), pa.array([3, 4])], schema=schema), p)
    assert texts(plan_inputs([str(p)])) == ["a", "b"]


def test_corrupt_parquet_is_an_error(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet"):
        plan_inputs([str(p)])


@pytest.mark.parametrize("unit_bytes", [1, 7, 40, 64, 333, 10_000])
def test_jsonl_byte_ranges_cover_every_line_exactly_once(tmp_path, unit_bytes):
    p = tmp_path / "c.jsonl"
    recs = [{"text": "x" * (i % 13) + f" doc{i}"} for i in range(60)]
    write_jsonl(p, recs)
    corpus = plan_inputs([str(p)])
    units = split_units(corpus.files, unit_bytes)
    if unit_bytes < os.path.getsize(p):
        assert len(units) > 1
    got = [d.text for u in units for d in iter_unit(u)]
    assert got == [r["text"] for r in recs]


@pytest.mark.parametrize("unit_bytes", [1, 300, 10**9])
def test_parquet_row_group_ranges_cover_every_row_exactly_once(tmp_path, unit_bytes):
    p = tmp_path / "c.parquet"
    _parquet(p, n=50, group=7)
    units = split_units(plan_inputs([str(p)]).files, unit_bytes)
    assert (len(units) > 1) == (unit_bytes < 10**9)
    assert [d.text for u in units for d in iter_unit(u)] == [f"row {i}\n  text" for i in range(50)]


def test_small_files_are_packed_into_units_in_order(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text("a" * 100)
    units = split_units(plan_inputs([str(tmp_path)]).files, 350)
    assert [len(u.pieces) for u in units] == [3, 3, 3, 1]
    assert [u.name for u in units] == [f"part-{i:05d}" for i in range(4)]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good"}\n{"text": "bad \xff byte"}\n')
    stats = ReadStats()
    got = texts(plan_inputs([str(tmp_path / "bad.txt"), str(p)]), stats=stats)
    assert got == ["caf\ufffd ok \ufffd\ufffd end", "good", "bad \ufffd byte"]
    assert stats.counts == {"invalid_utf8": 2}
    assert f"{p}:2: invalid_utf8" in stats.examples


def _not_utf8(cells, large=False):
    """A string column holding the bytes ``cells`` as they are (pyarrow does not check them)."""
    binary, string = (pa.large_binary(), pa.large_string()) if large else (pa.binary(), pa.string())
    return pa.array(cells, binary).view(string)


@pytest.mark.parametrize("kind", ["string", "large_string", "dictionary"])
def test_invalid_utf8_in_a_parquet_string_column_is_replaced_and_counted(tmp_path, kind):
    # to_pylist() of such a column raised for the whole batch: the run stopped as "corrupt Parquet data".
    text = _not_utf8([b"good doc", b"bad \xff doc", None, b"good doc"], large=kind == "large_string")
    ids = _not_utf8([b"a", b"b\xfe", b"c", b"d"], large=kind == "large_string")
    if kind == "dictionary":
        text, ids = text.dictionary_encode(), ids.dictionary_encode()
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": text, "id": ids}), p)
    assert pq.read_schema(p).field("text").type == text.type
    stats = ReadStats()
    docs = list(iter_documents(plan_inputs([str(p)], id_field="id"), id_field="id", stats=stats))
    assert [(d.text, d.doc_id) for d in docs] == [
        ("good doc", "a"),
        ("bad \ufffd doc", "b\ufffd"),
        ("good doc", "d"),
    ]
    assert stats.counts == {"invalid_utf8": 1, "non_string_text": 1}  # the null cell, as a JSONL null
    assert stats.examples[0] == f"{p}:row 1: invalid_utf8"
    # A binary id column is decoded alike (it was json.dumps'ed, failed, and counted as invalid_id).
    pq.write_table(pa.table({"text": ["x"], "id": pa.array([b"i\xfed"], pa.binary())}), p)
    assert [d.doc_id for d in iter_documents(plan_inputs([str(p)], id_field="id"), id_field="id")] == ["i\ufffdd"]


def test_lone_surrogate_escapes_are_replaced_and_counted(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "a \\ud800 b \\ud83d\\ude00"}\n')
    stats = ReadStats()
    assert texts(plan_inputs([str(p)]), stats=stats) == ["a \ufffd b \U0001f600"]
    assert stats.counts == {"invalid_utf8": 1}


def test_utf8_encoded_surrogates_in_jsonl_are_replaced_per_byte_as_in_text_files(tmp_path):
    # ED A0 80 ED B0 80: a surrogate pair written as UTF-8 (CESU-8), not valid UTF-8. json.loads of the bytes
    # decoded it with "surrogatepass" into U+10000; a text file (and Parquet) gives U+FFFD per byte.
    bad = b"\xed\xa0\x80\xed\xb0\x80"
    (tmp_path / "s.txt").write_bytes(b"a " + bad)
    (tmp_path / "s.jsonl").write_bytes(b'{"text": "a ' + bad + b'"}\n\xef\xbb\xbf{"text": "bom"}\n')
    stats = ReadStats()
    got = texts(plan_inputs([str(tmp_path / "s.txt"), str(tmp_path / "s.jsonl")]), stats=stats)
    assert got[0] == got[1] == "a " + "\ufffd" * 6 and got[2] == "bom"
    assert stats.counts == {"invalid_utf8": 2}


def test_empty_and_whitespace_documents_are_skipped_and_counted(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "ws.md").write_text(" \n\t \r\n")
    (tmp_path / "ok.txt").write_text(" ok ")
    write_jsonl(tmp_path / "c.jsonl", [{"text": ""}, {"text": "  \n"}, {"text": "fine"}])
    stats = ReadStats()
    assert texts(plan_inputs([str(tmp_path)]), stats=stats) == ["fine", " ok "]
    assert stats.counts == {"empty": 4}
    # Blank is Unicode White_Space: U+001C..U+001F (str.isspace() says yes) are text, U+3000 and NBSP are not.
    (tmp_path / "sep.txt").write_bytes(b"\x1c\x1d\x1e\x1f")
    (tmp_path / "ideo.txt").write_text("\u3000\xa0\u2028 \x85")
    stats = ReadStats()
    got = texts(plan_inputs([str(tmp_path / "sep.txt"), str(tmp_path / "ideo.txt")]), stats=stats)
    assert got == ["\x1c\x1d\x1e\x1f"] and stats.counts == {"empty": 1}


BAD_LINES = [
    '{"text": "one"}',
    "this is not json",
    '{"text": "three"}',
    '{"body": "no text field"}',
    '["a", "list"]',
    '{"text": 42}',
    "",
    '{"text": "eight"',
    '{"text": "nine"}',
]


def test_bad_jsonl_lines_are_skipped_and_counted_with_file_and_line(tmp_path):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, BAD_LINES)
    stats = ReadStats()
    assert texts(plan_inputs([str(p)]), stats=stats) == ["one", "three", "nine"]
    assert stats.counts == {"invalid_json": 3, "missing_text_field": 1, "non_string_text": 1}
    assert stats.examples == [
        f"{p}:2: invalid_json",
        f"{p}:4: missing_text_field",
        f"{p}:5: invalid_json",
        f"{p}:6: non_string_text",
        f"{p}:8: invalid_json",
    ]


def test_line_numbers_are_right_inside_later_byte_ranges(tmp_path):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, [{"text": f"doc {i}"} for i in range(40)] + ["garbage"] + [{"text": "last"}])
    units = split_units(plan_inputs([str(p)]).files, 50)
    stats = ReadStats()
    for u in units:
        list(iter_unit(u, stats=stats))
    assert stats.examples == [f"{p}:41: invalid_json"]
    with pytest.raises(DataError, match=rf"{p}:41: not valid JSON \(--strict\)"):
        for u in units:
            list(iter_unit(u, strict=True))


@pytest.mark.parametrize("line_no,needle", [(2, "not valid JSON"), (4, "no field 'text'"), (6, "is a number, not")])
def test_strict_makes_bad_lines_fatal_naming_file_and_line(tmp_path, line_no, needle):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, ['{"text": "ok"}'] * (line_no - 1) + [BAD_LINES[line_no - 1], '{"text": "after"}'])
    with pytest.raises(DataError, match=rf"{p}:{line_no}: .*{needle}"):
        texts(plan_inputs([str(p)]), strict=True)


@pytest.mark.parametrize(
    "value,name",
    [("null", "null"), ("true", "a boolean"), ("4.5", "a number"), ("[1]", "an array"), ("{}", "an object")],
)
def test_strict_names_the_json_type_of_a_non_string_text(tmp_path, value, name):
    p = tmp_path / "c.jsonl"
    p.write_text(f'{{"text": {value}}}\n')
    with pytest.raises(DataError, match=rf"{p}:1: field 'text' is {name}, not a string \(--strict\)\Z"):
        texts(plan_inputs([str(p)]), strict=True)


def test_missing_inputs_fail_before_reading(tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    with pytest.raises(DataError, match="nope.txt: no such file or directory"):
        plan_inputs([str(tmp_path / "ok.txt"), str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match=r"\*.jsonl: no file matches"):
        plan_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"\0")
    with pytest.raises(DataError, match="no supported input files"):
        plan_inputs([str(tmp_path / "d")])


def test_an_input_that_cannot_be_looked_at_names_the_real_error_not_a_missing_file(tmp_path, monkeypatch):
    """A file in a folder without search (x) permission was "no such file or directory": os.path.lexists
    and isdir say False on any error. Faked (CI runs as root, whom permissions do not stop)."""
    (tmp_path / "d").mkdir()
    locked = tmp_path / "d" / "a.txt"
    locked.write_text("hello")
    real_lstat, real_stat = os.lstat, os.stat

    def denied(real):
        def look(path, *args, **kwargs):
            if os.fspath(path).startswith(str(locked)):
                raise PermissionError(13, os.strerror(13), os.fspath(path))
            return real(path, *args, **kwargs)

        return look

    monkeypatch.setattr(os, "lstat", denied(real_lstat))
    monkeypatch.setattr(os, "stat", denied(real_stat))
    for given in (str(locked), str(locked) + "*"):
        with pytest.raises(DataError, match=rf"^input {re.escape(given)}: Permission denied$"):
            plan_inputs([given])
    with pytest.raises(DataError, match="nope.txt: no such file or directory"):
        plan_inputs([str(tmp_path / "d" / "nope.txt")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches any folder")
def test_an_input_in_a_folder_without_search_permission_is_permission_denied(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("hello")
    (tmp_path / "d").chmod(0o644)
    try:
        with pytest.raises(DataError, match=r"a.txt: Permission denied$"):
            plan_inputs([str(tmp_path / "d" / "a.txt")])
    finally:
        (tmp_path / "d").chmod(0o755)


def test_missing_id_falls_back_to_position_and_is_counted(tmp_path):
    p = tmp_path / "c.jsonl"
    write_jsonl(p, [{"text": "a", "id": "A"}, {"text": "b"}])
    stats = ReadStats()
    docs = list(iter_piece(Piece(plan_inputs([str(p)]).files[0]), id_field="id", stats=stats))
    assert [d.doc_id for d in docs] == ["A", f"{p}:2"]
    assert stats.counts == {"missing_id": 1}


# ----------------------------------------------------------------------------- inputs that change while read

_OLD_NS = 1_000_000_000 * 10**9  # an mtime in the past: any later write gives the file a new one


def _same_size_input(path, kind: str, upper: bool = False) -> None:
    """An input of ``kind`` whose bytes have the same size whether ``upper`` or not (the texts differ)."""
    words = [f"document {i} lorem ipsum" for i in range(3000)]
    words = [w.upper() for w in words] if upper else words
    if kind == "parquet":
        pq.write_table(pa.table({"text": words}), path, row_group_size=1000, compression="none")
    elif kind == "txt":
        path.write_text("\n".join(words))
    elif kind == "jsonl.gz":  # stored, not deflated: the size does not depend on the letters
        path.write_bytes(gzip.compress("".join(json.dumps({"text": w}) + "\n" for w in words).encode(), 0, mtime=0))
    else:
        write_jsonl(path, [{"text": w} for w in words], compress=kind.partition(".")[2] or None)
    os.utime(path, ns=(_OLD_NS, _OLD_NS))


@pytest.mark.parametrize("kind", ["txt", "jsonl", "jsonl.gz", "parquet"])
def test_an_input_replaced_by_another_of_the_same_size_and_mtime_is_an_error(tmp_path, kind):
    """Readers compared only the size with the plan: a file of the same size moved into an input's place
    (cp + mv) between planning and reading was read, the manifest describing the old one."""
    path, new = tmp_path / f"g.{kind}", tmp_path / f"new.{kind}"
    _same_size_input(path, kind)
    _same_size_input(new, kind, upper=True)
    assert new.stat().st_size == path.stat().st_size
    corpus = plan_inputs([str(path)])
    os.replace(new, path)  # the same size and mtime: only the identity (device, inode) tells
    with pytest.raises(DataError, match=rf"^input {path}: changed while being read .*rerun when it no longer"):
        texts(corpus)


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.zst", "parquet"])
def test_an_input_rewritten_in_place_while_read_is_an_error(tmp_path, kind):
    """A file rewritten in place (same size, same inode) while a reader was in it gave a silent mix of
    both versions: its new mtime is now checked after the last read."""
    path = tmp_path / f"g.{kind}"
    _same_size_input(path, kind)
    docs = iter_documents(plan_inputs([str(path)]))
    assert next(docs).text == "document 0 lorem ipsum"
    with open(path, "r+b") as fh:  # in place: no truncation, the same inode and size
        fh.write(path.read_bytes())
    with pytest.raises(DataError, match=rf"^input {path}: changed while being read .*rerun when it no longer"):
        list(docs)


def test_a_text_input_rewritten_in_place_while_read_is_an_error(tmp_path, monkeypatch):
    """The text reader reads a file whole before its document comes out: the rewrite happens in its read loop."""
    import mnemo.data_pipeline.readers as readers

    path = tmp_path / "g.txt"
    _same_size_input(path, "txt")
    corpus = plan_inputs([str(path)])
    real_open = readers.open_regular

    class Rewritten(io.BufferedReader):
        def read(self, size=-1):
            block = super().read(size)
            if self.tell() == len(block):  # after the first chunk, another process rewrites the file
                with open(path, "r+b") as out:
                    out.write(path.read_bytes().upper())
            return block

    def open_rewritten(p, buffering=-1):
        return Rewritten(real_open(p, 0))

    monkeypatch.setattr(readers, "_CHUNK", 4096)
    monkeypatch.setattr(readers, "open_regular", open_rewritten)
    with pytest.raises(DataError, match=rf"^input {path}: changed while being read .*rerun when it no longer"):
        texts(corpus)


@pytest.mark.parametrize(
    "column,row,needle",
    [
        (pa.array(["a", None, "c"]), 1, "column 'text' is null, not a string"),
        (pa.array([b"a", b"b", None], pa.binary()), 2, "column 'text' is null, not a string"),
        (pa.array([1, 2, 3]), 0, "column 'text' is a number, not a string"),
    ],
)
def test_strict_makes_a_parquet_cell_without_text_fatal_naming_file_and_row(tmp_path, column, row, needle):
    """--strict was silently ignored for Parquet: a null or non-string text cell was only counted, exit 0."""
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": column}), p)
    with pytest.raises(DataError, match=rf"{re.escape(str(p))}:row {row}: {needle} \(--strict\)\Z"):
        texts(plan_inputs([str(p)]), strict=True)
    stats = ReadStats()
    texts(plan_inputs([str(p)]), stats=stats)  # without --strict: skipped and counted
    assert sum(stats.counts.values()) == (3 if needle.endswith("a number, not a string") else 1)


def test_strict_makes_a_binary_text_file_fatal_naming_it(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bin.txt").write_bytes(b"ab\0c")
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'bin.txt'))}: a NUL byte .* \(--strict\)\Z"):
        texts(plan_inputs([str(tmp_path)]), strict=True)
    stats = ReadStats()
    assert texts(plan_inputs([str(tmp_path)]), stats=stats) == ["fine"]
    assert stats.counts == {"binary_file": 1}


def test_a_null_text_is_counted_alike_in_jsonl_and_parquet(tmp_path):
    """A null text value was non_string_text in JSONL but missing_text_field in Parquet."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": None}, {"id": 3}])
    pq.write_table(pa.table({"text": ["y", None]}), tmp_path / "b.parquet")
    stats = ReadStats()
    texts(plan_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")]), stats=stats)
    assert stats.counts == {"non_string_text": 2, "missing_text_field": 1}
    assert stats.examples == [
        f"{tmp_path / 'a.jsonl'}:2: non_string_text",
        f"{tmp_path / 'a.jsonl'}:3: missing_text_field",
        f"{tmp_path / 'b.parquet'}:row 1: non_string_text",
    ]


def test_read_stats_keep_a_few_places_of_every_reason_and_merge_as_one_reader_would():
    from mnemo.data_pipeline.inputs import EXAMPLES_PER_REASON, MAX_EXAMPLES

    notes = [("missing_id", f"g.jsonl: x:{i}") for i in range(30)]  # (a place may hold ": ")
    notes += [(f"r{k}", f"f{k}.jsonl:{i}") for k in range(12) for i in range(1, 9)] + [("binary_file", "h.txt")]
    one = ReadStats()
    for reason, where in notes:
        one.note(reason, where)
    assert set(one.counts) == {e.rpartition(": ")[2] for e in one.examples}  # every reason counted has a place
    assert one.examples[:EXAMPLES_PER_REASON] == [f"g.jsonl: x:{i}: missing_id" for i in range(EXAMPLES_PER_REASON)]
    assert one.examples[EXAMPLES_PER_REASON] == "f0.jsonl:1: r0"
    # 5 places each of missing_id, r0, r1 and r2 reach the bound; then the first place of each reason only.
    assert len(one.examples) == MAX_EXAMPLES + 10  # r3..r11 and binary_file
    assert one.examples[-1] == "h.txt: binary_file"
    for cut in (5, 33, 47, 100):  # the same from parts noted apart (worker processes) and merged in order
        merged, a, b = ReadStats(), ReadStats(), ReadStats()
        for reason, where in notes[:cut]:
            a.note(reason, where)
        for reason, where in notes[cut:]:
            b.note(reason, where)
        merged.merge(a.to_json())
        merged.merge(b)
        assert (merged.counts, merged.examples) == (one.counts, one.examples)
        assert ReadStats(**merged.to_json()) == merged
