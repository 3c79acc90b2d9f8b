"""Weighted multi-source mixtures (``data.sources``): which source the next document comes from.

Vocabulary, after mosaicml-streaming's: a mixture is a list of *streams*
(here ``WeightedSource``), each with a ``weight`` (streaming's
``proportion``: the share of training TOKENS it should supply) and an
optional ``max_epochs`` (streaming's ``repeat`` as a limit: how many passes
over the source are allowed; 0 = no limit).

The choice rule is deterministic token-deficit round robin: the next
document comes from the active source furthest behind its share, i.e. the
one with the smallest ``drawn_tokens / weight`` (ties: the lower index).
Each rank keeps its own counters, so every rank's realized token share stays
within one document of its weights at every point, and the draw state is a
few integers (exact resume: it is part of the streams' state_dict). A source
whose ``max_epochs`` are used up drops out; the remaining weights then share
the tokens in their own proportions (renormalised). Weight 0 never draws.
"""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Sequence


from mnemo.data_pipeline.errors import DataError, brief


@dataclass
class WeightedSource:
    """One source of a mixture: its documents, its weight (token proportion), name, and epoch limit."""

    source: Any  # a streams.DocumentSource
    weight: float = 1.0
    name: str = ""
    max_epochs: int = 0  # 0 = no limit (streaming's repeat, as a limit)


def choose(drawn: Sequence[int], weights: Sequence[float], active: Sequence[int]) -> int:
    """Index of the source that supplies the next document: the active one furthest behind its token share.

    ``drawn[i]``: tokens this rank has drawn from source i; ``weights[i]`` > 0
    for every i in ``active``, the sources that may draw (not exhausted), in
    index order. -1 when none is active. Ties go to the lower index.
    """
    best, best_key = -1, 0.0
    for i in active:  # a plain loop: this runs once per document
        key = drawn[i] / weights[i]
        if best < 0 or key < best_key:
            best, best_key = i, key
    return best


def shares(weights: Sequence[float], key: str = "data.sources") -> list[float]:
    """The weights as shares of 1: what the choice divides by and the table shows. DataError naming ``key``
    unless each is finite and >= 0, one is > 0, and none > 0 gets a share of 0.

    The one check of the weights of training (data.sources) and of ``mnemo data inspect --weights``. Scaled
    by the largest first: ``drawn / weight`` overflowed to inf for tiny weights (1e-320, 1e-320 gave the
    shares 0.992 / 0.008, not 0.5 / 0.5), and the sum of 1e308, 1e308 is inf.
    """
    w = [float(x) for x in weights]
    if not w:
        raise DataError(f"{key}: no weights (a mixture needs at least one source)")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise DataError(f"{key}: the weights {brief(w)} must be finite numbers >= 0")
    top = max(w)
    if top <= 0:
        raise DataError(f"{key}: the weights sum to 0 ({brief(w)}); one must be > 0")
    scaled = [x / top for x in w]  # in [0, 1]: their sum is at most len(w)
    total = sum(scaled)
    out = [x / total for x in scaled]
    for i, (x, share) in enumerate(zip(w, out)):
        if x > 0 and share == 0:  # a source that would never draw though its weight says it should
            raise DataError(
                f"{key}: weight {i} ({x!r}) is too small beside {top!r} to get a share of the tokens; "
                "make it 0 or larger"
            )
    return out


def default_name(path: str) -> str:
    """The name a source gets when data.sources[i].name is empty: the last part of its path, "" when it has none.

    The path is normalised first (``d_en/.`` is named ``d_en``): a last part of ``.`` or ``..`` would be the
    source's cache folder ``<cache_dir>/..`` (outside this node's folder) and a metric ``data/./tokens``
    that MLflow refuses, with every other metric of its batch. ``.``, ``..`` and ``/`` leave no name ("").
    """
    last = posixpath.basename(posixpath.normpath(path)) if path else ""
    return "" if last in (".", "..") else last


# A name is a folder (at most 255 bytes on common filesystems: a longer one was OSError "File name too long" in
# the rank) and part of metric names (data/<name>/tokens, data/<name>/share: MLflow refuses a key of over 250
# characters, with every metric of its batch). 200 bytes of UTF-8 (200 ASCII characters, 100 Cyrillic) keeps
# the folder within 255 and those metric names within 212 characters.
MAX_NAME_BYTES = 200


