"""The one reader of held-out (or training) corpus documents of an MDS dataset.

Which documents are held out is ``data_pipeline.split.source_heldout_mask`` (a
hash of the sample index, never the documents the dataset's passkey filler was
drawn from; the same on every rank and in every run of a dataset).
Synthetic passkey documents (``data_pipeline.passkey.is_synthetic``) are
never corpus text: they are skipped, both where documents are scored and
where they serve as passkey filler.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import DataError, first_line
from mnemo.data_pipeline.passkey import is_synthetic
from mnemo.data_pipeline.paths import not_a_dataset_dir
from mnemo.data_pipeline.split import source_heldout_mask
from mnemo.evaluation.errors import EvalError

# Held-out tokens read for passkey filler at least (more documents than --max-docs if need be).
FILLER_TOKENS = 1 << 20


def read_docs(
    source: Any,
    val_fraction: float,
    *,
    heldout: bool = True,
    order: Sequence[int] | np.ndarray | None = None,
    max_docs: int | None = None,
    max_doc_tokens: int | None = None,
    min_tokens: int = 0,
    vocab_size: int = 0,
) -> list[np.ndarray]:
    """Corpus documents of ``source`` (anything with ``num_samples`` and ``get(i)``), int64 token arrays.

    heldout: the held-out documents (evaluation) or the others (training).
    order: the sample indices in reading order (default: index order).
    Synthetic passkey documents are skipped; each document is cut to
    ``max_doc_tokens``. Reading stops once there are ``max_docs`` documents
    (None = no limit) holding at least ``min_tokens`` tokens together (passkey
    filler wants variety even when few documents are scored). May be empty.
    vocab_size > 0: a document with a token id outside [0, vocab_size) is a DataError naming the shard, the
    sample and the id (streams.check_token_ids), not the model's IndexError.
    """
    from mnemo.data_pipeline.streams import check_token_ids

    held = source_heldout_mask(source, val_fraction)
    idx = np.arange(source.num_samples) if order is None else np.asarray(order)
    docs: list[np.ndarray] = []
    n_tokens = 0
    for i in idx[held[idx] == heldout]:
        # Tested before reading the next one: with max_docs 0 (and no min_tokens) none is read, where testing
        # after the append returned one (an in-run eval with eval.max_docs 0 scored filler for a NaN loss).
        if max_docs is not None and len(docs) >= max_docs and n_tokens >= min_tokens:
            break
        item = source.get(int(i))
        if is_synthetic(item):
            continue
        tokens = np.asarray(item["tokens"], dtype=np.int64)
        check_token_ids(f"{getattr(source, 'data_dir', '')}: ", source, int(i), tokens, vocab_size)
        docs.append(tokens[:max_doc_tokens])
        n_tokens += docs[-1].size
    return docs


def filler_docs(docs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The passkey and task filler of held-out documents (in reading order): the first ones holding
    FILLER_TOKENS tokens together, all of them when they hold fewer.

    Not all the documents given: those are read up to max(--max-docs, FILLER_TOKENS' worth), so a filler of
    all of them grew with --max-docs, and two runs evaluated with different eval.max_docs were scored on
    different documents for the same (seed, D, n_keys). The first ones covering FILLER_TOKENS are the same
    whatever --max-docs, as ``read_docs`` with ``min_tokens=FILLER_TOKENS`` reads them at least.
    """
    out: list[np.ndarray] = []
    n_tokens = 0
    for d in docs:
        if n_tokens >= FILLER_TOKENS:
            break
        out.append(d)
        n_tokens += len(d)
    return out


