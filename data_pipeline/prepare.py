"""`mnemo prepare`: corpus -> tokenized MDS shards, in parallel, resumable.

Layout of DATA_DIR::

    index.json        merged index (streaming.base.util.merge_index)
    part-00000/       one MDS sub-dataset per work unit, in input order
    part-00001/ ...
    tokenizer.model   copy of the tokenizer used
    manifest.json     counts, tokenizer hash, input fingerprints, skipped docs
    .mnemo-outputs.json  the names above, written before any of them is created
    .mnemo-prepare/   only while unfinished: plan, done markers, every temp file

mnemo deletes only what it can prove it wrote: the entries listed in
``.mnemo-outputs.json``, a list it writes (atomically) before creating any of
them. An --out holding anything else is refused; --overwrite removes the
listed entries and nothing else. Every temp file lives in the state dir, so a
crash leaves nothing unlisted behind. --out must not be or contain an input.

Each work unit (a few files, a byte range of a big JSONL or a row-group range
of a Parquet file; see inputs.py) is converted by one worker into a temp dir
and renamed to ``part-NNNNN`` when complete, then a done marker is written.
A rerun of the same command after Ctrl-C or kill keeps the marked units and
redoes the rest; the merge and the manifest happen only when every unit is
done. So each document lands exactly once, and the sample order is the input
order whatever ``--workers`` is (units are planned from the inputs alone).

A remote ``--out`` (``s3://``, ``gs://``..., or ``file://`` for a local
directory used through the same upload path) is written through a local
staging dir: each unit's MDSWriter uploads its shards with
``out=(local, remote)``, and the merged index, manifest and tokenizer are
uploaded at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.files import atomic_write
from mnemo.data_pipeline.processes import die_with_parent
from mnemo.data_pipeline.inputs import Corpus, ReadStats, WorkUnit, plan_inputs, split_units
from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES, Doc, check_max_doc_bytes, iter_unit
from mnemo.data_pipeline.tokenizer import Tokenizer, file_sha256, reservoir_sample, train_from_texts

FORMAT_VERSION = 1
STATE_DIR = ".mnemo-prepare"
# The list of entries of DATA_DIR that mnemo wrote (the only ones it ever deletes).
OUTPUTS_FILE = ".mnemo-outputs.json"
SHARD_SIZE_LIMIT = 1 << 26  # bytes of uncompressed samples per shard (64 MiB)
SHARD_HASHES = ["sha1"]
COMPRESSION = "zstd"
# Reasons in ReadStats that mean a document was dropped (the others were repaired and kept).
SKIP_REASONS = ("empty", "invalid_json", "missing_text_field", "non_string_text", "too_large", "binary_file")
# Reasons a whole input file was passed over (counted in "skipped" too).
FILE_REASONS = ("unsupported_file", "unreadable_file")
# Encode this many documents / characters per SentencePiece call.
_BATCH_DOCS = 256
_BATCH_CHARS = 4 << 20


def columns(token_dtype: str) -> dict[str, str]:
    """MDS columns of a mnemo dataset (the contract other modules read)."""
    return {
        "tokens": f"ndarray:{token_dtype}",
        "doc_id": "str",
        "source": "str",
        "answer_start": "int32",
        "answer_len": "int32",
    }


def mnemo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mnemo")
    except PackageNotFoundError:
        return "0.1.0"


def _note(msg: str) -> None:
    print(f"mnemo: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- output location


@dataclass(frozen=True)
class OutLocation:
    url: str  # as given
    local: str  # shards (local out) or the staging dir (remote out); holds the state dir
    remote: str | None  # what streaming's uploaders take: a URL, or a plain path for file://

    @property
    def state(self) -> str:
        return os.path.join(self.local, STATE_DIR)

    def remote_join(self, name: str) -> str | None:
        if self.remote is None:
            return None
        return self.remote.rstrip("/") + "/" + name


def resolve_out(out: str, staging: str | None = None) -> OutLocation:
    """A local dir, ``file://`` URL or a remote streaming can upload to."""
    out = str(out)
    scheme = urllib.parse.urlparse(out).scheme
    if scheme == "":
        return OutLocation(out, os.path.abspath(os.path.expanduser(out)), None)
    if scheme == "file":
        remote = urllib.request.url2pathname(urllib.parse.urlparse(out).path)
    else:
        from streaming.base.storage.upload import UPLOADERS

        if scheme not in UPLOADERS:
            raise DataError(
                f"--out {out}: unsupported remote scheme {scheme!r} "
                f"(supported: {', '.join(sorted(s for s in UPLOADERS if s))}, file)"
            )
        remote = out
    if staging is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        staging = os.path.join(cache, "mnemo", "prepare", hashlib.sha256(out.encode()).hexdigest()[:16])
    return OutLocation(out, os.path.abspath(staging), remote)


