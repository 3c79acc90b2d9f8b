"""Document streams for recurrent training.

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
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.paths import is_remote, local_path
from mnemo.data_pipeline.split import heldout_mask

STATE_VERSION = 1


class DocumentSource(Protocol):
    """Random access to the documents of a dataset."""

    num_samples: int
    samples_per_shard: np.ndarray  # [num_shards] int

    def get(self, idx: int) -> dict[str, Any]:
        """{'tokens': 1-D int array (EOS last), 'answer_start': int, 'answer_len': int}"""


class ArraySource:
    """In-memory documents (tests, synthetic data)."""

    def __init__(
        self, docs: Sequence[np.ndarray], shard_size: int = 0, answers: Sequence[tuple[int, int]] | None = None
    ):
        self.docs = [np.asarray(d) for d in docs]
        self.num_samples = len(self.docs)
        n, s = self.num_samples, shard_size or max(1, self.num_samples)
        self.samples_per_shard = np.array([min(s, n - i) for i in range(0, n, s)] or [0], dtype=np.int64)
        self.answers = list(answers) if answers is not None else None

    def get(self, idx: int) -> dict[str, Any]:
        a = self.answers[idx] if self.answers else (-1, 0)
        return {"tokens": self.docs[idx], "answer_start": a[0], "answer_len": a[1]}


class MDSSource:
    """Documents of an MDS dataset written by ``mnemo prepare``."""

    def __init__(self, path: str, cache_dir: str | None = None):
        from streaming import StreamingDataset

        remote = path if is_remote(path) else None
        local = cache_dir if remote else local_path(path)
        try:
            self.ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
        except FileNotFoundError as e:
            raise DataError(f"data.path: cannot open MDS dataset at {path}: {e}") from None
        self.num_samples = int(self.ds.num_samples)
        self.samples_per_shard = np.asarray(self.ds.samples_per_shard, dtype=np.int64)
        self.has_answers = "answer_start" in getattr(self.ds.shards[0], "column_names", []) if self.ds.shards else False

    def get(self, idx: int) -> dict[str, Any]:
        s = self.ds.get_item(int(idx))
        return {
            "tokens": s["tokens"],
            "answer_start": int(s.get("answer_start", -1)),
            "answer_len": int(s.get("answer_len", 0)),
            "source": s.get("source", ""),
        }


@dataclass
class SegmentBatch:
    tokens: torch.Tensor  # [B, T+1] int64: inputs tokens[:, :-1], targets tokens[:, 1:]
    mask: torch.Tensor  # [B, T] bool: target is a real token (False = padding)
    weight: torch.Tensor  # [B, T] float32: per-target loss weight (0 on padding)
    reset: torch.Tensor  # [B] bool: this slot starts a new document at this segment
    doc_ids: torch.Tensor  # [B] int64: sample index of each slot's document (-1 = none)
    positions: torch.Tensor  # [B] int64: token offset of the segment inside its document
    epochs: torch.Tensor  # [B] int64: epoch of each slot's document


# ----------------------------------------------------------------- ordering


def epoch_order(samples_per_shard: np.ndarray, train_mask: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Training sample ids of one epoch: shards shuffled, samples shuffled within each shard."""
    rng = np.random.default_rng([seed, epoch])
    offsets = np.concatenate(([0], np.cumsum(samples_per_shard)))
    parts = []
    for shard in rng.permutation(len(samples_per_shard)):
        ids = np.arange(offsets[shard], offsets[shard + 1], dtype=np.int64)
        ids = ids[train_mask[ids]]
        parts.append(ids[rng.permutation(len(ids))])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def rank_block(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    n = len(order)
    return order[rank * n // world : (rank + 1) * n // world]


# ------------------------------------------------------------------ streams


class _Slot:
    __slots__ = ("doc", "epoch", "offset", "tokens", "answer")

    def __init__(self):
        self.doc, self.epoch, self.offset = -1, -1, 0
        self.tokens: np.ndarray | None = None
        self.answer = (-1, 0)

    def done(self) -> bool:
        # A document of L tokens has L-1 targets; segments start at 0, T, 2T...
        return self.tokens is None or self.offset >= len(self.tokens) - 1


class DocumentStreams:
    """B stream slots over this rank's partition; an infinite iterator of SegmentBatch."""

    def __init__(
        self,
        source: DocumentSource,
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
    ):
        self.source = source
        self.B, self.T = batch_size, segment_len
        self.rank, self.world = rank, world_size
        self.seed, self.val_fraction = seed, val_fraction
        self.pad_id, self.answer_weight = pad_id, answer_weight
        self.answer_context_weight = answer_context_weight
        self.train_mask = ~heldout_mask(source.num_samples, val_fraction)
        n_train = int(self.train_mask.sum())
        if n_train < world_size:
            raise DataError(f"data.path: {n_train} training documents, fewer than the {world_size} ranks")
        self.epoch, self.cursor = 0, 0
        self.excluded: dict[int, np.ndarray] = {}  # epoch -> sample ids finished before a reshape
        self.slots = [_Slot() for _ in range(self.B)]
        self._block_cache: tuple[int, np.ndarray] | None = None
        self.batches = 0
        # Prefetch upcoming documents of this rank's (deterministic) queue.
        self._pool = ThreadPoolExecutor(num_workers, thread_name_prefix="mnemo-prefetch") if num_workers > 0 else None
        self._prefetch = prefetch
        self._futures: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- queue
    def _block(self, epoch: int) -> np.ndarray:
        if self._block_cache is None or self._block_cache[0] != epoch:
            order = epoch_order(self.source.samples_per_shard, self.train_mask, self.seed, epoch)
            if epoch in self.excluded:
                order = order[~np.isin(order, self.excluded[epoch])]
            self._block_cache = (epoch, rank_block(order, self.rank, self.world))
        return self._block_cache[1]

    def _next_doc(self) -> tuple[int, int]:
        """(sample id, epoch) of the next document of this rank's queue."""
        for _ in range(3):  # an epoch may leave this rank nothing after a reshape
            block = self._block(self.epoch)
            if self.cursor < len(block):
                doc = int(block[self.cursor])
                self.cursor += 1
                return doc, self.epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self.excluded = {e: v for e, v in self.excluded.items() if e >= self.epoch}
        raise DataError("data.path: this rank's partition is empty for three epochs in a row")

    def _load(self, doc: int) -> dict[str, Any]:
        if self._pool is None:
            return self.source.get(doc)
        fut = self._futures.pop(doc, None)
        item = fut.result() if fut is not None else self.source.get(doc)
        self._schedule_prefetch()
        return item

    def _schedule_prefetch(self) -> None:
        """Start reading the next documents of the queue in background threads."""
        epoch, cursor = self.epoch, self.cursor
        block = self._block(epoch)
        upcoming = block[cursor : cursor + self._prefetch]
        for doc in upcoming:
            doc = int(doc)
            if doc not in self._futures:
                self._futures[doc] = self._pool.submit(self.source.get, doc)
        while len(self._futures) > 2 * self._prefetch:
            self._futures.popitem(last=False)

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
        for b, slot in enumerate(self.slots):
            while slot.done():
                doc, epoch = self._next_doc()
                item = self._load(doc)
                slot.doc, slot.epoch, slot.offset = doc, epoch, 0
                slot.tokens = np.asarray(item["tokens"])
                slot.answer = (int(item.get("answer_start", -1)), int(item.get("answer_len", 0)))
                reset[b] = True
            o = slot.offset
            chunk = slot.tokens[o : o + T + 1]
            tokens[b, : len(chunk)] = chunk
            n_targets = len(chunk) - 1
            weight[b, :n_targets] = 1.0
            real[b, :n_targets] = True
            a0, alen = slot.answer
            if alen > 0 and (self.answer_weight != 1.0 or self.answer_context_weight != 1.0):
                # target j (0-based in the segment) is token o + j + 1 of the document
                tgt = np.arange(o + 1, o + 1 + n_targets)
                is_answer = (tgt >= a0) & (tgt < a0 + alen)
                weight[b, :n_targets] = np.where(is_answer, self.answer_weight, self.answer_context_weight)
            doc_ids[b], positions[b], epochs[b] = slot.doc, o, slot.epoch
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
        )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world,
            "batch_size": self.B,
            "segment_len": self.T,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "num_samples": self.source.num_samples,
            "epoch": self.epoch,
            "cursor": self.cursor,
            "excluded": {int(e): np.asarray(v).copy() for e, v in self.excluded.items()},
            "slots": [{"doc": s.doc, "epoch": s.epoch, "offset": s.offset, "done": s.done()} for s in self.slots],
            "batches": self.batches,
        }

    def _check_compatible(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise DataError(f"stream state version {sd.get('version')} is not {STATE_VERSION}")
        if sd["num_samples"] != self.source.num_samples:
            raise DataError(
                f"data.path: the checkpoint was made on a dataset of {sd['num_samples']} documents, "
                f"this one has {self.source.num_samples}"
            )
        for key, mine in (("seed", self.seed), ("val_fraction", self.val_fraction)):
            if sd[key] != mine:
                raise DataError(f"stream state: {key} {sd[key]} differs from this run's {mine}")

    def same_shape(self, state: dict[str, Any]) -> bool:
        """Was ``state`` saved by a loader of this world size, batch size and segment length?"""
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
        self.epoch, self.cursor = int(mine["epoch"]), int(mine["cursor"])
        self.excluded = {int(e): np.asarray(v) for e, v in mine["excluded"].items()}
        self.batches = int(mine["batches"])
        self._block_cache = None
        for slot, s in zip(self.slots, mine["slots"]):
            slot.doc, slot.epoch, slot.offset = int(s["doc"]), int(s["epoch"]), int(s["offset"])
            if slot.doc >= 0:
                item = self.source.get(slot.doc)
                slot.tokens = np.asarray(item["tokens"])
                slot.answer = (int(item.get("answer_start", -1)), int(item.get("answer_len", 0)))
            else:
                slot.tokens = None
        self._futures.clear()
        return True

    def _reshape(self, states: list[dict[str, Any]]) -> None:
        """Re-partition after a change of world size: finished docs stay finished, in-flight ones restart."""
        states = sorted(states, key=lambda s: s["rank"])
        old_world = states[0]["world_size"]
        if len(states) != old_world:
            raise DataError(f"stream state: got {len(states)} rank states for an old world size of {old_world}")
        excluded = {int(e): np.asarray(v) for e, v in states[0]["excluded"].items()}
        in_flight: dict[int, set[int]] = {}
        for s in states:
            for slot in s["slots"]:
                if slot["doc"] >= 0 and not slot["done"]:
                    in_flight.setdefault(int(slot["epoch"]), set()).add(int(slot["doc"]))
        first_epoch = min(min(int(s["epoch"]) for s in states), min(in_flight) if in_flight else 1 << 62)
        last_epoch = max(int(s["epoch"]) for s in states)
        new_excluded: dict[int, np.ndarray] = {}
        for e in range(first_epoch, last_epoch + 1):
            order = epoch_order(self.source.samples_per_shard, self.train_mask, self.seed, e)
            if e in excluded:
                order = order[~np.isin(order, excluded[e])]
            consumed = []
            for s in states:
                block = rank_block(order, int(s["rank"]), old_world)
                if int(s["epoch"]) > e:
                    consumed.append(block)
                elif int(s["epoch"]) == e:
                    consumed.append(block[: int(s["cursor"])])
            done = np.concatenate(consumed) if consumed else np.zeros(0, dtype=np.int64)
            if e in in_flight:
                done = done[~np.isin(done, np.fromiter(in_flight[e], dtype=np.int64))]
            prev = excluded.get(e, np.zeros(0, dtype=np.int64))
            new_excluded[e] = np.union1d(prev, done).astype(np.int64)
        self.epoch, self.cursor = first_epoch, 0
        self.excluded = new_excluded
        self.batches = 0
        self._block_cache = None
        self.slots = [_Slot() for _ in range(self.B)]
        self._futures.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
