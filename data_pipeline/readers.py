"""Reading corpora: files, directories and globs -> documents, split into work units.

Inputs and what one document is:

- text and source files (``TEXT_EXTENSIONS``, plus the names in
  ``TEXT_FILENAMES``): one document per file, read as UTF-8;
- ``.jsonl``/``.ndjson`` and their ``.gz``/``.zst`` forms: one document per
  line, the string in ``text_field``;
- ``.parquet``: one document per row, the string (or binary) column
  ``text_field``, read one record batch at a time.

Directories are walked recursively in sorted order; hidden entries (".git",
".venv", ...) and ``__pycache__`` are skipped, and so are files whose extension is none of the
above (counted as ``unsupported_file``: images, archives, ``.pyc``...). A file
named explicitly is read as text when its extension is unknown unless it
looks binary (a NUL byte in its first 8 KiB), which is an error. Globs expand
like directories.

Bad input is counted in ``ReadStats`` (reason -> count, plus the first few
"file:line: reason" examples) rather than fatal: invalid UTF-8 is decoded with
U+FFFD replacement (the document is kept and counted as ``invalid_utf8``);
empty and whitespace-only documents are skipped (``empty``); a JSONL line that
is not a JSON object (``invalid_json``), lacks the text field
(``missing_text_field``) or holds a non-string there (``non_string_text``) is
skipped, and with ``strict=True`` raises ``DataError`` naming file:line.

Work units: big files are split so that one huge file still spreads over
workers: plain JSONL by byte ranges (a line belongs to the range holding its
first byte), Parquet by row-group ranges. Compressed JSONL cannot be split
(not seekable) and a text file is one document. Consecutive small pieces are
packed into one unit. The plan depends only on the inputs (never on the
number of workers), so the output is the same whatever ``--workers`` is.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO, NamedTuple

from mnemo.data_pipeline.errors import DataError

TEXT_EXTENSIONS = frozenset("""
.txt .text .md .markdown .rst .adoc .asciidoc .org .tex .bib .rtf
.py .pyi .pyx .pxd
.c .h .cc .cpp .cxx .hpp .hh .hxx .inl .cu .cuh .m .mm
.java .kt .kts .scala .groovy .gradle .clj .cljs .edn
.go .rs .swift .dart .zig .nim .d .v .sv .vhd .vhdl
.js .mjs .cjs .ts .tsx .jsx .vue .svelte
.rb .php .pl .pm .lua .r .jl .ex .exs .erl .hrl .hs .lhs .ml .mli .fs .fsx .cs .vb
.lisp .lsp .scm .ss .rkt .el .vim
.sh .bash .zsh .fish .ps1 .bat .cmd .awk .sed
.sql .graphql .proto .thrift
.html .htm .xml .xsl .svg .css .scss .sass .less
.yaml .yml .toml .ini .cfg .conf .properties
.cmake .mk .make .dockerfile .nix .tf .hcl
.f .f90 .f95 .for .pas .ada .adb .ads .cob .asm .s
""".split())
TEXT_FILENAMES = frozenset({"Makefile", "Dockerfile", "README", "LICENSE", "COPYING", "NOTICE", "CHANGELOG",
                            "Jenkinsfile", "Rakefile", "Gemfile", "Vagrantfile"})
JSONL_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonl.gz": "jsonl.gz", ".ndjson.gz": "jsonl.gz",
                  ".jsonl.zst": "jsonl.zst", ".jsonl.zstd": "jsonl.zst", ".ndjson.zst": "jsonl.zst"}
PARQUET_SUFFIXES = (".parquet", ".pq")
MAX_EXAMPLES = 20
# Guess of the decompressed size of compressed JSONL, for packing units only.
_COMPRESSION_GUESS = 4


class Doc(NamedTuple):
    text: str
    doc_id: str
    source: str
    nbytes: int  # input bytes this document came from (progress only)


@dataclass
class ReadStats:
    """What was skipped or repaired, by reason, with the first few places."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def note(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def merge(self, other: ReadStats | dict) -> None:
        other = other if isinstance(other, ReadStats) else ReadStats(**other)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        room = MAX_EXAMPLES - len(self.examples)
        self.examples.extend(other.examples[:max(0, room)])

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputFile:
    path: str  # as the user named it (joined under a directory)
    kind: str  # text | jsonl | jsonl.gz | jsonl.zst | parquet
    size: int
    mtime_ns: int
    # Parquet only: bytes and rows of each row group.
    group_bytes: tuple[int, ...] = ()
    group_rows: tuple[int, ...] = ()

    def fingerprint(self) -> dict:
        return {"path": os.path.abspath(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Piece:
    """Part of one file: a byte range (plain JSONL), a row-group range (Parquet) or all of it."""

    file: InputFile
    start: int | None = None
    stop: int | None = None
    est_bytes: int = 0


@dataclass(frozen=True)
class WorkUnit:
    index: int
    pieces: tuple[Piece, ...]
    est_bytes: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def describe(self) -> list[list]:
        return [[p.file.path, p.start, p.stop] for p in self.pieces]


@dataclass
class Corpus:
    files: list[InputFile]
    skipped_files: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(_est_size(f) for f in self.files)


# ----------------------------------------------------------------------------- expanding inputs


def file_kind(path: str, explicit: bool) -> str | None:
    """The reader for ``path``, or None when a directory walk should skip it."""
    name = os.path.basename(path)
    low = name.lower()
    for suf, kind in JSONL_SUFFIXES.items():
        if low.endswith(suf):
            return kind
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    ext = os.path.splitext(low)[1]
    if ext in TEXT_EXTENSIONS or name in TEXT_FILENAMES:
        return "text"
    if not explicit:
        return None
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        raise DataError(f"input {path}: looks binary and its extension is not a supported format "
                        f"(text/source files, .jsonl[.gz|.zst], .parquet)")
    return "text"


def _walk(root: str) -> Iterator[str]:
    """Files under ``root`` in sorted path order, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Paths, directories and globs -> ([(path, kind)] in input order, [skipped files]).

    Every input is checked before anything is read: a missing path is a DataError.
    """
    if not inputs:
        raise DataError("no --input given")
    found: list[tuple[str, str]] = []
    skipped: list[str] = []
    seen: set[tuple[int, int]] = set()

    def add(path: str, explicit: bool) -> None:
        st = os.stat(path)
        real = (st.st_dev, st.st_ino)  # the same file named twice (or via a link) is read once
        if real in seen:
            return
        kind = file_kind(path, explicit)
        if kind is None:
            skipped.append(path)
            return
        seen.add(real)
        found.append((path, kind))

    for inp in inputs:
        inp = os.path.expanduser(str(inp))
        if os.path.isdir(inp):
            for p in _walk(inp):
                add(p, explicit=False)
        elif os.path.isfile(inp):
            add(inp, explicit=True)
        elif any(c in inp for c in "*?["):
            matches = sorted(glob.glob(inp, recursive=True))
            if not matches:
                raise DataError(f"input {inp}: no file matches this pattern")
            for m in matches:
                if os.path.isdir(m):
                    for p in _walk(m):
                        add(p, explicit=False)
                elif os.path.isfile(m):
                    add(m, explicit=False)
        else:
            raise DataError(f"input {inp}: no such file or directory")
    if not found:
        raise DataError(f"no supported input files in {', '.join(map(str, inputs))} "
                        f"({len(skipped)} files of unsupported types skipped)")
    return found, skipped


def _parquet_meta(path: str, text_field: str, id_field: str | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad footer
        raise DataError(f"input {path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    for col, flag in ((text_field, "--text-field"), (id_field, "--id-field")):
        if col is not None and col not in names:
            raise DataError(f"input {path}: no column {col!r} ({flag}); its columns are: {', '.join(names)}")
    md = pf.metadata
    groups = [md.row_group(i) for i in range(md.num_row_groups)]
    return tuple(g.total_byte_size for g in groups), tuple(g.num_rows for g in groups)


def plan_inputs(inputs: Sequence[str], text_field: str = "text", id_field: str | None = None) -> Corpus:
    """Expand and stat every input; check Parquet schemas. Reads no documents."""
    found, skipped = expand_inputs(inputs)
    files = []
    for path, kind in found:
        st = os.stat(path)
        gb: tuple[int, ...] = ()
        gr: tuple[int, ...] = ()
        if kind == "parquet":
            gb, gr = _parquet_meta(path, text_field, id_field)
        files.append(InputFile(path, kind, st.st_size, st.st_mtime_ns, gb, gr))
    return Corpus(files, len(skipped), skipped[:MAX_EXAMPLES])


# ----------------------------------------------------------------------------- work units


def auto_unit_bytes(total_bytes: int) -> int:
    """About 64 units per corpus, each between 1 MiB and 256 MiB of input."""
    return int(min(256 << 20, max(1 << 20, total_bytes // 64)))


def _est_size(f: InputFile) -> int:
    return f.size * _COMPRESSION_GUESS if f.kind in ("jsonl.gz", "jsonl.zst") else f.size


def _pieces(f: InputFile, unit_bytes: int) -> Iterator[Piece]:
    if f.kind == "jsonl" and f.size > unit_bytes:
        for start in range(0, f.size, unit_bytes):
            stop = min(f.size, start + unit_bytes)
            yield Piece(f, start, stop, stop - start)
    elif f.kind == "parquet" and len(f.group_bytes) > 1:
        lo, acc = 0, 0
        for g, nb in enumerate(f.group_bytes):
            if acc and acc + nb > unit_bytes:
                yield Piece(f, lo, g, acc)
                lo, acc = g, 0
            acc += nb
        yield Piece(f, lo, len(f.group_bytes), acc)
    else:
        yield Piece(f, None, None, _est_size(f))


def split_units(files: Sequence[InputFile], unit_bytes: int | None = None) -> list[WorkUnit]:
    """Consecutive pieces packed into units of about ``unit_bytes`` (auto when None), in input order."""
    if unit_bytes is None:
        unit_bytes = auto_unit_bytes(sum(_est_size(f) for f in files))
    units: list[WorkUnit] = []
    cur: list[Piece] = []
    acc = 0
    for f in files:
        for p in _pieces(f, unit_bytes):
            if cur and acc + p.est_bytes > unit_bytes:
                units.append(WorkUnit(len(units), tuple(cur), acc))
                cur, acc = [], 0
            cur.append(p)
            acc += p.est_bytes
    if cur:
        units.append(WorkUnit(len(units), tuple(cur), acc))
    return units


# ----------------------------------------------------------------------------- reading documents


def _decode(raw: bytes, where: str, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.note("invalid_utf8", where)
        return raw.decode("utf-8", errors="replace")


def _is_blank(text: str) -> bool:
    return not text or text.isspace()


def _read_text(f: InputFile, stats: ReadStats) -> Iterator[Doc]:
    with open(f.path, "rb") as fh:
        raw = fh.read()
    text = _decode(raw, f.path, stats)
    if _is_blank(text):
        stats.note("empty", f.path)
        return
    yield Doc(text, f.path, f.path, len(raw))


class _LineNumbers:
    """1-based line number of a byte offset, counted only when an error needs it."""

    def __init__(self, path: str, first_pos: int):
        self.path, self.first_pos = path, first_pos
        self._base: int | None = None

    def at(self, k: int) -> int:
        """Line number of the k-th line (0-based) read from ``first_pos``."""
        if self._base is None:
            n, left = 0, self.first_pos
            with open(self.path, "rb") as fh:
                while left > 0:
                    block = fh.read(min(left, 1 << 20))
                    if not block:
                        break
                    n += block.count(b"\n")
                    left -= len(block)
            self._base = n + 1
        return self._base + k


def _open_lines(f: InputFile, start: int | None, stop: int | None) -> tuple[Iterator[bytes], _LineNumbers | None]:
    """Lines of the piece, and how to number them (None: count from 1)."""
    if f.kind == "jsonl.gz":
        return _close_after(gzip.open(f.path, "rb")), None
    if f.kind == "jsonl.zst":
        import zstandard

        raw = open(f.path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return _close_after(io.BufferedReader(reader, buffer_size=1 << 20)), None
    fh = open(f.path, "rb", buffering=1 << 20)
    start = start or 0
    if start > 0:
        # The line that straddles ``start`` belongs to the previous range.
        fh.seek(start - 1)
        if fh.read(1) != b"\n":
            fh.readline()
    pos = fh.tell()
    return _range_lines(fh, pos, f.size if stop is None else stop), _LineNumbers(f.path, pos)


def _close_after(fh: IO[bytes]) -> Iterator[bytes]:
    with fh:
        yield from fh


def _range_lines(fh: IO[bytes], pos: int, stop: int) -> Iterator[bytes]:
    with fh:
        while pos < stop:
            line = fh.readline()
            if not line:
                return
            pos += len(line)
            yield line


def _read_jsonl(f: InputFile, start: int | None, stop: int | None, text_field: str, id_field: str | None,
                strict: bool, stats: ReadStats) -> Iterator[Doc]:
    lines, numbers = _open_lines(f, start, stop)

    def where(k: int) -> str:
        return f"{f.path}:{numbers.at(k) if numbers else k + 1}"

    def bad(k: int, reason: str, detail: str) -> None:
        if strict:
            raise DataError(f"{where(k)}: {detail} (--strict)")
        stats.note(reason, where(k))

    for k, line in enumerate(lines):
        if line.isspace():
            continue
        try:
            rec = json.loads(line)
        except UnicodeDecodeError:
            stats.note("invalid_utf8", where(k))
            try:
                rec = json.loads(line.decode("utf-8", errors="replace"))
            except ValueError:
                bad(k, "invalid_json", "not valid JSON")
                continue
        except ValueError:
            bad(k, "invalid_json", "not valid JSON")
            continue
        if not isinstance(rec, dict):
            bad(k, "invalid_json", "not a JSON object")
            continue
        if text_field not in rec:
            bad(k, "missing_text_field", f"no field {text_field!r} (--text-field)")
            continue
        text = rec[text_field]
        if not isinstance(text, str):
            bad(k, "non_string_text", f"field {text_field!r} is {type(text).__name__}, not a string")
            continue
        if not text.isascii():
            text = _fix_surrogates(text, where(k), stats)
        if _is_blank(text):
            stats.note("empty", where(k))
            continue
        doc_id = _doc_id(rec.get(id_field) if id_field else None, id_field, where(k), stats)
        yield Doc(text, doc_id, f.path, len(line))


def _fix_surrogates(text: str, where: str, stats: ReadStats) -> str:
    """JSON "\\ud800" escapes give lone surrogates, which are not UTF-8: replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        stats.note("invalid_utf8", where)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _doc_id(value: object, id_field: str | None, where: str, stats: ReadStats) -> str:
    if value is None or value == "":
        if id_field:
            stats.note("missing_id", where)
        return where
    return value if isinstance(value, str) else json.dumps(value)


def _read_parquet(f: InputFile, start: int | None, stop: int | None, text_field: str, id_field: str | None,
                  stats: ReadStats) -> Iterator[Doc]:
    import pyarrow.parquet as pq

    lo = start or 0
    hi = len(f.group_rows) if stop is None else stop
    if hi <= lo:
        return
    row = sum(f.group_rows[:lo])
    cols = [text_field] + ([id_field] if id_field and id_field != text_field else [])
    pf = pq.ParquetFile(f.path)
    # One record batch in memory at a time, never the whole file.
    for batch in pf.iter_batches(batch_size=1024, row_groups=list(range(lo, hi)), columns=cols):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
        for text, ident in zip(texts, ids):
            where = f"{f.path}:row {row}"
            row += 1
            if text is None:
                stats.note("missing_text_field", where)
                continue
            if isinstance(text, bytes):
                text = _decode(text, where, stats)
            elif not isinstance(text, str):
                stats.note("non_string_text", where)
                continue
            if _is_blank(text):
                stats.note("empty", where)
                continue
            yield Doc(text, _doc_id(ident, id_field, where, stats), f.path, len(text))


def iter_piece(piece: Piece, text_field: str = "text", id_field: str | None = None, strict: bool = False,
               stats: ReadStats | None = None) -> Iterator[Doc]:
    """Documents of one piece of a file, in file order."""
    stats = stats if stats is not None else ReadStats()
    f = piece.file
    try:
        if f.kind == "text":
            yield from _read_text(f, stats)
        elif f.kind == "parquet":
            yield from _read_parquet(f, piece.start, piece.stop, text_field, id_field, stats)
        else:
            yield from _read_jsonl(f, piece.start, piece.stop, text_field, id_field, strict, stats)
    except FileNotFoundError:
        raise DataError(f"input {f.path}: disappeared while reading") from None
    except (OSError, EOFError) as e:
        raise DataError(f"input {f.path}: cannot be read ({e})") from None


def iter_unit(unit: WorkUnit, text_field: str = "text", id_field: str | None = None, strict: bool = False,
              stats: ReadStats | None = None) -> Iterator[Doc]:
    for piece in unit.pieces:
        yield from iter_piece(piece, text_field, id_field, strict, stats)


def iter_documents(corpus: Corpus | Sequence[InputFile], text_field: str = "text", id_field: str | None = None,
                   strict: bool = False, stats: ReadStats | None = None) -> Iterator[Doc]:
    """Every document of the corpus, in input order (one process)."""
    files = corpus.files if isinstance(corpus, Corpus) else corpus
    for f in files:
        yield from iter_piece(Piece(f, None, None, _est_size(f)), text_field, id_field, strict, stats)
