"""Reading documents from the input files planned by inputs.py.

What one document is:

- a text or source file: the whole file, read as UTF-8, or as UTF-16 /
  UTF-32 / UTF-8 when the file starts with that byte order mark;
- JSONL (plain, ``.gz`` or ``.zst``): one line, the string in ``text_field``;
- Parquet: one row, the string (or binary) column ``text_field``, read one
  record batch at a time.

Bad input is counted in ``ReadStats`` (reason -> count, plus the first few
"file:line: reason" examples) rather than fatal: invalid UTF-8 is decoded with
U+FFFD replacement (the document is kept and counted as ``invalid_utf8``);
empty and whitespace-only documents are skipped (``empty``); a JSONL line that
is not a JSON object (``invalid_json``), lacks the text field
(``missing_text_field``) or holds a non-string there, null included
(``non_string_text``), is skipped, as is a Parquet text cell that is null or
not a string (``non_string_text`` too), and a text file that looks binary
(``binary_file``); with ``strict=True`` each of these records that holds no
text where its format says it should raises ``DataError`` naming file:line
(file:row N, the file) instead.

Memory: no document may take more than ``max_doc_bytes`` input bytes (a text
file's size, a JSONL line without its newline, a Parquet cell's UTF-8 size).
Bigger ones are skipped whole and counted as ``too_large``; text files and
JSONL lines are read in bounded chunks, so a reader never holds more than
about ``max_doc_bytes`` plus one chunk of one document (a Parquet record batch
is read whole: Parquet has no smaller unit). A compressed stream that is
truncated or corrupt, or an input that changes while it is read (its size,
its mtime, or its identity, device and inode, differ from the plan at the open
or after the last read), is a ``DataError`` naming the file: never a silent
partial read or a mix of two versions.

Over 500 lines: one reader per input kind (text, JSONL plain and compressed, Parquet) and the bounded,
non-blocking reads and counts they share; split, each kind would import the same helpers back.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import IO, NamedTuple

from mnemo.data_pipeline.errors import DataError, InputError, first_line
from mnemo.data_pipeline.files import NotRegularFile, open_regular
from mnemo.data_pipeline.limits import MAX_DOC_BYTES
from mnemo.data_pipeline.inputs import Corpus, InputFile, Piece, ReadStats, WorkUnit, byte_order_mark, est_size

# Default of --max-doc-bytes: the most input bytes one document may take.
DEFAULT_MAX_DOC_BYTES = 64 << 20
# Bytes read per call from text files and JSONL streams.
_CHUNK = 1 << 20
# pyarrow's name for the codec of each compressed kind.
_CODECS = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}


class Doc(NamedTuple):
    text: str
    doc_id: str
    source: str
    nbytes: int  # input bytes this document came from (progress only)


def _decode(raw: bytes, where: str, stats: ReadStats, codec: str = "utf-8", label: str = "utf8") -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        stats.note(f"invalid_{label}", where)
        return raw.decode(codec, errors="replace")


# Unicode's White_Space characters. str.isspace() also counts U+001C..U+001F (the information separators,
# not White_Space): a document of them alone was dropped as empty.
_WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)


def is_blank(text: str) -> bool:
    """Empty, or only Unicode White_Space."""
    return not text.strip(_WHITE_SPACE)


def _column_name(path: str) -> str:
    """An input's name in the ``source`` and position ``doc_id`` columns: ``path`` as typed without its ``.``
    and empty parts (``./big//a.txt`` is ``big/a.txt``: spellings of one path give the same shards), in UTF-8
    (``_utf8_name``). ``..`` is kept: ``link/../x`` may be another file than ``x`` (the kernel follows the link
    first), and the file is read at ``path`` itself."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return _utf8_name(("/" if path.startswith("/") else "") + "/".join(parts) if parts else path)


def _utf8_name(path: str) -> str:
    """``path`` as a string that encodes to UTF-8 (undecodable bytes of a file name become U+FFFD).

    The MDS ``str`` columns are UTF-8: a name with such bytes (a surrogate
    escape from the file system) would fail there.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _changed(f: InputFile, now: int) -> DataError:
    if f.size == 0 and now > 0:  # /proc, /sys: the size says 0 whatever they hold, so a rerun never helps
        return DataError(
            f"input {f.path}: its size says 0 bytes but it holds data (a /proc or /sys file?); "
            f"copy it to a regular file and give that"
        )
    return DataError(
        f"input {f.path}: {now:,} bytes now, {f.size:,} when the inputs were planned "
        f"(changed while being read); rerun when it no longer changes"
    )


def _check_unchanged(f: InputFile, fd: int) -> None:
    """DataError unless the file open at ``fd`` is still the one planned: its size, its mtime and, where the
    plan recorded it, its identity (device, inode).

    Checked at the open and again after the last read. The size alone let through another file of the
    same size moved into the input's place (a reader opening it later read the new version, the manifest
    described the old one) and a file rewritten in place while read (a silent mix of two versions).
    """
    st = os.fstat(fd)
    if st.st_size != f.size:
        raise _changed(f, st.st_size)
    if st.st_mtime_ns != f.mtime_ns or (f.ino and (st.st_dev, st.st_ino) != (f.dev, f.ino)):
        raise DataError(
            f"input {f.path}: changed while being read (modified or replaced since the inputs were planned); "
            f"rerun when it no longer changes"
        )


def _open_input(f: InputFile, buffering: int = -1) -> IO[bytes]:
    """``f`` opened for reading, by every reader: planning saw a regular file, but a FIFO put in its
    place since would make a plain open() wait for a writer forever (open_regular never blocks)."""
    try:
        return open_regular(f.path, buffering)
    except NotRegularFile as e:
        raise DataError(f"input {f.path}: {e} (changed since it was planned)") from None


def _bad_record(reason: str, where: str, detail: str, strict: bool, stats: ReadStats) -> None:
    """A record that holds no text where its format says it should (a JSONL line, a Parquet cell, a text file):
    with --strict an error naming ``where``, else skipped and counted under ``reason``."""
    if strict:
        raise DataError(f"{where}: {detail} (--strict)")
    stats.note(reason, where)


def _read_text(f: InputFile, strict: bool, stats: ReadStats, max_doc_bytes: int) -> Iterator[Doc]:
    chunks: list[bytes] = []
    n = 0
    with _open_input(f) as fh:
        _check_unchanged(f, fh.fileno())
        if f.size > max_doc_bytes:
            stats.note("too_large", f.path)
            return
        # Bounded reads: a file that grows past the bound while open is not read whole either.
        while True:
            block = fh.read(min(_CHUNK, max_doc_bytes + 1 - n))
            if not block:
                break
            chunks.append(block)
            n += len(block)
            if n > max_doc_bytes:
                raise _changed(f, n)
        if n != f.size:
            raise _changed(f, n)
        _check_unchanged(f, fh.fileno())  # rewritten in place while read: same size, a new mtime
    raw = b"".join(chunks)
    del chunks
    bom = byte_order_mark(raw[:4])
    if bom is None:
        if b"\0" in raw[:8192]:
            detail = "a NUL byte in its first 8 KiB: a binary file, or UTF-16 without a byte order mark"
            _bad_record("binary_file", f.path, detail, strict, stats)
            return
        text = _decode(raw, f.path, stats)
    else:
        k, codec, label = bom
        text = _decode(raw[k:], f.path, stats, codec, label)
    if is_blank(text):
        stats.note("empty", f.path)
        return
    name = _column_name(f.path)
    yield Doc(text, name, name, n)


class _LineNumbers:
    """1-based line number of a byte offset, counted only when an error needs it."""

    def __init__(self, file: InputFile, first_pos: int):
        self.file, self.first_pos = file, first_pos
        self._base: int | None = None

    def at(self, k: int) -> int:
        """Line number of the k-th line (0-based) read from ``first_pos``."""
        if self._base is None:
            n, left = 0, self.first_pos
            with _open_input(self.file) as fh:
                while left > 0:
                    block = fh.read(min(left, _CHUNK))
                    if not block:
                        break
                    n += block.count(b"\n")
                    left -= len(block)
            self._base = n + 1
        return self._base + k


def _open_stream(f: InputFile) -> tuple[IO[bytes], int]:
    """Buffered bytes of a JSONL file, decompressed for .gz/.zst, and the descriptor of the file itself.

    Compressed streams go through pyarrow, which raises OSError on a stream
    that ends early or does not decode (Python's gzip raises EOFError or
    zlib.error, and zstandard's stream reader ends silently at a truncation).
    """
    if f.kind == "jsonl":
        fh: IO[bytes] = _open_input(f, _CHUNK)
        fd = fh.fileno()
    else:
        import pyarrow as pa

        # pyarrow reads the file opened here: its own open (pa.OSFile) would block on a FIFO.
        plain = _open_input(f, 0)
        fd = plain.fileno()
        fh = io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(plain, mode="r"), _CODECS[f.kind]), _CHUNK)
    try:
        _check_unchanged(f, fd)
    except DataError:
        fh.close()
        raise
    return fh, fd


def _readline(f: InputFile, fh: IO[bytes], size: int) -> bytes:
    try:
        return fh.readline(size)
    except OSError as e:
        if f.kind == "jsonl":
            raise
        msg = first_line(e)
        raise DataError(
            f"input {f.path}: truncated or corrupt {_CODECS[f.kind]} data ({msg}); the file cannot be read to its end"
        ) from None


def _skip_line(f: InputFile, fh: IO[bytes]) -> int:
    """Bytes consumed skipping the rest of the current line, one chunk at a time."""
    n = 0
    while True:
        block = _readline(f, fh, _CHUNK)
        n += len(block)
        if not block or block.endswith(b"\n"):
            return n


def _lines(f: InputFile, fh: IO[bytes], pos: int, stop: int | None, limit: int) -> Iterator[bytes | None]:
    """Lines (newline kept) that start in [pos, stop), or to the end of the stream when ``stop`` is None.

    A line of more than ``limit`` bytes (its newline, "\n" or "\r\n", not counted) comes out as None,
    skipped chunk by chunk, never held whole.
    """
    while stop is None or pos < stop:
        line = _readline(f, fh, limit + 2)  # room for the newline, "\r\n" included
        if not line:
            if stop is not None:  # the file is shorter than planned
                raise _changed(f, pos)
            return
        n = len(line)
        if n - (2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0) > limit:
            if not line.endswith(b"\n"):
                n += _skip_line(f, fh)
            pos += n
            yield None
            continue
        pos += n
        yield line


def _int_or_digits(digits: str) -> int | str:
    try:
        return int(digits)
    except ValueError:  # over sys.get_int_max_str_digits() (4300): kept as its digits
        return digits


def _loads(data: str) -> object:
    """json.loads, but an integer too long for Python's int() is kept as its digit string, not an error."""
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion": valid JSON all the same
        return json.loads(data, parse_int=_int_or_digits)


def _parse(line: bytes) -> tuple[object, str | None, bool]:
    """(record, what is wrong with the line or None, whether invalid UTF-8 was replaced)."""
    # Decoded here, strictly: json.loads of bytes decodes with "surrogatepass", so UTF-8-encoded
    # surrogates (ED A0 80 ED B0 80) became a valid astral character instead of U+FFFD per byte, as
    # text and Parquet inputs give. utf-8-sig: a byte order mark at a line's start is dropped, as
    # json.loads of bytes did.
    try:
        text, replaced = line.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        text, replaced = line.decode("utf-8-sig", errors="replace"), True
    try:
        return _loads(text), None, replaced
    except RecursionError:
        return None, "JSON nested deeper than the parser's recursion limit", replaced
    except ValueError:
        return None, "not valid JSON", replaced


def _read_jsonl(
    f: InputFile,
    start: int | None,
    stop: int | None,
    text_field: str,
    id_field: str | None,
    strict: bool,
    stats: ReadStats,
    max_doc_bytes: int,
) -> Iterator[Doc]:
    fh, fd = _open_stream(f)
    with fh:
        pos = 0
        if f.kind == "jsonl":
            if start:
                # The line that straddles ``start`` belongs to the previous range.
                fh.seek(start - 1)
                if fh.read(1) != b"\n":
                    _skip_line(f, fh)
            pos = fh.tell()
            stop = f.size if stop is None else stop
        else:
            stop = None
        numbers = _LineNumbers(f, pos) if f.kind == "jsonl" else None
        source = _column_name(f.path)

        def where(k: int) -> str:
            return f"{source}:{numbers.at(k) if numbers else k + 1}"

        def bad(k: int, reason: str, detail: str) -> None:
            _bad_record(reason, where(k), detail, strict, stats)

        for k, line in enumerate(_lines(f, fh, pos, stop, max_doc_bytes)):
            if line is None:
                stats.note("too_large", where(k))
                continue
            if k == 0 and pos == 0:
                bom = byte_order_mark(line[:4])
                if bom is not None and bom[2] != "utf8":
                    raise DataError(
                        f"input {f.path}: {bom[2].upper().replace('UTF', 'UTF-')} text (byte order "
                        f"mark); JSONL must be UTF-8 (convert it, e.g. with iconv -t UTF-8)"
                    )
                if bom is not None:
                    line = line[bom[0] :]
            if not line or line.isspace():
                continue
            rec, wrong, replaced = _parse(line)
            if wrong is not None:
                bad(k, "invalid_json", wrong)
                continue
            if not isinstance(rec, dict):
                bad(k, "invalid_json", "not a JSON object")
                continue
            if text_field not in rec:
                bad(k, "missing_text_field", f"no field {text_field!r} (--text-field)")
                continue
            text = rec[text_field]
            if not isinstance(text, str):
                bad(k, "non_string_text", f"field {text_field!r} is {_json_type(text)}, not a string")
                continue
            if replaced:
                stats.note("invalid_utf8", where(k))
            if not text.isascii():
                text = _fix_surrogates(text, where(k), stats)
            if is_blank(text):
                stats.note("empty", where(k))
                continue
            doc_id = _doc_id(rec.get(id_field) if id_field else None, id_field, where(k), stats)
            yield Doc(text, doc_id, source, len(line))
        _check_unchanged(f, fd)  # rewritten in place while read: same size, a new mtime


# JSON's names for the types json.loads gives: the user wrote JSON, not Python ("null", not "NoneType").
_JSON_TYPES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "an array",
    dict: "an object",
}


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _fix_surrogates(text: str, where: str, stats: ReadStats | None) -> str:
    """JSON "\\ud800" escapes give lone surrogates, which are not UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        if stats is not None:
            stats.note("invalid_utf8", where)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _doc_id(value: object, id_field: str | None, where: str, stats: ReadStats) -> str:
    if value is None or value == "":
        if id_field:
            stats.note("missing_id", where)
        return where
    if isinstance(value, bytes):  # a Parquet string or binary column: repaired, like surrogates, uncounted
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return _fix_surrogates(value, where, None)
    try:
        return _fix_surrogates(json.dumps(value), where, None)
    except (ValueError, TypeError, RecursionError):  # nested too deeply to print
        stats.note("invalid_id", where)
        return where


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _as_bytes(column):
    """A string column viewed as binary (the same buffers), so that a cell that is not UTF-8 reaches ``_decode``
    (to_pylist() raised for the whole batch); any other column as it is."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        return pa.DictionaryArray.from_arrays(column.indices, _as_bytes(column.dictionary))
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}
    return column.view(binary[column.type]) if column.type in binary else column