def _write_json(path: str, obj: dict, tmp_dir: str | None = None) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), tmp_dir)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def _fetch_remote_json(loc: OutLocation, name: str) -> dict | None:
    """A small JSON file of the remote dataset, or None if it has none."""
    url = loc.remote_join(name)
    assert url is not None
    if urllib.parse.urlparse(url).scheme == "":
        return _read_json(url)
    from streaming.base.storage.download import CloudDownloader

    with tempfile.TemporaryDirectory(prefix="mnemo-") as tmp:  # never inside the staging dir
        dest = os.path.join(tmp, name)
        try:
            CloudDownloader.direct_download(url, dest, 60)
        except Exception:  # no such object (each cloud raises its own type)
            return None
        return _read_json(dest)


# ----------------------------------------------------------------------------- claiming the out dir


def out_entries(units: Sequence[WorkUnit], passkey: bool) -> list[str]:
    """Every top-level entry a conversion of ``units`` may create in DATA_DIR."""
    names = [STATE_DIR, "tokenizer.model", "index.json", "manifest.json"] + [u.name for u in units]
    if passkey:
        names.append(_passkey_name(units))
    return names


def _read_outputs(local: str) -> set[str] | None:
    """Names listed in DATA_DIR/.mnemo-outputs.json, or None when mnemo never wrote there.

    A complete dataset of a mnemo version that kept no such list is known by
    its manifest: the parts it names and the fixed names.
    """
    path = os.path.join(local, OUTPUTS_FILE)
    rec = _read_json(path)
    if rec is None:
        path = os.path.join(local, "manifest.json")
        m = _read_json(path)
        if not (isinstance(m, dict) and m.get("format") == "mnemo-mds" and isinstance(m.get("parts"), list)):
            return None
        rec = {
            "entries": [STATE_DIR, "tokenizer.model", "index.json", "manifest.json"]
            + [p.get("name") if isinstance(p, dict) else None for p in m["parts"]]
        }
    names = rec.get("entries") if isinstance(rec, dict) else None
    if not isinstance(names, list) or not all(
        isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and os.sep not in n for n in names
    ):
        raise DataError(
            f"{path}: not a list of mnemo's outputs (edited by hand?); mnemo will not delete "
            f"anything on its word: empty the directory yourself or choose another --out"
        )
    return set(names)


def _write_outputs(loc: OutLocation, names: Iterable[str]) -> None:
    """List ``names`` as mnemo's own before any of them is created (the state dir must exist)."""
    _write_json(
        os.path.join(loc.local, OUTPUTS_FILE),
        {"written_by": "mnemo prepare", "entries": sorted(names)},
        tmp_dir=loc.state,
    )


def _remove(local: str, name: str) -> None:
    p = os.path.join(local, name)
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        os.remove(p)


