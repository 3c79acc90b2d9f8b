"""One rank's walk over one dataset: epoch order, the rank's block of it, cursor and re-partition.

Epoch e visits every training document once, in an order fixed by
(seed, e): shards in a random order, documents shuffled inside each shard.
Rank r of W takes the r-th contiguous block; ``SourceQueue`` walks it with
its own cursor. Used by data_pipeline/streams.py once per source (one for
``data.path``, one per entry of ``data.sources``); docs/streams.md.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.split import source_heldout_mask

# ----------------------------------------------------------------- ordering


def epoch_order(
    samples_per_shard: np.ndarray, train_mask: np.ndarray, seed: int, epoch: int, stream: int | None = None
) -> np.ndarray:
    """Training sample ids of one epoch: shards shuffled, samples shuffled within each shard.

    ``stream``: a mixture source's index (its own order); None for a single dataset.
    """
    rng = np.random.default_rng([seed, epoch] if stream is None else [seed, epoch, stream])
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


# ------------------------------------------------------------------ per-source queues


def check_partitions(label: str, n_train: int, world: int) -> None:
    """DataError naming ``label`` unless its ``n_train`` training documents give each of the ``world``
    partitions one: checked by each rank's queue, and by ``mnemo launch`` before any rank starts."""
    if n_train < world:
        raise DataError(  # world: the slot groups (train/slots.py), W ranks x A accumulation micro-steps
            f"{label}: {n_train} training documents, fewer than the {world} partitions it is split into "
            "(one per rank and gradient-accumulation micro-step: the global batch / train.batch_size)"
        )


class SourceQueue:
    """This rank's walk over one source: epoch order, its block, cursor, exclusions, prefetched documents.

    ``stream`` is None for a single dataset (data.path: the order of today) and
    the source's index in a mixture (each source gets its own seeded order).
    """

    def __init__(
        self,
        source: Any,  # a streams.DocumentSource
        *,
        rank: int,
        world: int,
        seed: int,
        val_fraction: float,
        label: str,
        stream: int | None = None,
        max_epochs: int = 0,
    ):
        self.source, self.rank, self.world, self.seed = source, rank, world, seed
        self.label, self.stream, self.max_epochs = label, stream, max_epochs
        self.train_mask = ~source_heldout_mask(source, val_fraction)
        check_partitions(label, int(self.train_mask.sum()), world)
        self.epoch, self.cursor = 0, 0
        self.excluded: dict[int, np.ndarray] = {}  # epoch -> sample ids finished before a reshape
        self._block_cache: tuple[int, np.ndarray] | None = None
        self.futures: OrderedDict[int, Future] = OrderedDict()

    def exhausted(self) -> bool:
        """max_epochs passes are done (a mixture source then drops out)."""
        return self.max_epochs > 0 and self.epoch >= self.max_epochs

    def has_next(self) -> bool:
        """Whether next_doc may give a document (nothing is taken). A pass before the last always may: every
        rank's block of a fresh epoch is non-empty (at least ``world`` training documents)."""
        if self.exhausted():
            return False
        if self.max_epochs == 0 or self.epoch + 1 < self.max_epochs:
            return True
        return self.cursor < len(self.block(self.epoch))

    def order(self, epoch: int) -> np.ndarray:
        return epoch_order(self.source.samples_per_shard, self.train_mask, self.seed, epoch, self.stream)

    def block(self, epoch: int) -> np.ndarray:
        if self._block_cache is None or self._block_cache[0] != epoch:
            order = self.order(epoch)
            if epoch in self.excluded:
                order = order[~np.isin(order, self.excluded[epoch])]
            self._block_cache = (epoch, rank_block(order, self.rank, self.world))
        return self._block_cache[1]

    def next_doc(self) -> tuple[int, int] | None:
        """(sample id, epoch) of the next document of this rank's queue; None once exhausted."""
        for _ in range(3):  # an epoch may leave this rank nothing after a reshape
            if self.exhausted():
                return None
            block = self.block(self.epoch)
            if self.cursor < len(block):
                doc = int(block[self.cursor])
                self.cursor += 1
                return doc, self.epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self.excluded = {e: v for e, v in self.excluded.items() if e >= self.epoch}
        raise DataError(f"{self.label}: this rank's partition is empty for three epochs in a row")

    def load(self, doc: int, pool: ThreadPoolExecutor | None, prefetch: int) -> dict[str, Any]:
        if pool is None:
            return self.source.get(doc)
        fut = self.futures.pop(doc, None)
        item = fut.result() if fut is not None else self.source.get(doc)
        # Start reading the next documents of the (deterministic) queue in background threads.
        if not self.exhausted():
            for d in self.block(self.epoch)[self.cursor : self.cursor + prefetch]:
                d = int(d)
                if d not in self.futures:
                    self.futures[d] = pool.submit(self.source.get, d)
            while len(self.futures) > 2 * prefetch:
                self.futures.popitem(last=False)
        return item

    def state(self) -> dict[str, Any]:
        return {
            "num_samples": self.source.num_samples,
            "train_only": int(getattr(self.source, "train_only", 0)),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "excluded": {int(e): np.asarray(v).copy() for e, v in self.excluded.items()},
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(st["epoch"]), int(st["cursor"])
        self.excluded = {int(e): np.asarray(v) for e, v in st["excluded"].items()}
        self._block_cache = None
        self.futures.clear()

    def reshape(self, olds: list[dict[str, Any]], in_flight: dict[int, set[int]]) -> None:
        """Re-partition after a change of world size: finished docs stay finished, in-flight ones restart.

        ``olds``: every old rank's queue state (rank order); ``in_flight``:
        epoch -> sample ids in an old slot and not finished.
        """
        old_world = len(olds)
        # An epoch's exclusions (from an earlier reshape) are the same on every old rank that holds them, but
        # a rank drops them once it moves past the epoch (next_doc): take them from any rank still holding
        # them, not from old rank 0 alone, or the old cursors index an order without them and finished
        # documents are queued again. No rank holds them only when all have passed the epoch, and then all
        # its blocks are consumed whatever the order.
        excluded: dict[int, np.ndarray] = {}
        for s in olds:
            for e, v in s["excluded"].items():
                e = int(e)
                excluded[e] = np.union1d(excluded[e], v).astype(np.int64) if e in excluded else np.asarray(v)
        first_epoch = min(min(int(s["epoch"]) for s in olds), min(in_flight) if in_flight else 1 << 62)
        last_epoch = max(int(s["epoch"]) for s in olds)
        new_excluded: dict[int, np.ndarray] = {}
        for e in range(first_epoch, last_epoch + 1):
            order = self.order(e)
            if e in excluded:
                order = order[~np.isin(order, excluded[e])]
            consumed = []
            for r, s in enumerate(olds):
                block = rank_block(order, r, old_world)
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
        self._block_cache = None
        self.futures.clear()