class LocalMDS:
    """Read-only random access to the samples of a local MDS dir (a ``streams.DocumentSource``), no shared memory.

    Evaluation reads a local ``--data`` dir, often while another evaluation or a
    training run reads the same one. streaming's StreamingDataset registers
    machine-wide shared memory under the first free prefix (``/000000_locals``,
    ...), which two processes starting at once both pick, and
    ``clean_stale_shared_memory()`` unlinks every process's blocks, live ones
    too; it also writes decompressed shards into the dir. This reader keeps
    nothing outside the process: a shard is read, checked and decoded in
    memory by ``verify.iter_shard_samples`` (the one MDS decoder of the data
    pipeline) when a sample of it is first asked for. One shard is held at a
    time, so reading in index order (as ``read_docs`` does by default) reads
    each shard once. Training keeps streams.MDSSource (remote data, caching).
    """

    def __init__(self, data_dir: str):
        from mnemo.data_pipeline.verify import dataset_train_only, read_json_file

        self.data_dir = data_dir
        try:
            self.shards = list(read_json_file(os.path.join(data_dir, "index.json"), "the shard index")["shards"])
            self.samples_per_shard = np.array([int(s["samples"]) for s in self.shards], dtype=np.int64)
        except (DataError, KeyError, TypeError, ValueError) as e:
            raise self._error(e) from None
        self.num_samples = int(self.samples_per_shard.sum())
        try:
            self.train_only = dataset_train_only(data_dir)  # the passkey filler's documents: never held out
        except DataError as e:
            raise self._error(e) from None
        self._ends = np.cumsum(self.samples_per_shard)  # [num_shards]: one past each shard's last sample index
        self._held: tuple[int, list[dict[str, Any]]] = (-1, [])  # (shard, its decoded samples)

    def _error(self, e: Exception) -> EvalError:
        msg = first_line(e)
        return EvalError(
            f"--data: cannot read {self.data_dir}: {msg}; check it with `mnemo data verify {self.data_dir}`"
        )

    def get(self, idx: int) -> dict[str, Any]:
        """Sample ``idx`` as written by ``mnemo prepare`` (tokens, source, answer_start, answer_len, doc_id)."""
        from mnemo.data_pipeline.verify import iter_shard_samples

        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} of {self.num_samples}")
        shard = int(np.searchsorted(self._ends, idx, side="right"))
        if self._held[0] != shard:
            try:
                samples = [s for _, _, s in iter_shard_samples(self.data_dir, {"shards": [self.shards[shard]]})]
            except (DataError, KeyError, TypeError, ValueError) as e:
                raise self._error(e) from None
            self._held = (shard, samples)
        return self._held[1][idx - int(self._ends[shard] - self.samples_per_shard[shard])]


def open_mds(data_dir: str) -> LocalMDS:
    """The samples of a local ``--data`` dir (``LocalMDS``), or EvalError naming what is missing."""
    path = Path(data_dir)
    why = not_a_dataset_dir(path)
    if why:
        raise EvalError(f"--data: {why}")
    return LocalMDS(str(path))


def read_heldout_docs(
    data_dir: str, val_fraction: float, max_docs: int | None = None, min_tokens: int = 0, vocab_size: int = 0
) -> list[np.ndarray]:
    """Held-out corpus documents of an MDS dir, in index order (``read_docs``, which checks their token ids
    against ``vocab_size``); EvalError when there are none or one is outside the vocabulary."""
    src = open_mds(data_dir)
    try:
        docs = read_docs(src, val_fraction, max_docs=max_docs, min_tokens=min_tokens, vocab_size=vocab_size)
    except DataError as e:
        raise EvalError(f"--data: {first_line(e)}") from None
    if not docs:
        raise EvalError(
            f"--data: {Path(data_dir)} has no held-out corpus documents (data.val_fraction={val_fraction} "
            f"of {src.num_samples} samples)"
        )
    return docs


def check_data_tokenizer(data_dir: str, tokenizer: Any) -> None:
    """EvalError when the dataset's manifest names another tokenizer than the checkpoint's."""
    from mnemo.data_pipeline.verify import other_tokenizer, read_json_file

    manifest = Path(data_dir) / "manifest.json"
    if not os.path.lexists(manifest):  # a manifest that is no regular file is read_json_file's one-line error
        return
    have = getattr(tokenizer, "sha256", None)
    want = other_tokenizer(read_json_file(str(manifest), "the dataset's manifest"), have)
    if want:
        raise EvalError(f"--data: {manifest} was tokenized with tokenizer {want[:12]}, the checkpoint uses {have[:12]}")
