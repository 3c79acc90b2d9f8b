"""The one reader of held-out (or training) corpus documents of an MDS dataset.

Which documents are held out is ``data_pipeline.split.heldout_mask`` (a hash
of the sample index; the same on every rank and in every run of a dataset).
Synthetic passkey documents (``data_pipeline.passkey.is_synthetic``) are
never corpus text: they are skipped, both where documents are scored and
where they serve as passkey filler.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.data_pipeline.passkey import is_synthetic
from mnemo.data_pipeline.split import heldout_mask
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
) -> list[np.ndarray]:
    """Corpus documents of ``source`` (anything with ``num_samples`` and ``get(i)``), int64 token arrays.

    heldout: the held-out documents (evaluation) or the others (training).
    order: the sample indices in reading order (default: index order).
    Synthetic passkey documents are skipped; each document is cut to
    ``max_doc_tokens``. Reading stops once there are ``max_docs`` documents
    (None = no limit) holding at least ``min_tokens`` tokens together (passkey
    filler wants variety even when few documents are scored). May be empty.
    """
    held = heldout_mask(source.num_samples, val_fraction)
    idx = np.arange(source.num_samples) if order is None else np.asarray(order)
    docs: list[np.ndarray] = []
    n_tokens = 0
    for i in idx[held[idx] == heldout]:
        item = source.get(int(i))
        if is_synthetic(item):
            continue
        docs.append(np.asarray(item["tokens"], dtype=np.int64)[:max_doc_tokens])
        n_tokens += docs[-1].size
        if max_docs is not None and len(docs) >= max_docs and n_tokens >= min_tokens:
            break
    return docs


def open_mds(data_dir: str) -> Any:
    """The MDSSource of a local ``--data`` dir, or EvalError naming what is missing."""
    from streaming.base.util import clean_stale_shared_memory

    from mnemo.data_pipeline.streams import MDSSource

    path = Path(data_dir)
    if not path.is_dir():
        raise EvalError(f"--data: no such directory: {path}")
    if not (path / "index.json").is_file():
        raise EvalError(f"--data: {path} holds no MDS shards (index.json missing); run `mnemo prepare`")
    clean_stale_shared_memory()
    try:
        return MDSSource(str(path))
    except ValueError as e:  # streaming refuses a local dir that a live dataset already uses
        raise EvalError(f"--data: cannot open {path}: {str(e).splitlines()[0]}") from None


def read_heldout_docs(
    data_dir: str, val_fraction: float, max_docs: int | None = None, min_tokens: int = 0
) -> list[np.ndarray]:
    """Held-out corpus documents of an MDS dir, in index order (``read_docs``); EvalError when there are none."""
    src = open_mds(data_dir)
    docs = read_docs(src, val_fraction, max_docs=max_docs, min_tokens=min_tokens)
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
    if not manifest.is_file():
        return
    have = getattr(tokenizer, "sha256", None)
    want = other_tokenizer(read_json_file(str(manifest), "the dataset's manifest"), have)
    if want:
        raise EvalError(f"--data: {manifest} was tokenized with tokenizer {want[:12]}, the checkpoint uses {have[:12]}")
