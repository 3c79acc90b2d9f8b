"""Planning a corpus: files, directories and globs -> input files, split into work units.

Which reader each file gets, by name:

- text and source files (``TEXT_EXTENSIONS``, plus the names in
  ``TEXT_FILENAMES``): ``text``, one document per file;
- ``.jsonl``/``.ndjson`` and their ``.gz``/``.zst`` forms (``JSONL_SUFFIXES``):
  ``jsonl``, ``jsonl.gz``, ``jsonl.zst``, one document per line;
- ``.parquet``/``.pq``: ``parquet``, one document per row.

Directories are walked recursively, depth first, each directory's files
(sorted) before its subdirectories (sorted), following symbolic links to
directories but entering each directory once (a link back to a directory
above is counted as ``symlink_loop``, a second way into a directory as
``duplicate_dir``); hidden entries (".git", ".venv", ...) and
``__pycache__`` are skipped, and so are files whose extension is none of the
above (counted as ``unsupported_file``: images, archives, ``.pyc``...). Files
a walk cannot read (broken symbolic links, no read permission, FIFOs and
other non-regular files, unreadable subdirectories) are skipped and counted
as ``unreadable_file``; named explicitly, they are an error. A file met again
(named twice, matched by two inputs, or a symbolic or hard link to a file
taken already: the same device and inode) is read once, the repeat counted as
``duplicate_file``. A file named
explicitly is read as text when its extension is unknown unless it looks
binary (a NUL byte in its first 8 KiB and no byte order mark), which is an
error. Globs match in sorted order, a matched directory walked as above; a
``**`` glob walks like a directory too (``_glob``), each directory once.
Planning stats every file and reads each Parquet footer (schema, row
groups), but no document: readers.py reads them.

``ReadStats`` is the record of what was passed over, by reason: planning
counts the files here, the readers add the documents.

Work units: big files are split so that one huge file still spreads over
workers: plain JSONL by byte ranges (a line belongs to the range holding its
first byte), Parquet by row-group ranges. Compressed JSONL cannot be split
(not seekable) and a text file is one document. Consecutive small pieces are
packed into one unit. The plan depends only on the inputs (never on the
number of workers), so the output is the same whatever ``--workers`` is.

Over 500 lines: discovery (walks, globs, special files) and the skips it counts are one pass over the
inputs, kept with the work units it produces so that the plan is made in one place.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from mnemo.data_pipeline.errors import DataError

TEXT_EXTENSIONS = frozenset(
    """
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
""".split()
)
TEXT_FILENAMES = frozenset(
    {
        "Makefile",
        "Dockerfile",
        "README",
        "LICENSE",
        "COPYING",
        "NOTICE",
        "CHANGELOG",
        "Jenkinsfile",
        "Rakefile",
        "Gemfile",
        "Vagrantfile",
    }
)
JSONL_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".ndjson.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.zstd": "jsonl.zst",
    ".ndjson.zst": "jsonl.zst",
}
PARQUET_SUFFIXES = (".parquet", ".pq")
# Places kept in ReadStats.examples (manifest.json's skipped_examples): the first EXAMPLES_PER_REASON of each
# reason, MAX_EXAMPLES in all, except that the first place of every reason counted is always kept.
EXAMPLES_PER_REASON = 5
MAX_EXAMPLES = 20
PYCACHE = "__pycache__"  # bytecode folders: skipped by directory walks and glob matches alike
# Byte order marks, longest first (the UTF-32 LE mark starts with the UTF-16 LE one): mark, codec, label.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf32"),
    (codecs.BOM_UTF8, "utf-8", "utf8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf16"),
)
# Guess of the decompressed size of compressed JSONL, for packing units only.
_COMPRESSION_GUESS = 4


def _reason_of(example: str) -> str:
    """The reason of an example "where: reason" (``where`` may hold ": " too, a reason never does)."""
    return example.rpartition(": ")[2]


@dataclass
class ReadStats:
    """What was skipped or repaired, by reason, with the first few places of each reason (in input order).

    The first 20 places of all reasons together were kept: 16 repairs of one reason (``missing_id``) hid the
    ``binary_file`` and ``empty`` skips that the counts name. Now up to EXAMPLES_PER_REASON per reason,
    MAX_EXAMPLES in all, and the first place of every reason counted always.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    # reason -> examples of it kept (derived from ``examples``: not in to_json)
    kept: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for example in self.examples:
            reason = _reason_of(example)
            self.kept[reason] = self.kept.get(reason, 0) + 1

    def note(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._keep(reason, f"{where}: {reason}")

    def merge(self, other: ReadStats | dict) -> None:
        """Add ``other``'s counts and, after this one's, its examples: the same examples as one reader that
        noted this one's places and then ``other``'s would have kept."""
        other = other if isinstance(other, ReadStats) else ReadStats(**other)
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for example in other.examples:
            self._keep(_reason_of(example), example)

    def _keep(self, reason: str, example: str) -> None:
        kept = self.kept.get(reason, 0)
        if kept < EXAMPLES_PER_REASON and (kept == 0 or len(self.examples) < MAX_EXAMPLES):
            self.examples.append(example)
            self.kept[reason] = kept + 1

    def to_json(self) -> dict:
        return {"counts": dict(self.counts), "examples": list(self.examples)}


def format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def all_skipped(names: Sequence[str], stats: ReadStats) -> str:
    """The error of prepare and tokenizer train when no document is left: the inputs (the first 3, and
    how many more: a shell glob can give thousands) and what was skipped, by reason."""
    shown = ", ".join(map(str, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if not stats.counts:  # nothing skipped: there was nothing to skip (a zero-row Parquet, an empty JSONL)
        return f"no documents: {shown} {'holds' if len(names) == 1 else 'hold'} none (no lines, rows or text)"
    return f"no documents: every document of {shown} was skipped ({format_counts(stats.counts)})"


@dataclass(frozen=True)
class InputFile:
    path: str  # as the user named it (joined under a directory); prepare converts under its absolute path
    kind: str  # text | jsonl | jsonl.gz | jsonl.zst | parquet
    size: int
    mtime_ns: int
    # Parquet only: bytes and rows of each row group.
    group_bytes: tuple[int, ...] = ()
    group_rows: tuple[int, ...] = ()
    # The file's identity (st_dev, st_ino) when planned, which the readers compare with the file they open:
    # another file moved into its place keeps the size and may keep the mtime. 0: not recorded. Not in
    # the fingerprint, so that the outputs and resume states made before it was recorded stay current.
    dev: int = 0
    ino: int = 0

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
    # Files the walk passed over: unsupported_file, unreadable_file, symlink_loop, duplicate_dir, duplicate_file
    # (counts, places).
    file_stats: ReadStats = field(default_factory=ReadStats)

    @property
    def skipped_files(self) -> int:
        return sum(self.file_stats.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(est_size(f) for f in self.files)


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
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError as e:
        raise DataError(f"input {path}: cannot be read ({e.strerror or e})") from None
    if byte_order_mark(head) is None and b"\0" in head:
        raise DataError(
            f"input {path}: looks binary and its extension is not a supported format "
            f"(text/source files, .jsonl[.gz|.zst], .parquet)"
        )
    return "text"


def byte_order_mark(head: bytes) -> tuple[int, str, str] | None:
    """(length, codec, label) of the byte order mark ``head`` starts with, or None."""
    for mark, codec, label in _BOMS:
        if head.startswith(mark):
            return len(mark), codec, label
    return None


def _walk(root: str, stats: ReadStats) -> Iterator[str]:
    """Files under ``root``, in ``_walk_entries`` order."""
    return (path for path, is_dir in _walk_entries(root, stats) if not is_dir)


def _walk_entries(root: str, stats: ReadStats) -> Iterator[tuple[str, bool]]:
    """(path, is_dir) under ``root``, depth first: each directory (on entering it), then its
    files (sorted by name), then its subdirectories (sorted).

    ``root`` "" is the current directory, its entries named without "./" (as glob names them).

    This order (not plain sorted path order: ``z.txt`` comes before ``sub/a.txt``)
    is the documents' order, and so enters the dataset fingerprint: keep it.
    Hidden entries and ``__pycache__`` are left out; a directory that cannot be
    listed is counted as ``unreadable_file``. Symbolic links to directories are
    followed, each directory walked at most once: a link to a directory above
    it (which would never end) is counted as ``symlink_loop``, a second way
    into a directory already walked as ``duplicate_dir``.
    """
    walked: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of each directory entered -> its path
    # Depth-first stack of (path, key of the directory it is in, or None): the chain of keys is its ancestors.
    stack: list[tuple[str, tuple | None]] = [(root, None)]
    while stack:
        path, parent = stack.pop()
        try:
            st = os.stat(path or os.curdir)
            key = (st.st_dev, st.st_ino)
            with os.scandir(path or os.curdir) as it:
                entries = list(it)
        except OSError as e:
            stats.note("unreadable_file", f"{e.filename or path} ({e.strerror or e})")
            continue
        seen_as = walked.get(key)
        if seen_as is not None:
            link = f"link to {os.path.realpath(path)}" if os.path.islink(path) else f"the same directory as {seen_as}"
            chain = parent
            while chain is not None and chain[0] != key:
                chain = chain[1]
            if chain is not None:
                stats.note("symlink_loop", f"{path} ({link}, a directory above it)")
            else:
                stats.note("duplicate_dir", f"{path} ({link}, walked already as {seen_as})")
            continue
        walked[key] = path
        yield path, True
        files, dirs = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symbolic links, like os.walk
            except OSError:
                is_dir = False
            (dirs if is_dir else files).append(entry.name)
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(path, name), False
        here = (key, parent)
        subdirs = sorted(d for d in dirs if not d.startswith(".") and d != PYCACHE)
        stack.extend((os.path.join(path, d), here) for d in reversed(subdirs))


def _match_parts(pattern: Sequence[str], parts: Sequence[str]) -> bool:
    """Whether path components ``parts`` match glob components ``pattern`` ("**" = any number of them)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def _glob(pattern: str, stats: ReadStats) -> list[tuple[str, list[str]]]:
    """Matches of ``pattern``, sorted: [(match, its files)], a matched directory with the files of its walk.

    Without "**" this is glob.glob. With it, glob.glob would follow every
    symbolic link to a directory, a link to a directory above it included: a
    walk that never ends (two such links: exponential). So the part before the
    first "**" is globbed (a fixed depth), each directory it names walked once
    by ``_walk_entries`` (loops and second ways in counted as in a directory
    walk, hidden entries and ``__pycache__`` skipped) and each entry matched
    against the rest, a component at a time.
    """
    if "**" not in pattern.split(os.sep):
        matches = sorted(m for m in glob.glob(pattern) if not _is_pycache_dir(m))
        return [(m, list(_walk(m, stats)) if os.path.isdir(m) else [m]) for m in matches]
    dirs_only = pattern.endswith(os.sep)
    comps = [c for c in pattern.split(os.sep) if c]
    first = comps.index("**")
    head = os.sep.join(comps[:first])
    if pattern.startswith(os.sep):
        head = os.sep + head
    tail = comps[first:]
    bases = [b for b in glob.glob(head) if os.path.isdir(b) and not _is_pycache_dir(b)] if head else [""]
    groups: dict[str, list[str]] = {}
    for base in sorted(bases):
        inside: str | None = None  # the matched directory the walk is in: its files are all read, in walk order
        for path, is_dir in _walk_entries(base, stats):
            if inside is not None and path.startswith(os.path.join(inside, "")):
                if not is_dir:
                    groups[inside].append(path)
                continue
            inside = None
            parts = path[len(os.path.join(base, "")) :].split(os.sep) if path != base else []
            if (is_dir or not dirs_only) and _match_parts(tail, parts):
                groups[path] = [] if is_dir else [path]
                inside = path if is_dir else None
    return sorted(groups.items())


def _is_pycache_dir(path: str) -> bool:
    """A ``__pycache__`` directory, which a glob matches where a directory walk skips it (bytecode, not text)."""
    return os.path.basename(os.path.normpath(path)) == PYCACHE and os.path.isdir(path)


def _unreadable_reason(path: str) -> str | None:
    """Why ``path`` cannot be read as an input file, or None when it can."""
    try:
        st = os.stat(path)
    except OSError as e:
        if os.path.islink(path) and isinstance(e, FileNotFoundError):
            return "broken symbolic link"
        return e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "permission denied"
    return None


def expand_inputs(inputs: Sequence[str]) -> tuple[list[tuple[str, str, os.stat_result]], ReadStats]:
    """Paths, directories and globs -> ([(path, kind, stat)] in input order, files passed over).

    Every input is checked before anything is read: a missing, broken or
    unreadable path named explicitly is a DataError; inside a directory or
    glob it is skipped and counted (``unreadable_file``), like files of
    unsupported types (``unsupported_file``).
    """
    if not inputs:
        raise DataError("no --input given")
    found: list[tuple[str, str, os.stat_result]] = []
    stats = ReadStats()
    seen: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) of each file taken -> the path it was taken as

    def add(path: str, explicit: bool) -> None:
        why = _unreadable_reason(path)
        if why is not None:
            if explicit:
                raise DataError(f"input {path}: {why}")
            stats.note("unreadable_file", f"{path} ({why})")
            return
        st = os.stat(path)
        # The same file (named twice, or through a symbolic or hard link) is read once: its documents are
        # the same, and a repeated input is not a way to weight it (data.sources weights are). Counted.
        real = (st.st_dev, st.st_ino)
        if real in seen:
            stats.note("duplicate_file", f"{path} (same file as {seen[real]})")
            return
        kind = file_kind(path, explicit)
        if kind is None:
            stats.note("unsupported_file", path)
            return
        seen[real] = path
        found.append((path, kind, st))

    for inp in inputs:
        inp = os.path.expanduser(str(inp))
        if not inp:
            raise DataError("--input: an empty path ('') among the inputs")
        if os.path.isdir(inp):
            for p in _walk(inp, stats):
                add(p, explicit=False)
            continue
        # os.path.lexists says False on any error: a file in a folder without search permission was
        # "no such file or directory". The real error is told, unless the path is simply not there.
        try:
            os.lstat(inp)
            missing = None
        except OSError as e:
            missing = e
        if missing is None:
            add(inp, explicit=True)
        elif not isinstance(missing, FileNotFoundError):
            raise DataError(f"input {inp}: {missing.strerror or missing}")
        elif any(c in inp for c in "*?["):
            matches = _glob(inp, stats)
            if not matches:
                raise DataError(f"input {inp}: no file matches this pattern")
            for _, paths in matches:
                for p in paths:
                    add(p, explicit=False)
        else:
            raise DataError(f"input {inp}: no such file or directory")
    if not found:
        counts = ", ".join(f"{n} {k.replace('_', ' ')}s" for k, n in sorted(stats.counts.items())) or "no files"
        raise DataError(f"no supported input files in {', '.join(map(str, inputs))} ({counts} skipped)")
    return found, stats


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
        if col is not None and names.count(col) > 1:  # pyarrow cannot select it by name
            raise DataError(
                f"input {path}: column {col!r} ({flag}) appears {names.count(col)} times in its schema; "
                f"rename the copies so that one column has that name"
            )
    md = pf.metadata
    groups = [md.row_group(i) for i in range(md.num_row_groups)]
    return tuple(g.total_byte_size for g in groups), tuple(g.num_rows for g in groups)


def plan_inputs(inputs: Sequence[str], text_field: str = "text", id_field: str | None = None) -> Corpus:
    """Expand and stat every input; check Parquet schemas. Reads no documents."""
    found, file_stats = expand_inputs(inputs)
    files = []
    for path, kind, st in found:
        gb: tuple[int, ...] = ()
        gr: tuple[int, ...] = ()
        if kind == "parquet":
            gb, gr = _parquet_meta(path, text_field, id_field)
        files.append(InputFile(path, kind, st.st_size, st.st_mtime_ns, gb, gr, st.st_dev, st.st_ino))
    return Corpus(files, file_stats)


# ----------------------------------------------------------------------------- work units


def auto_unit_bytes(total_bytes: int) -> int:
    """About 64 units per corpus, each between 1 MiB and 256 MiB of input."""
    return int(min(256 << 20, max(1 << 20, total_bytes // 64)))


def est_size(f: InputFile) -> int:
    """Input bytes of ``f`` for packing units (compressed JSONL: a guess of its decompressed size)."""
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
        yield Piece(f, None, None, est_size(f))


def split_units(files: Sequence[InputFile], unit_bytes: int | None = None) -> list[WorkUnit]:
    """Consecutive pieces packed into units of about ``unit_bytes`` (auto when None), in input order."""
    if unit_bytes is None:
        unit_bytes = auto_unit_bytes(sum(est_size(f) for f in files))
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
