"""Document streams for recurrent training.

Over 500 lines: one loader (slots, batches, their state and its checks) that reads best whole; the
per-source queue and the mixture's choice are already apart (partition.py, mixture.py).

Each rank runs B stream *slots*. A slot reads one document at a time in
consecutive segments of T tokens; when its document ends it takes the next
document of this rank's partition and raises its ``reset`` flag, so the
trainer clears that slot's memory. The tail segment of a document is padded
(loss mask 0) rather than packed with the next document: memory must never
mix two documents, and with documents much longer than T the padding costs
about T/2 tokens per document (``SegmentBatch.mask`` tells; the trainer logs
the fraction).

Order and partition. Epoch e visits every training document once, in an
order fixed by (seed, e): shards in a random order, documents shuffled inside
each shard (shard-local, so remote datasets are read shard by shard). Rank r
of W takes the r-th contiguous block of that order. Ranks consume documents
at different rates (documents differ in length), so each rank walks its own
block with its own cursor and moves to the next epoch when it is done;
mosaicml-streaming's own iterator assumes equal consumption per rank and pads
partitions with repeated samples, which would break exactly-once, so we use
it for what it does well: the shard format, random access, download and
local caching.

Exact resume. ``state_dict()`` holds (epoch, cursor) and, per slot, the
document and token offset. Loading it at the same world size and batch size
reproduces the uninterrupted stream exactly.

Resume at another world size (or batch size). Documents finished by any old
rank are excluded from the rest of their epoch; documents in flight restart
from their beginning (their memory was per old slot); the remaining documents
of the epoch are re-partitioned over the new ranks. See docs/data.md.

Mixtures (``data.sources``). Each source has its own queue (the partition,
cursor and re-partition rules above, per source: data_pipeline/partition.py);
which source a slot's next document comes from is chosen by token deficit
against the weights (data_pipeline/mixture.py), and the draw counters are
part of the state, so resume stays exact. docs/streams.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from mnemo.data_pipeline.errors import DataError, brief, first_line, limit_reached, storage_error
from mnemo.data_pipeline.lean_imports import import_streaming
from mnemo.data_pipeline.mixture import (
    WeightedSource,
    check_same_sources,
    check_same_tokenizer,
    choose,
    shares,
    source_names,
)
from mnemo.data_pipeline.partition import SourceQueue, epoch_order, rank_block  # noqa: F401 (epoch_order, rank_block: this module's API since before partition.py)
from mnemo.data_pipeline.paths import is_remote, local_path, not_utf8
from mnemo.data_pipeline.redact import redact_quoted, redact_uri
from mnemo.data_pipeline.shm import hold_lock_files, release_lock_files, streaming_dataset

STATE_VERSION = 1

log = logging.getLogger(__name__)


class DocumentSource(Protocol):
    """Random access to the documents of a dataset."""

    num_samples: int
    samples_per_shard: np.ndarray  # [num_shards] int
    # Leading samples never held out (the passkey filler's documents; split.source_heldout_mask), 0 if none.
    train_only: int

    def get(self, idx: int) -> dict[str, Any]:
        """{'tokens': 1-D int array (EOS last), 'answer_start': int, 'answer_len': int}"""


class ArraySource:
    """In-memory documents (tests, synthetic data)."""

    def __init__(
        self,
        docs: Sequence[np.ndarray],
        shard_size: int = 0,
        answers: Sequence[tuple[int, int]] | None = None,
        train_only: int = 0,
    ):
        self.docs = [np.asarray(d) for d in docs]
        self.train_only = train_only
        self.num_samples = len(self.docs)
        n, s = self.num_samples, shard_size or max(1, self.num_samples)
        self.samples_per_shard = np.array([min(s, n - i) for i in range(0, n, s)] or [0], dtype=np.int64)
        self.answers = list(answers) if answers is not None else None

    def get(self, idx: int) -> dict[str, Any]:
        a = self.answers[idx] if self.answers else (-1, 0)
        return {"tokens": self.docs[idx], "answer_start": a[0], "answer_len": a[1]}


def _check_index(key: str, data_dir: str) -> list[dict[str, Any]]:
    from mnemo.data_pipeline.verify import check_index

    try:
        return check_index(data_dir)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def node_cache_dir(cache_dir: str) -> str:
    """This machine's folder under a job's ``cache_dir``: ``<cache_dir>/node-<hostname>``.

    streaming coordinates the ranks of one machine through its shared memory (one local rank downloads
    or decompresses a shard, the others wait), but nothing coordinates two machines: on a cache folder
    on a shared filesystem, one node deleted a shard's .zstd (its decompressed copy made) while another
    node was opening it (FileNotFoundError in one rank, a collective error in the others). Each machine
    gets a folder of its own, named by its host name (stable across restarts and elastic re-ranking, so
    a restart on the same machine finds its copies); a name with other characters than letters,
    digits, '.', '-', '_' is replaced by its hash.
    """
    host = socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", host):
        host = "h" + hashlib.sha256(host.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir, f"node-{host}")


def decompress_cache(data_dir: str, cache_dir: str) -> str:
    """The folder under ``cache_dir`` that the compressed shards of local ``data_dir`` decompress into.

    streaming decompresses a shard into its ``local`` folder and keeps the copy there; given the dataset
    dir itself it would write into it (a read-only shared dataset could not be trained from, and a stale
    copy beside a changed shard would be read instead of it). So the dataset dir is read as streaming's
    remote and this folder is its local: named by the hash of the dataset's index.json, so that another
    dataset (or this one rewritten) never finds the copies of the one before.
    """
    with open(os.path.join(data_dir, "index.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return os.path.join(cache_dir, f"local-{digest}")


def check_token_ids(where: str, source: DocumentSource, doc: int, tokens: np.ndarray, vocab_size: int) -> None:
    """DataError naming ``where`` (the dataset, ending ": "), the shard and sample ``doc`` of ``source`` of a document
    (``tokens``) with a token id outside [0, vocab_size); nothing is checked with a ``vocab_size`` <= 0.

    An embedding lookup would fail on it (an IndexError on CPU, a device-side assert on GPU) without saying
    which data: training's streams and `mnemo eval --data` check each document they read. One max (and min)
    over the document: negligible beside reading it.
    """
    if vocab_size <= 0 or tokens.size == 0:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi < vocab_size and lo >= 0:
        return
    shard = int(np.searchsorted(np.cumsum(source.samples_per_shard), doc, side="right"))
    raise DataError(
        f"{where}shard {shard}, sample {doc}: token id {hi if hi >= vocab_size else lo} is outside the vocabulary "
        f"(0..{vocab_size - 1}); the data was not made with this tokenizer, or is corrupted (`mnemo data verify`)"
    )


class MDSSource:
    """Documents of an MDS dataset written by ``mnemo prepare``.

    Read through a cache folder (a remote dataset; a local one with compressed shards and a ``cache_dir``),
    streaming copies each shard there when it is first read, decompresses it, and reuses what it finds
    there in any later run on the same folder. A copy that does not match the dataset is never reused:
    at start-up each cached file whose size is not the one index.json records is dropped (a stat per
    shard, nothing read), each compressed copy is checked against index.json's hash when it is
    decompressed (streaming's ``validate_hash``: the copy is read then anyway), and a shard that fails to
    read has its copy dropped, the dataset's file checked as ``mnemo data verify`` checks it (a damaged one
    is a one-line DataError naming it), and is read once more from a fresh copy. docs/data.md.
    """

    def __init__(self, path: str, cache_dir: str | None = None, key: str = "data.path"):
        import_streaming()  # without transformers (lean_imports.py)
        from streaming import StreamingDataset

        self.key = key
        self.remote = is_remote(path)
        self.path = "" if self.remote else path  # named by errors about its data (a URL may hold a secret)
        remote = path if is_remote(path) else None
        local = cache_dir if remote else local_path(path)
        for folder in (local, cache_dir):  # streaming's shared memory names them (as UTF-8)
            if folder and (why := not_utf8(folder)) is not None:
                raise DataError(f"{key}: {why}")
        # A local dataset's folder and the shard entries of its index.json: the diagnosis of a shard that fails
        # to read (verify's checks of its file).
        self.data_dir = local or ""
        self.index: list[dict[str, Any]] = []
        # streaming opens (and decompresses into) the files index.json names, and a FIFO index.json would
        # hang it: a dataset dir is data someone may have sent. A remote's index is checked once fetched.
        if remote is None and os.path.exists(os.path.join(local, "index.json")):
            shards = self.index = _check_index(key, local)
            if cache_dir and any(shard.get("zip_data") for shard in shards):
                # an absolute path: streaming reads a remote as a URL, and "data:v1" has a scheme for it
                remote, local = os.path.abspath(local), decompress_cache(local, cache_dir)
        try:
            self.ds = streaming_dataset(
                lambda: StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1),
                key,
                shards=len(self.index),
            )
        except DataError:
            raise
        except FileNotFoundError as e:
            raise DataError(
                f"{key}: cannot open MDS dataset at {redact_uri(path)}: {redact_quoted(str(e), path)}"
            ) from None
        except ValueError as e:
            if "Reused local directory" not in str(e):
                if self.remote:
                    raise _unreadable_remote(path, key, e) from None
                raise
            raise DataError(
                f"{key}: the cache folder {local!r} of {redact_uri(path)} is registered in shared memory by another"
                " job (a live one, or one killed without cleanup): give this job its own data.cache_dir, or, when no"
                " job uses it, remove the /dev/shm/NNNNNN_* segments whose NNNNNN_locals names it"
            ) from None
        except Exception as e:  # a remote store's: credentials, bucket, a missing object (each its own types)
            if not self.remote or storage_error(e) is not None or limit_reached(e) is not None:
                raise  # a local dataset's is a bug (its traceback); the machine's is exit_status's one line
            raise _unreadable_remote(path, key, e) from None
        if remote is not None:
            _check_index(key, local)
        # The folder of streaming's copies of the shards (never the dataset's own: nothing is dropped there).
        self.cache = local if remote is not None else None
        if self.cache is not None:
            algo = _hash_to_check(self.ds.shards)
            for stream in self.ds.streams:  # read when a copy is decompressed (or downloaded raw), not before
                stream.validate_hash = algo
            self._drop_copies_of_another_size()
        manifest = _manifest(path, key)
        self.train_only = _train_only(manifest, path, key)
        # A remote dataset's fetched manifest (its document and token counts, logged as params); None for a
        # local one, whose manifest.json the trainer reads itself.
        self.remote_manifest: dict[str, Any] | None = manifest
        # The tokenizer a remote dataset was made with (its fetched manifest's; None: unknown, or a local dataset,
        # which the config's checks compare): open_sources checks it against the other sources'.
        self.tokenizer_sha256: str | None = str(manifest.get("tokenizer_sha256") or "") or None if manifest else None
        self._readers: int | None = None  # hold_lock_files' descriptor
        self.num_samples = int(self.ds.num_samples)
        self.samples_per_shard = np.asarray(self.ds.samples_per_shard, dtype=np.int64)
        self.has_answers = "answer_start" in getattr(self.ds.shards[0], "column_names", []) if self.ds.shards else False

    def get(self, idx: int) -> dict[str, Any]:
        try:
            s = self.ds.get_item(int(idx))
        except Exception as e:  # zstd's, streaming's (a checksum, a retry), an OSError, a decoder's; or a bug
            # First the copy goes: streaming leaves a shard whose preparation failed marked as in preparation,
            # and every other reader of it (a prefetch thread, another local rank) would wait for it forever.
            shard_id = int(self.ds.spanner[int(idx)][0])
            if self.cache is not None:
                self._drop_copy(shard_id)
            full = storage_error(e)
            if full is not None and full.filename is None and self.cache is not None:
                # streaming's write of a copy into the cache (a decompressed shard: out.write) names no file, and
                # the one line was a bare "No space left on device": the cache folder it was filling is named.
                raise OSError(full.errno, full.strerror, self.cache) from e
            if full is not None or limit_reached(e) is not None:
                raise  # the machine, not the data: exit_status says which in one line
            if not _unreadable(e, self.remote):
                raise  # a bug (a KeyError in mnemo or streaming): its traceback, exit 1 (exit_status)
            s = self._read_again(int(idx), shard_id, e)
        return {
            "tokens": s["tokens"],
            "answer_start": int(s.get("answer_start", -1)),
            "answer_len": int(s.get("answer_len", 0)),
            "source": s.get("source", ""),
        }

    def hold_lock_files(self) -> None:
        """This process reads the dataset until ``release_lock_files(last_reader=True)`` (shm.hold_lock_files):
        the last reader of the job on this machine then removes streaming's lock files, with no collective."""
        if self._readers is None:
            self._readers = hold_lock_files(self.ds)

    def release_lock_files(self, last_reader: bool = False) -> list[str]:
        """Remove streaming's lock files of this dataset in the temp folder (shm.release_lock_files): when every
        process of the job on this machine is done reading it, from one of them; with ``last_reader``, from
        each one that held them (``hold_lock_files``), as it is done: the last one removes them."""
        held, self._readers = self._readers, None
        if not last_reader:
            if held is not None:
                os.close(held)
            return release_lock_files(self.ds)
        if held is None:
            return []  # never held (or released already): not known to be the last
        return release_lock_files(self.ds, held)

    def _shard_name(self, shard_id: int) -> str:
        """The file name (as in index.json) of shard ``shard_id``: its compressed file, else its raw one."""
        raw, zipped = self.ds.shards[shard_id].file_pairs[0]
        return (zipped or raw).basename

    def _drop_copy(self, shard_id: int) -> None:
        """Drop the cache's copies of shard ``shard_id`` (streaming's eviction: it then copies the shard again
        when it is next read). Only ever the cache folder's files: a dataset read in place has none."""
        assert self.cache is not None
        try:
            self.ds.evict_shard(shard_id)
        except RuntimeError as e:  # a copy whose decompression failed was never counted: no cache_limit is set
            if "Negative cache usage" not in str(e):
                raise

    def _drop_copies_of_another_size(self) -> None:
        """Drop each shard whose copy (compressed or decompressed) in the cache has another size than
        index.json records: a copy of another version of the dataset, or one cut short. A stat per file; the
        contents of a compressed copy are checked by hash when it is decompressed (``validate_hash``), and a
        decompressed copy is only ever made from a compressed one so checked."""
        for i, shard in enumerate(self.ds.shards):
            for raw, zipped in shard.file_pairs:
                wrong = [f for f in (raw, zipped) if f is not None and _size(shard, f.basename) not in (None, f.bytes)]
                if wrong:
                    log.warning(
                        "%s: the cached copy of shard %s has another size than index.json records: copying it again",
                        self.key,
                        self._shard_name(i),
                    )
                    self._drop_copy(i)
                    break

    def _read_again(self, idx: int, shard_id: int, err: Exception) -> dict[str, Any]:
        """Sample ``idx`` of shard ``shard_id`` after streaming failed to read it (``err``; the cache's copy is
        dropped): a damaged shard of a local dataset is a DataError naming it, found as ``mnemo data verify``
        finds it; else the sample is read once more, from a fresh copy; else a DataError naming the shard."""
        from mnemo.data_pipeline.verify import read_shard

        name = self._shard_name(shard_id)
        where = f"{self.key}: {self.path}" if self.path else f"{self.key}: the remote dataset"
        if self.index:
            try:
                read_shard(self.data_dir, self.index[shard_id])
            except DataError as e:
                raise DataError(
                    f"{self.key}: {self.path}: {e}; repair the dataset or prepare it again "
                    f"(`mnemo data verify {self.path}` checks every shard)"
                ) from err
        why = f"{type(err).__name__}: {first_line(err)}"
        if self.cache is None:
            raise DataError(f"{where}: shard {name} cannot be read ({why})") from err
        log.warning("%s: shard %s: its cached copy cannot be read (%s): copying it again", where, name, why)
        try:
            return self.ds.get_item(idx)
        except Exception as again:
            if storage_error(again) is not None or limit_reached(again) is not None:
                raise
            self._drop_copy(shard_id)
            if not _unreadable(again, self.remote):
                raise
            why = f"{type(again).__name__}: {first_line(again)}"
            checked = " (its file there checks out against index.json)" if self.index else ""
            raise DataError(f"{where}: shard {name}{checked} cannot be read from a fresh copy ({why})") from again