def _claim_out(loc: OutLocation, fingerprint: str, overwrite: bool, names: Sequence[str]) -> dict | None:
    """Make ``loc`` ours for this dataset (entries ``names``). Returns the manifest when it is already complete.

    DATA_DIR must be new, empty, or hold nothing but what .mnemo-outputs.json
    lists (a state dir alone is the leftover of a run killed before it wrote
    that list). Starting afresh removes exactly the listed entries.
    """
    done = (
        _fetch_remote_json(loc, "manifest.json")
        if loc.remote is not None
        else _read_json(os.path.join(loc.local, "manifest.json"))
    )
    if not (isinstance(done, dict) and done.get("format") == "mnemo-mds"):
        done = None  # no dataset there (a manifest.json of something else is the user's file)
    if done is not None:
        if done.get("fingerprint") == fingerprint and not overwrite:
            return done
        if not overwrite:
            raise DataError(
                f"--out {loc.url} already holds a dataset made from other inputs or settings; "
                f"pass --overwrite to replace it"
            )
    try:
        os.makedirs(loc.local, exist_ok=True)
        entries = os.listdir(loc.local)
    except OSError as e:
        raise DataError(f"--out {loc.url}: cannot create or list {loc.local} ({e.strerror or e})") from None
    owned = _read_outputs(loc.local)
    foreign = sorted(set(entries) - (owned or set()) - {OUTPUTS_FILE, STATE_DIR})
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        what = (
            "is not empty and holds no mnemo dataset"
            if owned is None
            else "holds files this dataset's list of outputs does not name"
        )
        raise DataError(
            f"--out {loc.url} {what} ({foreign[0]}{more}); mnemo never deletes files it did not "
            f"write: choose a new or empty directory"
        )
    plan = _read_json(os.path.join(loc.state, "plan.json")) if owned is not None else None
    if plan is not None and plan.get("fingerprint") != fingerprint and not overwrite:
        raise DataError(
            f"--out {loc.url} holds an unfinished conversion of other inputs or settings; "
            f"rerun that command to finish it, or pass --overwrite"
        )
    if overwrite or plan is None or plan.get("fingerprint") != fingerprint:
        for name in sorted(owned or ()):  # what an earlier conversion listed, and nothing else
            _remove(loc.local, name)
        os.makedirs(loc.state, exist_ok=True)
        _write_outputs(loc, names)
        # Listed now, so ours: start it empty (a run killed before listing may have left temp files).
        shutil.rmtree(loc.state)
        os.makedirs(loc.state)
        _write_json(os.path.join(loc.state, "plan.json"), {"fingerprint": fingerprint})
    elif not set(names) <= owned:
        _write_outputs(loc, owned | set(names))
    return None


def _check_out_apart(loc: OutLocation, corpus: Corpus) -> None:
    """--out must not be, or contain, an input: prepare writes there and --overwrite deletes there."""
    if loc.remote is None:
        target = loc.local
    elif urllib.parse.urlparse(loc.url).scheme == "file":
        target = loc.remote
    else:
        return
    out = os.path.realpath(target)
    for f in corpus.files:
        real = os.path.realpath(f.path)
        if real == out or real.startswith(out.rstrip(os.sep) + os.sep):
            raise DataError(
                f"--out {loc.url} contains the input {f.path}; the output must go to a directory "
                f"that holds no input: choose another --out"
            )


# ----------------------------------------------------------------------------- progress


class _Counters:
    """bytes, documents, tokens done; shared with worker processes when ``shared``."""

    def __init__(self, shared: bool, ctx: mp.context.BaseContext | None = None):
        self.arr = (ctx or mp).Array("q", 3, lock=True) if shared else [0, 0, 0]
        self.shared = shared

    def add(self, nbytes: int, docs: int, tokens: int) -> None:
        if self.shared:
            with self.arr.get_lock():
                self.arr[0] += nbytes
                self.arr[1] += docs
                self.arr[2] += tokens
        else:
            self.arr[0] += nbytes
            self.arr[1] += docs
            self.arr[2] += tokens

    def get(self) -> tuple[int, int, int]:
        return int(self.arr[0]), int(self.arr[1]), int(self.arr[2])