def _parquet_batches(
    f: InputFile, groups: list[int], cols: list[str], id_field: str | None
) -> Iterator[tuple[list, list]]:
    """(texts, ids) of one record batch at a time; bad Parquet data is a DataError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Opened here, not by pyarrow (whose own open would block on a FIFO); closed with the generator.
    fh = _open_input(f)
    try:
        _check_unchanged(f, fh.fileno())
        pf = pq.ParquetFile(fh)
        if pf.metadata.num_rows != sum(f.group_rows):
            raise DataError(
                f"input {f.path}: {pf.metadata.num_rows:,} rows now, {sum(f.group_rows):,} when the "
                f"inputs were planned (changed while being read)"
            )
        for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=cols):
            texts = _as_bytes(batch.column(cols[0])).to_pylist()
            yield texts, _as_bytes(batch.column(id_field)).to_pylist() if id_field else [None] * len(texts)
        _check_unchanged(f, fh.fileno())  # rewritten in place while read: same size, a new mtime
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        msg = first_line(e)
        raise DataError(
            f"input {f.path}: corrupt Parquet data in row groups {groups[0]}-{groups[-1]} ({msg})"
        ) from None
    finally:
        fh.close()


def _read_parquet(
    f: InputFile,
    start: int | None,
    stop: int | None,
    text_field: str,
    id_field: str | None,
    strict: bool,
    stats: ReadStats,
    max_doc_bytes: int,
) -> Iterator[Doc]:
    lo = start or 0
    hi = len(f.group_rows) if stop is None else stop
    if hi <= lo:
        return
    row = sum(f.group_rows[:lo])
    cols = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    source = _column_name(f.path)
    # One record batch in memory at a time, never the whole file.
    for texts, ids in _parquet_batches(f, list(range(lo, hi)), cols, id_field):
        for text, ident in zip(texts, ids):
            where = f"{source}:row {row}"
            row += 1
            if text is None:  # as a JSONL "text": null (the column is there: planning checks it)
                _bad_record("non_string_text", where, f"column {text_field!r} is null, not a string", strict, stats)
                continue
            if isinstance(text, bytes):
                if len(text) > max_doc_bytes:
                    stats.note("too_large", where)
                    continue
                text = _decode(text, where, stats)
            elif not isinstance(text, str):
                detail = f"column {text_field!r} is {_json_type(text)}, not a string"
                _bad_record("non_string_text", where, detail, strict, stats)
                continue
            elif _utf8_len(text) > max_doc_bytes:
                stats.note("too_large", where)
                continue
            if is_blank(text):
                stats.note("empty", where)
                continue
            yield Doc(text, _doc_id(ident, id_field, where, stats), source, len(text))


def check_max_doc_bytes(max_doc_bytes: int) -> int:
    if int(max_doc_bytes) < 1:
        raise DataError(f"--max-doc-bytes must be at least 1, got {max_doc_bytes}")
    if int(max_doc_bytes) > MAX_DOC_BYTES:
        raise DataError(f"--max-doc-bytes must be at most {MAX_DOC_BYTES:,} (2**62), got {max_doc_bytes}")
    return int(max_doc_bytes)


def iter_piece(
    piece: Piece,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: ReadStats | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> Iterator[Doc]:
    """Documents of one piece of a file, in file order (none bigger than ``max_doc_bytes``)."""
    stats = stats if stats is not None else ReadStats()
    max_doc_bytes = check_max_doc_bytes(max_doc_bytes)
    f = piece.file
    try:
        if f.kind == "text":
            yield from _read_text(f, strict, stats, max_doc_bytes)
        elif f.kind == "parquet":
            yield from _read_parquet(f, piece.start, piece.stop, text_field, id_field, strict, stats, max_doc_bytes)
        else:
            yield from _read_jsonl(f, piece.start, piece.stop, text_field, id_field, strict, stats, max_doc_bytes)
    except FileNotFoundError:
        raise InputError(f"input {f.path}: disappeared while reading") from None
    except (OSError, EOFError) as e:
        msg = getattr(e, "strerror", None) or first_line(e)
        raise InputError(f"input {f.path}: cannot be read ({msg})") from None
    except DataError as e:  # the readers' own: corrupt data, --strict, a file that changed
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None


def iter_unit(
    unit: WorkUnit,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: ReadStats | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> Iterator[Doc]:
    for piece in unit.pieces:
        yield from iter_piece(piece, text_field, id_field, strict, stats, max_doc_bytes)


def iter_documents(
    corpus: Corpus | Sequence[InputFile],
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    stats: ReadStats | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> Iterator[Doc]:
    """Every document of the corpus, in input order (one process)."""
    files = corpus.files if isinstance(corpus, Corpus) else corpus
    for f in files:
        yield from iter_piece(Piece(f, None, None, est_size(f)), text_field, id_field, strict, stats, max_doc_bytes)