# What a damaged shard (or copy) raises as streaming reads it: measured by damaging shards (truncated, bytes
# flipped; tests/unit/test_data_verify.py): a checksum failure, a decoder's ValueError (UnicodeDecodeError, "buffer
# size must be a multiple of element size"), an IndexError (a sample's offsets past its end), zstd.Error; a missing
# file is an OSError. The modules of the decompressors streaming may use raise their own types.
_DAMAGE = (OSError, ValueError, IndexError, EOFError)
_DECOMPRESSORS = frozenset({"zstd", "zlib", "bz2", "gzip", "lzma", "brotli", "snappy"})
# Where a bug's exception comes from (a KeyError, TypeError, AttributeError raised by their code or Python's).
_OWN_CODE = frozenset({"builtins", "mnemo", "streaming", "numpy"})


def _unreadable(e: BaseException, remote: bool) -> bool:
    """Whether ``e``, raised by streaming reading a shard, says that the shard cannot be read (damaged, missing,
    or a remote store's failure: each cloud's client raises its own type), not a bug, which must show its
    traceback (exit_status: exit 1) rather than be told as a damaged shard."""
    if isinstance(e, _DAMAGE):
        return True
    module = type(e).__module__.split(".")[0]
    return module in _DECOMPRESSORS or (remote and module not in _OWN_CODE)