def name_problem(name: str) -> str:
    """Why ``name`` cannot name a source ("" when it can): it is a folder name (``<cache_dir>/<name>``) and
    part of metric names (``data/<name>/tokens``)."""
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is not a name of its own ('.' and '..' name folders)"
    bad = next((c for c in name if not (c.isalnum() or c in "_-.")), None)
    if bad is not None:
        # Named as an escape: a combining mark (a name in decomposed Unicode, as macOS writes file names) or a
        # space is invisible in the quoted name.
        return f"may hold only letters, digits, '_', '-', '.', not {ascii(bad)}"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long (UTF-8); at most {MAX_NAME_BYTES} (it is a folder name and part of metric names)"
    return ""


def source_names(paths: Sequence[str], names: Sequence[str]) -> list[str]:
    """Each source's name (given or the last part of its path)."""
    return [n or default_name(p) for p, n in zip(paths, names)]


def check_same_sources(old: Sequence[str], new: Sequence[str]) -> None:
    """DataError unless a checkpoint's sources (their names, in order) are this run's: a resume matches the
    sources by position (data.sources[i] goes on from the checkpoint's source i)."""
    if len(old) != len(new):
        raise DataError(f"data.sources: the checkpoint has {len(old)} sources, this run {len(new)}")
    for i, (was, now) in enumerate(zip(old, new)):
        if was != now:
            raise DataError(
                f"data.sources[{i}]: the checkpoint's source {i} is {was!r}, this run's {now!r} "
                "(keep the order and names of data.sources when resuming)"
            )


def tokenizer_sha256(path: str) -> str | None:
    """sha256 of the tokenizer a local dataset was made with (its manifest, else its tokenizer.model); None: unknown."""
    import json

    from mnemo.data_pipeline.files import MAX_JSON_BYTES, read_bounded
    from mnemo.data_pipeline.paths import is_remote, local_path
    from mnemo.data_pipeline.tokenizer import file_sha256

    if is_remote(path):
        return None  # known once its manifest is fetched: open_sources (streams.py) passes it to check_same_tokenizer
    local = local_path(path)
    try:  # a FIFO there is refused, never waited on
        sha = json.loads(read_bounded(os.path.join(local, "manifest.json"), MAX_JSON_BYTES)).get("tokenizer_sha256")
        if sha:
            return str(sha)
    except (OSError, ValueError, AttributeError, RecursionError):
        pass
    tok = os.path.join(local, "tokenizer.model")
    return file_sha256(tok) if os.path.isfile(tok) else None


def check_same_tokenizer(paths: Sequence[str], known: Sequence[str | None] = ()) -> None:
    """DataError naming both datasets when two of ``paths`` were made with different tokenizers. ``known``: the
    sha256 of each path's tokenizer where the caller has it (a remote dataset's, from its fetched manifest);
    a None there, or a path past its end, is looked up (``tokenizer_sha256``). A URL is named without its
    credentials."""
    from mnemo.data_pipeline.redact import redact_uri

    first: tuple[str, str] | None = None
    for i, p in enumerate(paths):
        sha = (known[i] if i < len(known) else None) or tokenizer_sha256(p)
        if sha is None:
            continue
        if first is None:
            first = (redact_uri(p), sha)
        elif sha != first[1]:
            raise DataError(
                f"{first[0]} and {redact_uri(p)} were made with different tokenizers (sha256 {first[1][:12]} != "
                f"{sha[:12]}); a mixture needs one tokenizer"
            )


# ----------------------------------------------------------------- planning (mnemo data inspect)


def expected_epochs(sizes: Sequence[int], weights: Sequence[float], budget: int) -> list[float]:
    """Passes over each source that a budget of ``budget`` document tokens takes at these weights."""
    share = shares(weights, "--weights")
    return [float(budget * s / n) if n else float("inf") for s, n in zip(share, sizes)]


def format_mixture(reports: Sequence[dict], weights: Sequence[float], budget: int) -> str:
    """The mixture table of ``mnemo data inspect DS [DS ...] --tokens N``: sizes, shares, expected epochs."""
    sizes = [int(r["tokens"]) for r in reports]
    epochs = expected_epochs(sizes, weights, budget) if budget else [float("nan")] * len(sizes)
    share = shares(weights, "--weights")
    lines = [f"mixture of {len(reports)} sources" + (f", budget {budget:,} tokens:" if budget else ":")]
    lines.append(f"  {'source':<24} {'documents':>12} {'tokens':>15} {'weight':>8} {'share':>7} {'epochs':>9}")
    for r, w, p, e in zip(reports, weights, share, epochs):
        name = default_name(str(r["data_dir"])) or str(r["data_dir"])
        lines.append(
            f"  {name:<24} {r['documents']:>12,} {r['tokens']:>15,} {w:>8g} {p:>7.1%} "
            + (f"{e:>9.2f}" if budget else f"{'-':>9}")
        )
    return "\n".join(lines)
