"""`mnemo prepare`: corpus -> tokenized MDS shards, in parallel, resumable.

The output directory (layout, what mnemo may delete there, remote outputs) is
outputs.py's; tokenizer.model and manifest.json are manifest.py's.

Each work unit (a few files, a byte range of a big JSONL or a row-group range
of a Parquet file; see inputs.py) is converted by one worker into a temp dir
and renamed to ``part-NNNNN`` when complete, then a done marker is written.
A rerun of the same command after Ctrl-C or kill keeps the marked units and
redoes the rest; the merge and the manifest happen only when every unit is
done. So each document lands exactly once, and the sample order is the input
order whatever ``--workers`` is (units are planned from the inputs alone).

A corpus with too few units to keep every worker busy (a few MB) has its
units encoded in chunks by all workers and written by the main process, chunk
results in order: the same shards, byte for byte, as one worker writes. In
any corpus the last units to start are split so too, so that the workers
finish together.

For a remote ``--out``, each unit's MDSWriter uploads its shards with
``out=(local, remote)`` from the local staging dir.

Over 500 lines: the unit conversion, its two ways of running (whole units or
chunks of units) and the command are one flow with private shared state.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mnemo.data_pipeline.errors import DataError, InputError
from mnemo.data_pipeline.inputs import Corpus, ReadStats, WorkUnit, all_skipped, plan_inputs, split_units
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.limits import PASSKEY_MAX_TOKENS
from mnemo.data_pipeline.manifest import (
    FORMAT_VERSION,
    build_manifest,
    columns,
    copy_tokenizer,
    train_tokenizer_on_sample,
)
from mnemo.data_pipeline.out_lock import OutLock, close_inherited_locks
from mnemo.data_pipeline.outputs import (
    STATE_DIR,
    OutLocation,
    check_out_apart,
    claim_out,
    finish_out,
    lock_paths,
    merge_parts,
    out_entries,
    part_present,
    passkey_part_name,
    read_json,
    record_failure,
    remote_failure,
    resolve_out,
    upload,
    write_json,
)
from mnemo.data_pipeline.processes import die_with_parent
from mnemo.data_pipeline.progress import Counters, Progress, note
from mnemo.data_pipeline.readers import DEFAULT_MAX_DOC_BYTES, Doc, check_max_doc_bytes, iter_unit
from mnemo.data_pipeline.split import FILLER_KEY
from mnemo.data_pipeline.tokenizer import Tokenizer, check_sample_docs, check_vocab_size, encode_docs

SHARD_SIZE_LIMIT = 1 << 26  # bytes of uncompressed samples per shard (64 MiB)
SHARD_HASHES = ["sha1"]
COMPRESSION = "zstd"
# Encode this many documents / characters per SentencePiece call.
_BATCH_DOCS = 256
_BATCH_CHARS = 4 << 20
# A corpus of fewer units than this per worker (a few MB with the automatic unit size) would leave
# workers idle: its units are then encoded in chunks of whole pieces (files, byte or row-group
# ranges) of at least _SPLIT_MIN_BYTES, by any worker, and the main process writes each unit from
# its chunks in order (the same samples, so the same shard bytes), as long as the pending units
# hold at most _SPLIT_MAX_BYTES (the main process keeps a unit's tokens until its last chunk is in).
_SPLIT_UNITS_PER_WORKER = 8
_SPLIT_MIN_BYTES = 256 << 10
_SPLIT_MAX_BYTES = 256 << 20
# Any corpus: the last 2 units per worker to start (the smallest) are split into this many chunks
# when at most _SPLIT_MAX_UNIT_BYTES each, so that the workers finish within about a chunk of each
# other (units of the same bytes may differ 2-3x in encoding time).
_TAIL_CHUNKS = 4
_SPLIT_MAX_UNIT_BYTES = 16 << 20


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


def _corpus_samples(ctx: UnitContext, unit: WorkUnit, stats: ReadStats, counters: Counters | None) -> Iterator[dict]:
    """Samples of one unit's documents: tokens with EOS appended, in document order."""
    tok = _get_tokenizer(ctx.tokenizer_path)
    dtype = np.dtype(ctx.token_dtype)
    eos = tok.eos_id
    for batch in _batches(iter_unit(unit, ctx.text_field, ctx.id_field, ctx.strict, stats, ctx.max_doc_bytes)):
        ids = encode_docs(tok, batch)
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
    import_streaming()  # without transformers (lean_imports.py)
    from streaming import MDSWriter

    tmp = os.path.join(ctx.state, "tmp", f"{name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    remote = None if ctx.remote is None else ctx.remote.rstrip("/") + "/" + name
    out = tmp if remote is None else (tmp, remote)
    try:
        writer = MDSWriter(
            columns=columns(ctx.token_dtype),
            out=out,
            compression=COMPRESSION,
            hashes=SHARD_HASHES,
            size_limit=SHARD_SIZE_LIMIT,
            keep_local=False,
            exist_ok=True,
        )
    except OSError as e:
        raise DataError(f"{name}: cannot write under {ctx.local}: {e.strerror or e}") from None
    except Exception as e:  # a remote's uploader: credentials, bucket (each store raises its own types)
        if remote is None:
            raise
        raise remote_failure(remote, f"{name}: cannot upload there", e) from None
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
    write_json(ctx.marker(name), result)
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


def _encode_chunk(ctx: UnitContext, chunk: WorkUnit) -> tuple[list[dict], dict]:
    """Worker-process entry point of a split unit: the samples of ``chunk``'s documents and its read stats."""
    stats = ReadStats()
    return list(_corpus_samples(ctx, chunk, stats, _worker.get("counters"))), stats.to_json()


def _write_chunks(ctx: UnitContext, unit: WorkUnit, chunks: list[tuple[list[dict], dict]]) -> dict:
    """Write a split unit from its chunks' samples, in chunk order: what _run_unit writes for it whole."""
    stats = ReadStats()
    for _, s in chunks:
        stats.merge(s)  # examples in document order, as one reader would have noted them
    samples = (s for got, _ in chunks for s in got)
    return _write_unit(ctx, unit.name, samples, lambda: {"stats": stats.to_json(), "bytes": unit.est_bytes})


def _chunks(unit: WorkUnit, k: int) -> list[WorkUnit]:
    """``unit`` as at most ``k`` runs of consecutive whole pieces of about equal bytes (each keeps its name)."""
    if k <= 1 or len(unit.pieces) < 2:
        return [unit]
    step = unit.est_bytes / k
    runs: list[list] = [[]]
    done = 0
    for piece in unit.pieces:
        if runs[-1] and done >= step * len(runs):
            runs.append([])
        runs[-1].append(piece)
        done += piece.est_bytes
    return [WorkUnit(unit.index, tuple(r), sum(q.est_bytes for q in r)) for r in runs]


def split_plan(pending: Sequence[WorkUnit], workers: int) -> list[list[WorkUnit]] | None:
    """Each pending unit as its chunks ([unit] when whole), or None when no unit is split.

    Units too few to keep ``workers`` busy are all split; otherwise only the
    last ones to start (see _TAIL_CHUNKS).
    """
    if workers <= 1:
        return None
    if len(pending) < _SPLIT_UNITS_PER_WORKER * workers:
        if sum(u.est_bytes for u in pending) > _SPLIT_MAX_BYTES:
            return None
        k = -(-_SPLIT_UNITS_PER_WORKER * workers // len(pending))
        split = set(range(len(pending)))
    else:
        k = _TAIL_CHUNKS
        last = sorted(range(len(pending)), key=lambda i: -pending[i].est_bytes)[-2 * workers :]  # as submitted
        split = {i for i in last if pending[i].est_bytes <= _SPLIT_MAX_UNIT_BYTES}
    plan = [_chunks(u, min(k, u.est_bytes // _SPLIT_MIN_BYTES)) if i in split else [u] for i, u in enumerate(pending)]
    return plan if any(len(c) > 1 for c in plan) else None


def _init_worker(counters: Counters, parent: int) -> None:
    # Ctrl-C reaches the whole process group; the main process handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    close_inherited_locks()
    _worker["counters"] = counters


# ----------------------------------------------------------------------------- running all units


def _run_units(ctx: UnitContext, pending: list[WorkUnit], workers: int, progress: Progress, counters: Counters) -> None:
    if not pending:
        return
    plan = split_plan(pending, workers)
    if plan is None and (workers <= 1 or len(pending) == 1):
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
    # Tasks (unit, chunk number, chunk): whole units, and the chunks of the units split_plan splits.
    # A unit left whole is converted and written by its worker; a split unit's chunks come back to be written here.
    tasks = [(u, i, c) for u, cs in zip(pending, plan or [[u] for u in pending]) for i, c in enumerate(cs)]
    n_chunks = {u.index: 1 for u in pending} if plan is None else {u.index: len(cs) for u, cs in zip(pending, plan)}
    ex = cf.ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=mpctx,
        initializer=_init_worker,
        initargs=(counters, os.getpid()),
    )
    try:
        # Biggest first (fewer idle workers at the end); the output order is the unit order regardless.
        futs = {
            ex.submit(_unit_entry if n_chunks[u.index] == 1 else _encode_chunk, ctx, c): (u, i)
            for u, i, c in sorted(tasks, key=lambda t: -t[2].est_bytes)
        }
        got: dict[int, dict[int, tuple[list[dict], dict]]] = {}  # unit index -> chunk number -> result
        left = set(futs)
        finished = 0
        while left:
            done, left = cf.wait(left, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for f in done:
                try:
                    r = f.result()
                except cf.process.BrokenProcessPool:
                    raise DataError(
                        f"a worker process died (killed or out of memory); {finished} of {len(pending)} "
                        f"parts finished and are kept: rerun the same command to resume"
                    ) from None
                u, i = futs[f]
                if n_chunks[u.index] > 1:
                    have = got.setdefault(u.index, {})
                    have[i] = r
                    if len(have) < n_chunks[u.index]:
                        continue
                    _write_chunks(ctx, u, [have[j] for j in range(len(have))])
                    del got[u.index]
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


def _filler_tokens(ctx: UnitContext, units: Sequence[WorkUnit], need: int, max_docs: int) -> tuple[np.ndarray, int]:
    """(the first ``need`` tokens of the first corpus documents, those documents' count): the documents in input
    order, with their EOS, at most ``max_docs`` of them (fewer tokens then: the passkey filler wraps).

    Those documents are the dataset's first samples, and the count goes into manifest.json
    (``passkey.filler_documents``): the split never holds them out (split.py), whatever val_fraction.
    """
    got: list[np.ndarray] = []
    n = 0
    for u in units:
        for s in _corpus_samples(ctx, u, ReadStats(), None):
            got.append(s["tokens"])
            n += s["tokens"].shape[0]
            if n >= need or len(got) >= max_docs:
                return np.concatenate(got)[:need], len(got)
    if not got:
        raise DataError("--passkey-docs: the corpus has no documents to draw filler from")
    return np.concatenate(got), len(got)


def _check_passkey_fit(tok: Tokenizer, segment_len: int, error: type[DataError] = DataError) -> None:
    """``error`` naming --segment-len unless passkey documents fit its segments with ``tok``: one at D = 0 (the
    tightest: the key sentence shares segment 0 with the question), with stand-in filler (the fit does not
    depend on the filler's words), as train/config.py checks train.passkey and eval.passkey_trials.

    Run before the corpus is converted: the passkey part comes last, and a misfit found there, after hours,
    left an unfinished conversion that a rerun with another --segment-len was refused to replace.
    """
    from mnemo.data_pipeline.passkey import RoundTripError, make_passkey_sample
    from mnemo.data_pipeline.task_sizes import stand_in_filler

    try:
        make_passkey_sample(tok, stand_in_filler(tok, segment_len), 0, "start", segment_len, np.random.default_rng(0))
    except RoundTripError as e:  # no segment length helps: its message says what does
        raise error(f"--passkey-docs: {str(e).removeprefix('passkey: ')}") from None
    except DataError as e:
        why = str(e).removeprefix("passkey: ").removesuffix(" (increase the segment length)")  # said below
        raise error(
            f"--segment-len {segment_len}: {why} (a passkey document at distance 0 holds the key sentence and the "
            "question in one segment): raise --segment-len, or --passkey-docs 0"
        ) from None


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

    ``tokenizer``: an existing SentencePiece model or tokenizer.json; without it one is trained
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
    if passkey_docs and (passkey_max_distance + 1) * passkey_segment_len > PASSKEY_MAX_TOKENS:
        raise DataError(
            f"--passkey-max-distance {passkey_max_distance} and --segment-len {passkey_segment_len}: a passkey "
            f"document of (D + 1) x T = {(passkey_max_distance + 1) * passkey_segment_len:,} tokens, over the "
            f"{PASSKEY_MAX_TOKENS:,} a passkey document may hold"
        )
    if seed < 0:  # numpy's default_rng (passkey documents) takes no negative seed
        raise DataError(f"--seed must be >= 0, got {seed}")
    check_sample_docs(sample_docs)  # with --tokenizer too: a value no run could use is an error, not ignored
    if not tokenizer:
        check_vocab_size(vocab_size)
    max_doc_bytes = check_max_doc_bytes(max_doc_bytes)
    # Everything a user can get wrong is checked here, before any work.
    corpus = plan_inputs(inputs, text_field, id_field)
    given = Tokenizer(tokenizer) if tokenizer else None
    if given is not None and passkey_docs:
        _check_passkey_fit(given, passkey_segment_len)
    # Read now: --overwrite may clear OUT, and the model given may be OUT/tokenizer.model itself.
    given_bytes = Path(given.path).read_bytes() if given else b""
    loc = resolve_out(out, staging)
    check_out_apart(loc, corpus)
    spec = {
        "format_version": FORMAT_VERSION,
        "inputs": [f.fingerprint() for f in corpus.files],
        "text_field": text_field,
        "id_field": id_field,
        "unit_bytes": unit_bytes,
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
    # A conversion is named (its fingerprint) by each input's absolute path: `big`, `./big` and `/home/me/big`,
    # from any working directory, are one conversion (resumed, or complete). Its `source` and position `doc_id`
    # columns hold the path as typed, normalized as text (`./big/x` is `big/x`, readers.py): no machine's folder
    # layout goes into a dataset given as relative paths (a conversion resumed under another spelling names the
    # inputs of the parts it does as that one). The files are read under the paths as typed. mnemo before
    # 2026-12-06 named the conversion by the paths as typed: a dataset or unfinished conversion under that
    # fingerprint is this one too.
    units = split_units(corpus.files, unit_bytes)
    absolute = split_units([replace(f, path=os.path.abspath(f.path)) for f in corpus.files], unit_bytes)
    plans = {_fingerprint({**spec, "units": [u.describe() for u in us]}): (corpus, units) for us in (units, absolute)}
    entries = out_entries(units, passkey_docs > 0)
    if given is not None and given.file_name not in entries:  # OUT/tokenizer.json
        entries.append(given.file_name)
    # One run per --out at a time: held from the claim to the end, released however this ends.
    with OutLock(loc.url, lock_paths(loc)):
        complete, fingerprint = claim_out(loc, list(reversed(plans)), overwrite, entries)
        corpus, units = plans[fingerprint]
        spec["units"] = [u.describe() for u in units]
        if complete is not None:
            note(f"{loc.url} is already complete for these inputs (manifest.json); nothing to do")
            finish_out(loc)  # what a run cut off in its own finish_out left
            return complete

        # Reading the corpus: an input that fails it (InputError) is recorded, so that the rerun with the
        # input fixed (another fingerprint) starts over instead of being told to finish this one.
        try:
            if given is not None:
                tok = copy_tokenizer(loc, given, given_bytes)
            else:
                tok = train_tokenizer_on_sample(
                    loc, corpus, text_field, id_field, strict, vocab_size, model_type, sample_docs, seed, max_doc_bytes
                )
            if given is None and passkey_docs:  # with the tokenizer just trained: recorded as a failure
                _check_passkey_fit(tok, passkey_segment_len, InputError)
            ctx = UnitContext(
                os.path.join(loc.local, tok.file_name),
                tok.token_dtype.name,
                text_field,
                id_field,
                strict,
                loc.local,
                loc.remote,
                max_doc_bytes,
            )
            _forget_lost_parts(loc, ctx, [u.name for u in units] + ([passkey_part_name(units)] if passkey_docs else []))
            results = _convert(ctx, units, workers, progress)
            stats = _read_stats(corpus, units, results)
            num_corpus = sum(results[u.name]["documents"] for u in units)
            if num_corpus == 0:
                raise InputError(all_skipped(inputs, stats))
        except InputError as e:
            record_failure(loc, fingerprint, e)
            raise
        names = [u.name for u in units]
        if passkey_docs:
            names.append(
                _passkey_part(
                    ctx, tok, units, num_corpus, passkey_docs, passkey_max_distance, passkey_segment_len, seed
                )
            )
            results[names[-1]] = read_json(ctx.marker(names[-1])) or {}

        merge_parts(loc, names)
        manifest = build_manifest(loc, tok, given, spec, fingerprint, names, results, stats, num_corpus)
        write_json(os.path.join(loc.local, "manifest.json"), manifest, tmp_dir=loc.state)
        if loc.remote is not None:
            upload(loc, [tok.file_name, "manifest.json"])
        finish_out(loc)
        return manifest


def _fingerprint(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _forget_lost_parts(loc: OutLocation, ctx: UnitContext, names: Sequence[str]) -> None:
    """Drop the done marker of every part whose index.json is gone (deleted by hand, lost remotely): it is redone."""
    for name in names:
        if os.path.exists(ctx.marker(name)) and not part_present(loc, name):
            note(f"{name} was done but its index.json is gone from {loc.url}; converting it again")
            os.remove(ctx.marker(name))


def _convert(ctx: UnitContext, units: list[WorkUnit], workers: int, progress: bool | None) -> dict[str, dict]:
    """Run every unit not yet marked done; returns each unit's done marker (counts, stats)."""
    shutil.rmtree(os.path.join(ctx.state, "tmp"), ignore_errors=True)  # leftovers of a killed run
    results: dict[str, dict] = {}
    for u in units:
        r = read_json(ctx.marker(u.name))
        if r is not None:
            results[u.name] = r
    pending = [u for u in units if u.name not in results]
    if results:
        note(f"resuming: {len(results)} of {len(units)} parts already done")
    import_streaming()  # torch and streaming: seconds; before the bar starts its clock and before forking

    counters = Counters(
        shared=workers > 1 and len(pending) > 1,
        ctx=mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None,
    )
    bar = Progress(
        sum(u.est_bytes for u in units), sum(u.est_bytes for u in units if u.name in results), counters, progress
    )
    try:
        _run_units(ctx, pending, workers, bar, counters)
    finally:
        bar.close()
    for u in pending:
        r = read_json(ctx.marker(u.name))
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
    ctx: UnitContext,
    tok: Tokenizer,
    units: list[WorkUnit],
    num_corpus: int,
    n: int,
    max_distance: int,
    segment_len: int,
    seed: int,
) -> str:
    """The part of synthetic passkey documents, after the corpus parts (written once)."""
    name = passkey_part_name(units)
    done = read_json(ctx.marker(name))
    if done is None or FILLER_KEY not in done:  # not done, or by an older mnemo that did not count its filler
        # At most half the corpus documents (one at least), so that a small corpus keeps documents to hold out.
        filler, docs = _filler_tokens(
            ctx, units, max(1 << 16, 4 * segment_len * (max_distance + 1)), max(1, num_corpus // 2)
        )
        samples = _passkey_samples(ctx, tok, filler, n, max_distance, segment_len, seed)
        _write_unit(ctx, name, samples, lambda: {FILLER_KEY: docs})
    return name