def _size(shard: Any, basename: str) -> int | None:
    """The size of file ``basename`` of a streaming shard reader in its folder; None if there is none."""
    try:
        return os.stat(os.path.join(shard.dirname, shard.split, basename)).st_size
    except OSError:  # not copied yet
        return None


def _hash_to_check(shards: Sequence[Any]) -> str | None:
    """The algorithm streaming checks each shard's copy with when it decompresses (or downloads) it: one that
    index.json records for the file streaming reads of every shard (its compressed file, else its raw one),
    sha1 (what prepare records) where it can; None when there is none (a dataset written without hashes)."""
    from streaming.base.hashing import get_hashes

    common: set[str] | None = None
    for shard in shards:
        for raw, zipped in shard.file_pairs:
            algos = set((zipped or raw).hashes or {})
            common = algos if common is None else common & algos
    usable = (common or set()) & get_hashes()
    return "sha1" if "sha1" in usable else min(usable, default=None)


def _unreadable_remote(path: str, key: str, e: Exception) -> DataError:
    """The one line for remote dataset ``path`` that streaming could not open (``e``): ``KEY: URL: cannot read
    it (Type: reason)``, credentials hidden (outputs.remote_failure, as ``mnemo prepare --out`` words it)."""
    from mnemo.data_pipeline.outputs import remote_failure

    return remote_failure(path, "cannot read it", e, key)