class _Progress:
    """tqdm bar over input bytes with documents/s and tokens/s (on a terminal only)."""

    def __init__(self, total: int, initial: int, counters: _Counters, enabled: bool | None):
        from tqdm import tqdm

        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=not show,
            dynamic_ncols=True,
        )
        self.counters = counters
        self.start = time.monotonic()
        self.shown = 0
        self.last = 0.0

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        nbytes, docs, tokens = self.counters.get()
        el = max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"{docs / el:,.0f} docs/s {tokens / el:,.0f} tok/s", refresh=False)
        self.bar.update(nbytes - self.shown)
        self.shown = nbytes

    def close(self) -> None:
        self.refresh(force=True)
        self.bar.close()


# ----------------------------------------------------------------------------- one work unit


@dataclass(frozen=True)
class UnitContext:
    tokenizer_path: str
    token_dtype: str
    text_field: str
    id_field: str | None
    strict: bool
    local: str
    remote: str | None
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES

    @property
    def state(self) -> str:
        return os.path.join(self.local, STATE_DIR)

    def marker(self, name: str) -> str:
        return os.path.join(self.state, "done", name + ".json")


_worker: dict = {}  # per-process: tokenizer, counters


def _get_tokenizer(path: str) -> Tokenizer:
    tok = _worker.get("tokenizer")
    if tok is None or tok.path != path:
        tok = _worker["tokenizer"] = Tokenizer(path)
    return tok


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _corpus_samples(ctx: UnitContext, unit: WorkUnit, stats: ReadStats, counters: _Counters | None) -> Iterator[dict]:
    """Samples of one unit's documents: tokens with EOS appended, in document order."""
    tok = _get_tokenizer(ctx.tokenizer_path)
    dtype = np.dtype(ctx.token_dtype)
    eos = tok.eos_id
    for batch in _batches(iter_unit(unit, ctx.text_field, ctx.id_field, ctx.strict, stats, ctx.max_doc_bytes)):
        ids = tok.encode_batch([d.text for d in batch])
        ntok = 0
        for d, arr in zip(batch, ids):
            tokens = np.empty(arr.shape[0] + 1, dtype=dtype)  # [n + 1]: the document, then EOS
            tokens[:-1] = arr
            tokens[-1] = eos
            ntok += tokens.shape[0]
            yield {"tokens": tokens, "doc_id": d.doc_id, "source": d.source, "answer_start": -1, "answer_len": 0}
        if counters is not None:
            counters.add(sum(d.nbytes for d in batch), len(batch), ntok)


