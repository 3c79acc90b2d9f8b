"""The held-out split: a fixed hash of the sample index.

Training streams skip held-out documents and evaluation reads only them. The
choice depends on nothing but the index, the fraction and the dataset's
count of training-only samples, so it is the same for every seed, world size
and resume.

Training-only samples: the passkey documents of ``mnemo prepare
--passkey-docs`` are filled with the text of the first corpus documents
(manifest.json ``passkey.filler_documents`` says how many), and those
documents are trained on through them whatever ``data.val_fraction`` a run
picks later. So they are never held out: the held-out documents are drawn
from the others. A dataset without passkey documents has none (its split is
the plain hash); one prepared before the field existed has none either, and
a warning says its filler may hold held-out text.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import DataError, brief

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
# manifest.json: passkey.<FILLER_KEY> is the number of leading samples the passkey filler was drawn from.
FILLER_KEY = "filler_documents"
_warned: set[str] = set()  # datasets already warned about (one warning per dataset and process)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def heldout_mask(num_samples: int, val_fraction: float, train_only: int = 0) -> np.ndarray:
    """Boolean [num_samples]: True where sample i is held out for evaluation.

    The first ``train_only`` samples are never held out (see the module
    docstring); with 0 the split is the plain hash of the index. At least one
    document is held out when val_fraction > 0 and the dataset has more than
    one document, one of the others when there are training-only samples, so
    evaluation always has something to read.
    """
    if val_fraction <= 0 or num_samples == 0:
        return np.zeros(num_samples, dtype=bool)
    with np.errstate(over="ignore"):
        h = _splitmix64(np.arange(num_samples, dtype=np.uint64))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    mask = u < val_fraction
    first = min(max(int(train_only), 0), num_samples)
    mask[:first] = False
    if not mask.any() and num_samples > 1 and first < num_samples:
        mask[first + int(np.argmin(u[first:]))] = True
    return mask


def source_heldout_mask(source: Any, val_fraction: float) -> np.ndarray:
    """``heldout_mask`` of a document source (``num_samples``; ``train_only``, default 0): the one split that
    training streams, in-run evaluation, ``mnemo eval`` and the passkey episodes' filler all use."""
    return heldout_mask(source.num_samples, val_fraction, getattr(source, "train_only", 0))


def filler_documents(manifest: dict, where: str) -> int | None:
    """The leading samples a dataset's passkey documents drew their filler from (training-only samples).

    0 without passkey documents; None when the manifest has passkey documents
    but predates ``passkey.filler_documents`` (the filler is unknown). A
    malformed value is a DataError naming ``where`` (the manifest's path).
    """
    passkey = manifest.get("passkey")
    if not passkey:
        return 0
    if not isinstance(passkey, dict):
        raise DataError(f"{where}: passkey is {brief(passkey)}, not an object or null")
    if FILLER_KEY not in passkey:
        return None
    n = passkey[FILLER_KEY]
    corpus = manifest.get("num_corpus_documents")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (isinstance(corpus, int) and n > corpus):
        raise DataError(
            f"{where}: passkey.{FILLER_KEY} is {brief(n)}, not a whole number of corpus documents "
            f"(0..num_corpus_documents {brief(corpus)})"
        )
    return n


def train_only_from(manifest: dict | None, where: str) -> int:
    """The training-only samples of a dataset whose manifest is ``manifest`` (None: it has none, 0).

    A dataset with passkey documents prepared before their filler was recorded
    keeps the plain split, with one warning per process that its held-out
    documents may be in the passkey filler.
    """
    if manifest is None:
        return 0
    n = filler_documents(manifest, where)
    if n is None:
        if where not in _warned:
            _warned.add(where)
            log.warning(
                "%s: its passkey documents were prepared by an older mnemo that did not record which documents "
                "fed their filler (the first corpus tokens): held-out documents may be trained on through them; "
                "prepare the dataset again (mnemo prepare ... --overwrite) to keep them apart",
                where,
            )
        return 0
    return n