def _manifest(path: str, key: str) -> dict[str, Any] | None:
    """The manifest.json of remote dataset ``path``, fetched (None: it has none); None for a local one (its
    manifest is read where needed). Every rank must get the same answer, so a failed fetch stops the run."""
    if not is_remote(path):
        return None
    from mnemo.data_pipeline.outputs import fetch_remote_json

    where = f"{key}: the remote dataset's manifest.json"  # not its URL: it may hold a secret
    try:
        manifest = fetch_remote_json(path.rstrip("/") + "/manifest.json")
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # network, credentials (each cloud raises its own type)
        raise DataError(f"{where} cannot be fetched ({type(e).__name__}); rerun when the store answers") from None
    if manifest is not None and not isinstance(manifest, dict):
        raise DataError(f"{where} is not a JSON object")
    return manifest


def _train_only(manifest: dict[str, Any] | None, path: str, key: str) -> int:
    """The training-only samples of dataset ``path`` (split.py), from its manifest.json: a local one's is read
    here, a remote one's is ``manifest`` (``_manifest``; None: it has none, 0)."""
    from mnemo.data_pipeline.split import train_only_from
    from mnemo.data_pipeline.verify import dataset_train_only

    if not is_remote(path):
        try:
            return dataset_train_only(local_path(path))
        except DataError as e:
            raise DataError(f"{key}: {e}") from None
    return train_only_from(manifest, f"{key}: the remote dataset's manifest.json")