def _write_unit(ctx: UnitContext, name: str, samples: Iterable[dict], extra: Callable[[], dict]) -> dict:
    """Write samples as MDS into a temp dir, then publish it as ``name`` and mark it done."""
    from streaming import MDSWriter

    tmp = os.path.join(ctx.state, "tmp", f"{name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    remote = None if ctx.remote is None else ctx.remote.rstrip("/") + "/" + name
    out = tmp if remote is None else (tmp, remote)
    writer = MDSWriter(
        columns=columns(ctx.token_dtype),
        out=out,
        compression=COMPRESSION,
        hashes=SHARD_HASHES,
        size_limit=SHARD_SIZE_LIMIT,
        keep_local=False,
        exist_ok=True,
    )
    docs = tokens = 0
    try:
        for s in samples:
            writer.write(s)
            docs += 1
            tokens += int(s["tokens"].shape[0])
        writer.finish()
    except BaseException as e:
        # No finish() after a failure: an unfinished unit must not look complete anywhere.
        writer.cancel_future_jobs()
        if isinstance(e, OSError):
            raise DataError(f"{name}: cannot write under {ctx.local}: {e.strerror or e}") from None
        if type(e) is Exception and "threads failed" in str(e):  # MDSWriter's report of a failed upload
            raise DataError(f"{name}: uploading to {remote} failed (see the log above)") from None
        raise
    if remote is None:
        final = os.path.join(ctx.local, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    result = {"name": name, "documents": docs, "tokens": tokens, "shards": len(writer.shards)}
    result.update(extra())
    os.makedirs(os.path.dirname(ctx.marker(name)), exist_ok=True)
    _write_json(ctx.marker(name), result)
    return result


def _run_unit(ctx: UnitContext, unit: WorkUnit) -> dict:
    stats = ReadStats()
    counters = _worker.get("counters")
    result = _write_unit(
        ctx,
        unit.name,
        _corpus_samples(ctx, unit, stats, counters),
        lambda: {"stats": stats.to_json(), "bytes": unit.est_bytes},
    )
    return result


def _unit_entry(ctx: UnitContext, unit: WorkUnit) -> dict:
    """Worker-process entry point (looks up _run_unit at call time so tests can wrap it)."""
    return _run_unit(ctx, unit)


def _init_worker(counters: _Counters, parent: int) -> None:
    # Ctrl-C reaches the whole process group; the main process handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    _worker["counters"] = counters


# ----------------------------------------------------------------------------- running all units


def _run_units(
    ctx: UnitContext, pending: list[WorkUnit], workers: int, progress: _Progress, counters: _Counters
) -> None:
    if not pending:
        return
    if workers <= 1 or len(pending) == 1:
        _worker["counters"] = counters
        try:
            for u in pending:
                before = counters.get()[0]
                _run_unit(ctx, u)
                counters.add(max(0, u.est_bytes - (counters.get()[0] - before)), 0, 0)
                progress.refresh()
        finally:
            _worker.pop("counters", None)
        return
    # fork: workers start in milliseconds with the tokenizer module already imported.
    mpctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    ex = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(pending)),
        mp_context=mpctx,
        initializer=_init_worker,
        initargs=(counters, os.getpid()),
    )
    try:
        # Biggest units first (fewer idle workers at the end); the output order is the unit order regardless.
        futs = {ex.submit(_unit_entry, ctx, u): u for u in sorted(pending, key=lambda u: -u.est_bytes)}
        left = set(futs)
        finished = 0
        while left:
            done, left = cf.wait(left, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for f in done:
                try:
                    f.result()
                except cf.process.BrokenProcessPool:
                    raise DataError(
                        f"a worker process died (killed or out of memory); {finished} of {len(futs)} "
                        f"parts finished and are kept: rerun the same command to resume"
                    ) from None
                finished += 1
            progress.refresh()
    except BaseException:
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            p.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
    # Units do not report bytes of skipped docs: settle the bar at the total.
    counters.add(max(0, sum(u.est_bytes for u in pending) - counters.get()[0]), 0, 0)


# ----------------------------------------------------------------------------- passkey documents


def _filler_tokens(ctx: UnitContext, units: Sequence[WorkUnit], need: int) -> np.ndarray:
    """The first ``need`` corpus tokens (documents concatenated in input order, with their EOS)."""
    got: list[np.ndarray] = []
    n = 0
    for u in units:
        for s in _corpus_samples(ctx, u, ReadStats(), None):
            got.append(s["tokens"])
            n += s["tokens"].shape[0]
            if n >= need:
                return np.concatenate(got)[:need]
    if not got:
        raise DataError("--passkey-docs: the corpus has no documents to draw filler from")
    return np.concatenate(got)


def _passkey_samples(
    ctx: UnitContext, tok: Tokenizer, filler: np.ndarray, n: int, max_distance: int, segment_len: int, seed: int
) -> Iterator[dict]:
    from mnemo.data_pipeline.passkey import DEPTHS, make_passkey_sample

    rng = np.random.default_rng(seed)
    dtype = np.dtype(ctx.token_dtype)
    for i in range(n):
        distance = int(rng.integers(0, max_distance + 1))
        depth = list(DEPTHS)[int(rng.integers(0, len(DEPTHS)))]
        s = make_passkey_sample(tok, filler, distance, depth, segment_len, rng)
        yield {
            "tokens": np.asarray(s["tokens"]).astype(dtype),
            "doc_id": f"passkey-{i:06d}",
            "source": "passkey",
            "answer_start": int(s["answer_start"]),
            "answer_len": int(s["answer_len"]),
        }


# ----------------------------------------------------------------------------- merge + manifest


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """merge_index calls logging.warning(...) for its temp dir; keep that off the terminal."""
    root = logging.getLogger()
    h = logging.NullHandler()
    root.addHandler(h)
    try:
        yield
    finally:
        root.removeHandler(h)


def _merge(loc: OutLocation, names: list[str]) -> None:
    from streaming.base.util import merge_index

    idx = os.path.join(loc.local, "index.json")
    if os.path.exists(idx):
        os.remove(idx)  # merge_index moves its result into place and refuses to replace a file
    if loc.remote is None:
        urls: list = [os.path.join(loc.local, n, "index.json") for n in names]
        out: str | tuple[str, str] = loc.local
    else:
        urls = [(os.path.join(loc.local, n, "index.json"), loc.remote_join(n + "/index.json")) for n in names]
        out = (loc.local, loc.remote)
    with _quiet_root_logger():
        merge_index(urls, out, keep_local=True)


def _upload(loc: OutLocation, names: Sequence[str]) -> None:
    from streaming.base.storage.upload import CloudUploader

    cu = CloudUploader.get((loc.local, loc.remote), keep_local=True, exist_ok=True)
    for n in names:
        cu.upload_file(n)


# ----------------------------------------------------------------------------- the command


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare(
    inputs: Sequence[str],
    out: str,
    tokenizer: str | None = None,
    workers: int | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
    vocab_size: int = 8192,
    model_type: str = "bpe",
    sample_docs: int = 10_000,
    passkey_docs: int = 0,
    passkey_max_distance: int = 8,
    passkey_segment_len: int = 128,
    seed: int = 0,
    unit_bytes: int | None = None,
    staging: str | None = None,
    progress: bool | None = None,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> dict:
    """Convert ``inputs`` into a mnemo MDS dataset at ``out``; returns the manifest.

    ``tokenizer``: an existing SentencePiece model; without it one is trained
    (``vocab_size``, ``model_type``, ``sample_docs``, ``seed``) into
    OUT/tokenizer.model first. ``workers``: processes (default: all cores).
    ``unit_bytes``: input bytes per work unit (default: about 1/64 of the
    corpus, 1 MiB..256 MiB). ``staging``: local dir for a remote ``out``.
    ``progress``: show the bar (default: when stderr is a terminal).
    ``max_doc_bytes``: bigger documents are skipped and counted (``too_large``).
    """
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if passkey_docs < 0 or passkey_max_distance < 0 or passkey_segment_len < 1:
        raise DataError("--passkey-docs and --passkey-max-distance must be >= 0 and --segment-len >= 1")
    max_doc_bytes = check_max_doc_bytes(max_doc_bytes)
    # Everything a user can get wrong is checked here, before any work.
    corpus = plan_inputs(inputs, text_field, id_field)
    given = Tokenizer(tokenizer) if tokenizer else None
    # Read now: --overwrite may clear OUT, and the model given may be OUT/tokenizer.model itself.
    given_bytes = Path(given.path).read_bytes() if given else b""
    loc = resolve_out(out, staging)
    _check_out_apart(loc, corpus)
    units = split_units(corpus.files, unit_bytes)
    spec = {
        "format_version": FORMAT_VERSION,
        "inputs": [f.fingerprint() for f in corpus.files],
        "text_field": text_field,
        "id_field": id_field,
        "unit_bytes": unit_bytes,
        "units": [u.describe() for u in units],
        "tokenizer": (
            {"sha256": given.sha256}
            if given
            else {
                "train": {"vocab_size": vocab_size, "model_type": model_type, "sample_docs": sample_docs, "seed": seed}
            }
        ),
        "passkey": (
            {
                "docs": passkey_docs,
                "max_distance": passkey_max_distance,
                "segment_len": passkey_segment_len,
                "seed": seed,
            }
            if passkey_docs
            else None
        ),
    }
    if max_doc_bytes != DEFAULT_MAX_DOC_BYTES:  # absent at the default: older datasets keep their fingerprint
        spec["max_doc_bytes"] = max_doc_bytes
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    complete = _claim_out(loc, fingerprint, overwrite, out_entries(units, passkey_docs > 0))
    if complete is not None:
        _note(f"{loc.url} is already complete for these inputs (manifest.json); nothing to do")
        return complete

    if given is not None:
        tok = _copy_tokenizer(loc, given, given_bytes)
    else:
        tok = _train_tokenizer(
            loc, corpus, text_field, id_field, strict, vocab_size, model_type, sample_docs, seed, max_doc_bytes
        )
    ctx = UnitContext(
        os.path.join(loc.local, "tokenizer.model"),
        tok.token_dtype.name,
        text_field,
        id_field,
        strict,
        loc.local,
        loc.remote,
        max_doc_bytes,
    )
    results = _convert(ctx, units, workers, progress)
    stats = _read_stats(corpus, units, results)
    num_corpus = sum(results[u.name]["documents"] for u in units)
    if num_corpus == 0:
        raise DataError(
            f"no documents: every document of {', '.join(map(str, inputs))} was skipped "
            f"({_format_counts(stats.counts)})"
        )
    names = [u.name for u in units]
    if passkey_docs:
        names.append(_passkey_part(ctx, tok, units, passkey_docs, passkey_max_distance, passkey_segment_len, seed))
        results[names[-1]] = _read_json(ctx.marker(names[-1])) or {}

    _merge(loc, names)
    manifest = _manifest(loc, tok, given, spec, fingerprint, names, results, stats, num_corpus)
    _write_json(os.path.join(loc.local, "manifest.json"), manifest, tmp_dir=loc.state)
    if loc.remote is not None:
        _upload(loc, ["tokenizer.model", "manifest.json"])
        shutil.rmtree(loc.local, ignore_errors=True)
    else:
        shutil.rmtree(loc.state, ignore_errors=True)
    return manifest


def _convert(ctx: UnitContext, units: list[WorkUnit], workers: int, progress: bool | None) -> dict[str, dict]:
    """Run every unit not yet marked done; returns each unit's done marker (counts, stats)."""
    shutil.rmtree(os.path.join(ctx.state, "tmp"), ignore_errors=True)  # leftovers of a killed run
    results: dict[str, dict] = {}
    for u in units:
        r = _read_json(ctx.marker(u.name))
        if r is not None:
            results[u.name] = r
    pending = [u for u in units if u.name not in results]
    if results:
        _note(f"resuming: {len(results)} of {len(units)} parts already done")
    import streaming  # noqa: F401  (imports torch: seconds; before the bar starts its clock and before forking)

    counters = _Counters(
        shared=workers > 1 and len(pending) > 1,
        ctx=mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None,
    )
    bar = _Progress(
        sum(u.est_bytes for u in units), sum(u.est_bytes for u in units if u.name in results), counters, progress
    )
    try:
        _run_units(ctx, pending, workers, bar, counters)
    finally:
        bar.close()
    for u in pending:
        r = _read_json(ctx.marker(u.name))
        if r is None:
            raise DataError(f"{ctx.marker(u.name)}: missing after {u.name} finished (was the out dir changed?)")
        results[u.name] = r
    return results


def _read_stats(corpus: Corpus, units: list[WorkUnit], results: dict[str, dict]) -> ReadStats:
    stats = ReadStats()
    stats.merge(corpus.file_stats)
    for u in units:
        stats.merge(results[u.name]["stats"])
    return stats


def _passkey_part(
    ctx: UnitContext, tok: Tokenizer, units: list[WorkUnit], n: int, max_distance: int, segment_len: int, seed: int
) -> str:
    """The part of synthetic passkey documents, after the corpus parts (written once)."""
    name = _passkey_name(units)
    if _read_json(ctx.marker(name)) is None:
        filler = _filler_tokens(ctx, units, max(1 << 16, 4 * segment_len * (max_distance + 1)))
        _write_unit(ctx, name, _passkey_samples(ctx, tok, filler, n, max_distance, segment_len, seed), dict)
    return name


def _passkey_name(units: Sequence[WorkUnit]) -> str:
    return f"part-{len(units):05d}"


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"


def _copy_tokenizer(loc: OutLocation, given: Tokenizer, given_bytes: bytes) -> Tokenizer:
    """OUT/tokenizer.model: a copy of the model given with --tokenizer."""
    dest = os.path.join(loc.local, "tokenizer.model")
    if not (os.path.exists(dest) and file_sha256(dest) == given.sha256):
        atomic_write(dest, given_bytes, tmp_dir=loc.state)
    return Tokenizer(dest)


def _train_tokenizer(
    loc: OutLocation,
    corpus: Corpus,
    text_field: str,
    id_field: str | None,
    strict: bool,
    vocab_size: int,
    model_type: str,
    sample_docs: int,
    seed: int,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
) -> Tokenizer:
    """OUT/tokenizer.model trained on a sample of the corpus (kept across an interrupted run)."""
    from mnemo.data_pipeline.readers import iter_documents

    dest = os.path.join(loc.local, "tokenizer.model")
    if os.path.exists(dest):  # written atomically by an interrupted run of this same command
        return Tokenizer(dest)
    _note(f"training a {model_type} tokenizer (vocab {vocab_size}) on up to {sample_docs} sampled documents")
    stats = ReadStats()
    texts = (d.text for d in iter_documents(corpus, text_field, id_field, strict, stats, max_doc_bytes))
    sample = reservoir_sample(texts, sample_docs, seed, 16_384)
    if not sample:
        names = ", ".join(str(f.path) for f in corpus.files[:3]) if getattr(corpus, "files", None) else "the inputs"
        raise DataError(
            f"no documents: every document of {names} is empty or was skipped ({_format_counts(stats.counts)})"
        )
    # Trained inside the state dir (its temp file too), then moved into place whole.
    staged = os.path.join(loc.state, "tokenizer.model")
    train_from_texts(sample, staged, vocab_size, model_type)
    os.replace(staged, dest)
    return Tokenizer(dest)


def _manifest(
    loc: OutLocation,
    tok: Tokenizer,
    given: Tokenizer | None,
    spec: dict,
    fingerprint: str,
    names: list[str],
    results: dict[str, dict],
    stats: ReadStats,
    num_corpus: int,
) -> dict:
    parts = [
        {
            "name": n,
            "documents": results[n]["documents"],
            "tokens": results[n]["tokens"],
            "shards": results[n].get("shards", 0),
        }
        for n in names
    ]
    num_docs = sum(p["documents"] for p in parts)
    num_tokens = sum(p["tokens"] for p in parts)
    tok_path = (
        os.path.abspath(given.path)
        if given
        else (loc.remote_join("tokenizer.model") or os.path.join(loc.local, "tokenizer.model"))
    )
    return {
        "format": "mnemo-mds",
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "mnemo_version": mnemo_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "out": loc.url,
        "tokenizer_path": tok_path,
        "tokenizer_sha256": tok.sha256,
        "tokenizer_trained": given is None,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "token_dtype": tok.token_dtype.name,
        "columns": columns(tok.token_dtype.name),
        "text_field": spec["text_field"],
        "id_field": spec["id_field"],
        "inputs": spec["inputs"],
        "num_documents": num_docs,
        "num_tokens": num_tokens,
        "num_corpus_documents": num_corpus,
        "num_passkey_documents": num_docs - num_corpus,
        "num_shards": sum(p["shards"] for p in parts),
        "parts": parts,
        "max_doc_bytes": spec.get("max_doc_bytes", DEFAULT_MAX_DOC_BYTES),
        "skipped": {k: v for k, v in sorted(stats.counts.items()) if k in SKIP_REASONS or k in FILE_REASONS},
        "repaired": {k: v for k, v in sorted(stats.counts.items()) if k not in SKIP_REASONS and k not in FILE_REASONS},
        "skipped_examples": stats.examples,
        "passkey": spec["passkey"],
    }