def open_sources(entries: Sequence[Any], cache_dir: str) -> list[WeightedSource]:
    """The mixture of ``data.sources`` (items with path, weight, name, max_epochs): each an MDSSource with its
    own cache folder ``<cache_dir>/<name>`` (remote sources). [] for no entries (a single data.path)."""
    names = source_names([e.path for e in entries], [e.name for e in entries])
    sources = [
        WeightedSource(
            MDSSource(e.path, cache_dir=os.path.join(cache_dir, n), key=f"data.sources[{i}].path"),
            weight=float(e.weight),
            name=n,
            max_epochs=int(e.max_epochs),
        )
        for i, (e, n) in enumerate(zip(entries, names))
    ]
    # The config's check compared the local sources' tokenizers; a remote source's is known only now, from its
    # fetched manifest (the same on every rank: each stops with this line).
    try:
        check_same_tokenizer([e.path for e in entries], [getattr(w.source, "tokenizer_sha256", None) for w in sources])
    except DataError as e:
        raise DataError(f"data.sources: {e}") from None
    return sources


@dataclass
class SegmentBatch:
    tokens: torch.Tensor  # [B, T+1] int64: inputs tokens[:, :-1], targets tokens[:, 1:]
    mask: torch.Tensor  # [B, T] bool: target is a real token (False = padding)
    weight: torch.Tensor  # [B, T] float32: per-target loss weight (0 on padding)
    reset: torch.Tensor  # [B] bool: this slot starts a new document at this segment
    doc_ids: torch.Tensor  # [B] int64: sample index of each slot's document (-1 = none)
    positions: torch.Tensor  # [B] int64: token offset of the segment inside its document
    epochs: torch.Tensor  # [B] int64: epoch of each slot's document
    sources: torch.Tensor | None = None  # [B] int64: index of each slot's source in data.sources (0: data.path)


# ------------------------------------------------------------------ streams


class _Slot:
    __slots__ = ("doc", "epoch", "offset", "tokens", "answer", "src")

    def __init__(self):
        self.doc, self.epoch, self.offset, self.src = -1, -1, 0, 0
        self.tokens: np.ndarray | None = None
        self.answer = (-1, 0)

    def done(self) -> bool:
        # A document of L tokens has L-1 targets; segments start at 0, T, 2T...
        return self.tokens is None or self.offset >= len(self.tokens) - 1


def _whole(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


class DocumentStreams:
    """B stream slots over this rank's partition of one dataset or a weighted mixture; an infinite iterator
    of SegmentBatch.

    ``source`` is one DocumentSource (``data.path``) or a list of
    ``WeightedSource`` (``data.sources``). ``batch_size`` is the number of
    slots this rank runs, whatever the trainer makes of them.
    """

    def __init__(
        self,
        source: DocumentSource | Sequence[WeightedSource],
        *,
        batch_size: int,
        segment_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        val_fraction: float = 0.0,
        pad_id: int = 0,
        answer_weight: float = 1.0,
        answer_context_weight: float = 1.0,
        num_workers: int = 0,
        prefetch: int = 64,
        vocab_size: int = 0,
    ):
        self.B, self.T = batch_size, segment_len
        self.vocab_size = vocab_size  # > 0: every document's token ids are checked to lie below it
        self.rank, self.world = rank, world_size
        self.seed, self.val_fraction = seed, val_fraction
        # A tokenizer without a pad token (many tokenizer.json files; the manifest says -1) pads with id 0:
        # padded positions carry no loss and no weight, so any id in the vocabulary will do, and -1 would
        # index the embedding out of range.
        self.pad_id, self.answer_weight = max(pad_id, 0), answer_weight
        self.answer_context_weight = answer_context_weight
        common = dict(rank=rank, world=world_size, seed=seed, val_fraction=val_fraction)
        if isinstance(source, (list, tuple)):
            self.mixture: list[WeightedSource] = list(source)
            shares([m.weight for m in self.mixture])  # the checks of the config's weights (a DataError)
            self.queues = [
                SourceQueue(m.source, label=f"data.sources[{i}]", stream=i, max_epochs=m.max_epochs, **common)
                for i, m in enumerate(self.mixture)
            ]
            self.source_names = [m.name or f"source{i}" for i, m in enumerate(self.mixture)]
        else:
            self.mixture = []
            self.queues = [SourceQueue(source, label="data.path", **common)]
            self.source_names = []  # no per-source metrics for a single dataset
        self.source = self.queues[0].source
        self.drawn = [0] * len(self.queues)  # document targets drawn per source (the choice's state)
        self.source_tokens = [0] * len(self.queues)  # real targets delivered per source (metrics)
        self._refresh_active()
        self.slots = [_Slot() for _ in range(self.B)]
        self.batches = 0
        # Prefetch upcoming documents of this rank's (deterministic) queues.
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="mnemo-prefetch") if num_workers > 0 else None
        self._prefetch = prefetch

    @property
    def epoch(self) -> int:
        """The epoch of a single dataset; of a mixture, the lowest epoch of its sources that still draw."""
        live = [q.epoch for q, m in zip(self.queues, self.mixture) if m.weight > 0 and not q.exhausted()]
        return min(live) if live else (self.queues[0].epoch if not self.mixture else max(q.epoch for q in self.queues))

    # ---------------------------------------------------------------- queue
    def _next_doc(self) -> tuple[int, int, int] | None:
        """(source index, sample id, epoch) of the next document; None: every source that draws is used up."""
        if not self.mixture:
            doc, epoch = self.queues[0].next_doc()
            return 0, doc, epoch
        while True:
            i = choose(self.drawn, self._weights, self._active)
            if i < 0:
                return None
            got = self.queues[i].next_doc()
            if got is not None:
                return i, got[0], got[1]
            self._active = [j for j in self._active if j != i]  # source i ran out: the others share its weight

    @property
    def used_up(self) -> bool:
        """Whether a slot waits for a document and every source with a weight > 0 has reached its max_epochs.

        Its next batch would be padding there. The ranks (slot groups) run out at different steps (their
        blocks differ in length), so the trainer ends the run at the first step after which this holds on
        any rank (collectives.any_true), like at train.max_steps: a checkpoint, exit 0.
        """
        if not self.mixture or not any(slot.done() for slot in self.slots):
            return False
        return not any(self.queues[i].has_next() for i in self._active)

    def _refresh_active(self) -> None:
        """The sources that may draw (weight > 0, not exhausted), in index order: the choice's candidates."""
        self._weights = shares([m.weight for m in self.mixture]) if self.mixture else []
        self._active = [
            i for i, (m, q) in enumerate(zip(self.mixture, self.queues)) if m.weight > 0 and not q.exhausted()
        ]

    def _check_token_ids(self, src: int, doc: int, tokens: np.ndarray) -> None:
        """check_token_ids of a document of source ``src``, naming its queue's label and dataset."""
        queue = self.queues[src]
        where = getattr(queue.source, "path", "")
        check_token_ids(f"{queue.label}: {where + ': ' if where else ''}", queue.source, doc, tokens, self.vocab_size)

    # ---------------------------------------------------------------- batches
    def __iter__(self):
        return self

    def __next__(self) -> SegmentBatch:
        B, T = self.B, self.T
        tokens = np.full((B, T + 1), self.pad_id, dtype=np.int64)
        weight = np.zeros((B, T), dtype=np.float32)
        real = np.zeros((B, T), dtype=bool)  # targets that are document tokens (not padding)
        reset = np.zeros(B, dtype=bool)
        doc_ids = np.zeros(B, dtype=np.int64)
        positions = np.zeros(B, dtype=np.int64)
        epochs = np.zeros(B, dtype=np.int64)
        sources = np.zeros(B, dtype=np.int64)
        for b, slot in enumerate(self.slots):
            while slot.done():
                got = self._next_doc()
                if got is None:  # the mixture is used up: padding here, and the trainer ends the run (used_up)
                    slot.doc, slot.tokens, slot.offset = -1, None, 0
                    break
                src, doc, epoch = got
                item = self.queues[src].load(doc, self._pool, self._prefetch)
                slot.doc, slot.epoch, slot.offset, slot.src = doc, epoch, 0, src
                slot.tokens = np.asarray(item["tokens"])
                self._check_token_ids(src, doc, slot.tokens)
                slot.answer = (int(item.get("answer_start", -1)), int(item.get("answer_len", 0)))
                self.drawn[src] += max(0, len(slot.tokens) - 1)
                reset[b] = True
            if slot.tokens is None:
                doc_ids[b], epochs[b], sources[b] = -1, slot.epoch, slot.src
                continue
            o = slot.offset
            chunk = slot.tokens[o : o + T + 1]
            tokens[b, : len(chunk)] = chunk
            n_targets = len(chunk) - 1
            weight[b, :n_targets] = 1.0
            real[b, :n_targets] = True
            self.source_tokens[slot.src] += n_targets
            a0, alen = slot.answer
            if alen > 0 and (self.answer_weight != 1.0 or self.answer_context_weight != 1.0):
                # target j (0-based in the segment) is token o + j + 1 of the document
                tgt = np.arange(o + 1, o + 1 + n_targets)
                is_answer = (tgt >= a0) & (tgt < a0 + alen)
                weight[b, :n_targets] = np.where(is_answer, self.answer_weight, self.answer_context_weight)
            doc_ids[b], positions[b], epochs[b], sources[b] = slot.doc, o, slot.epoch, slot.src
            slot.offset = o + T
        self.batches += 1
        w = torch.from_numpy(weight)
        return SegmentBatch(
            tokens=torch.from_numpy(tokens),
            mask=torch.from_numpy(real),
            weight=w,
            reset=torch.from_numpy(reset),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(positions),
            epochs=torch.from_numpy(epochs),
            sources=torch.from_numpy(sources),
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        sd = {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world,
            "batch_size": self.B,
            "segment_len": self.T,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "slots": [
                {"doc": s.doc, "epoch": s.epoch, "offset": s.offset, "done": s.done(), "source": s.src}
                for s in self.slots
            ],
            "batches": self.batches,
        }
        if self.mixture:  # per source: the queue, the draw counters, the delivered tokens
            sd["sources"] = [
                {**q.state(), "name": name, "drawn": d, "tokens": t}
                for q, name, d, t in zip(self.queues, self.source_names, self.drawn, self.source_tokens)
            ]
        else:  # a single dataset: the layout of every checkpoint before mixtures
            sd.update(self.queues[0].state())
        return sd

    def _queue_states(self, sd: dict[str, Any]) -> list[dict[str, Any]]:
        return sd["sources"] if self.mixture else [sd]

    def _check_compatible(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {sd.get('version')} is not {STATE_VERSION}")
        if bool(self.mixture) != ("sources" in sd):
            was = "a mixture (data.sources)" if "sources" in sd else "one dataset (data.path)"
            raise DataError(f"stream state: the checkpoint was made on {was}; this run's data differs")
        olds = self._queue_states(sd)
        if self.mixture:  # sources are matched by position
            check_same_sources([old["name"] for old in olds], self.source_names)
        for q, old in zip(self.queues, olds):
            if old["num_samples"] != q.source.num_samples:
                raise DataError(
                    f"{q.label}: the checkpoint was made on a dataset of {old['num_samples']} documents, "
                    f"this one has {q.source.num_samples}"
                )
            was, now = int(old.get("train_only", 0)), int(getattr(q.source, "train_only", 0))  # absent: older runs
            if was != now:  # the dataset was prepared again: its held-out documents are others
                raise DataError(
                    f"{q.label}: the checkpoint's split kept the first {was} documents out of the held-out set "
                    f"(passkey filler), this dataset keeps {now}: it was prepared again since"
                )
        for key, mine in (("seed", self.seed), ("val_fraction", self.val_fraction)):
            if sd[key] != mine:
                raise DataError(f"stream state: {key} {sd[key]} differs from this run's {mine}")

    def same_shape(self, state: dict[str, Any]) -> bool:
        """Was ``state`` saved by a loader of this world size, batch size and segment length?

        DataError for a state of another version (its keys may differ)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {state.get('version')} is not {STATE_VERSION}")
        return state["world_size"] == self.world and state["batch_size"] == self.B and state["segment_len"] == self.T

    def exact_resume_possible(self, states: list[dict[str, Any]]) -> bool:
        return len(states) == self.world and all(self.same_shape(s) for s in states)

    def load_state_dict(self, states: dict[str, Any] | list[dict[str, Any]]) -> bool:
        """Restore from this rank's state (same shape) or all old ranks' states.

        ``states`` is this rank's own state, or the list of every old rank's
        state (needed when the world size or batch size changed). Returns
        True if the resume is exact, False if it re-partitioned (in-flight
        documents restart, so the caller must start their slots' memory empty).
        """
        if isinstance(states, dict):
            states = [states]
        for s in states:
            self._check_compatible(s)
        if len(states) == 1 and states[0]["rank"] == self.rank and self.same_shape(states[0]):
            mine = states[0]
        elif self.exact_resume_possible(states):
            mine = sorted(states, key=lambda s: s["rank"])[self.rank]
        else:
            self._reshape(states)
            return False
        self._check_slots(mine["slots"])
        for q, st in zip(self.queues, self._queue_states(mine)):
            q.load_state(st)
        if self.mixture:
            self.drawn = [int(st["drawn"]) for st in mine["sources"]]
            self.source_tokens = [int(st["tokens"]) for st in mine["sources"]]
            self._refresh_active()
        self.batches = int(mine["batches"])
        for slot, s in zip(self.slots, mine["slots"]):
            slot.doc, slot.epoch, slot.offset = int(s["doc"]), int(s["epoch"]), int(s["offset"])
            slot.src = int(s.get("source", 0))
            if slot.doc >= 0:
                item = self.queues[slot.src].source.get(slot.doc)
                slot.tokens = np.asarray(item["tokens"])
                slot.answer = (int(item.get("answer_start", -1)), int(item.get("answer_len", 0)))
            else:
                slot.tokens = None
        return True

    def _check_slots(self, slots: list[dict[str, Any]]) -> None:
        """DataError ``slots[i].FIELD: what is wrong`` for a slot state this loader cannot continue from (a
        crafted or damaged rank file): a document index past its dataset was an IndexError traceback, a
        negative offset or epoch was accepted and read the document from the wrong place."""
        if len(slots) != self.B:
            raise DataError(f"slots: {len(slots)} slots, not this loader's {self.B}")
        for i, slot in enumerate(slots):
            src = slot.get("source", 0)
            checks = {
                "source": (src, 0, len(self.queues) - 1),
                "doc": (slot.get("doc"), -1, None),
                "epoch": (slot.get("epoch"), -1, None),
                "offset": (slot.get("offset"), 0, None),
            }
            if _whole(src) and 0 <= src < len(self.queues):
                checks["doc"] = (slot.get("doc"), -1, self.queues[src].source.num_samples - 1)
            for key, (v, low, high) in checks.items():
                if not _whole(v) or v < low or (high is not None and v > high):
                    allowed = f"a whole number from {low}" + ("" if high is None else f" to {high}")
                    raise DataError(f"slots[{i}].{key}: {brief(v)} is not {allowed}")

    def _reshape(self, states: list[dict[str, Any]]) -> None:
        """Re-partition every source after a change of world size (SourceQueue.reshape, per source)."""
        states = sorted(states, key=lambda s: s["rank"])
        old_world = states[0]["world_size"]
        if len(states) != old_world:
            raise DataError(f"stream state: got {len(states)} rank states for an old world size of {old_world}")
        for i, q in enumerate(self.queues):
            in_flight: dict[int, set[int]] = {}
            for s in states:
                for slot in s["slots"]:
                    if int(slot.get("source", 0)) == i and slot["doc"] >= 0 and not slot["done"]:
                        in_flight.setdefault(int(slot["epoch"]), set()).add(int(slot["doc"]))
            q.reshape([self._queue_states(s)[i] for s in states], in_flight)
        # The draw restarts even (each new rank keeps its own shares exact from here); the delivered
        # tokens of all old ranks go to new rank 0, so their sum over ranks (the metric) goes on.
        self.drawn = [0] * len(self.queues)
        self.source_tokens = [0] * len(self.queues)
        if self.mixture and self.rank == 0:
            self.source_tokens = [
                sum(int(self._queue_states(s)[i]["tokens"]) for s in states) for i in range(len(self.queues))
            ]
        self.batches = 0
        self.slots = [_Slot() for _ in range(self.B)]
        self._refresh_active()

    def close(self) -> None:
        """Stop reading ahead: documents not yet being read are dropped; one being read is finished first (a
        read in flight may still take streaming's lock file of its shard, which the trainer removes next:
        a read after that removal would make the file again, for good)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
