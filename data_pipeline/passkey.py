"""Synthetic passkey documents: a fact hidden in filler, asked for D segments later.

One sample is a document of (distance + 1) segments of ``segment_len`` tokens
followed by EOS. A sentence "The pass key is 71432. Remember it." sits in
segment 0 at the requested depth (start, middle or end of that segment); the
last segment (index ``distance``) ends with "What is the pass key? The pass key
is 71432", so that the answer digits are the last tokens before EOS. Everything
else is filler: slices of real corpus tokens taken at random offsets (they may
contain digits, which act as distractors).

The document is built by concatenating the token ids of separately encoded
pieces, so the key sentence tokenizes inside the document exactly as it does
alone, and the answer span is exactly the tokens of the key's digits. The same
function feeds `mnemo prepare --passkey-docs N` (training data) and
`mnemo eval` (fresh held-out samples), so training and evaluation share one
format. Its building blocks (filler_stream, take_filler, encode_piece,
encode_value, count_run, filler_mentions, depth_fraction) also build the long-context tasks of
``mnemo.data_pipeline.tasks``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mnemo.data_pipeline.errors import DataError

# Pieces of text; each is encoded on its own. The surrounding spaces separate
# the sentences from filler that may end or start mid-word.
KEY_PREFIX = " The pass key is "
KEY_SUFFIX = ". Remember it. "
QUESTION = " What is the pass key? The pass key is "

DEPTHS: dict[str, float] = {"start": 0.0, "middle": 0.5, "end": 1.0}
KEY_DIGITS = 5
# The multi-key variant's doors are numbered 1..MULTIKEY_MAX, one per fact: at most that many facts.
MULTIKEY_MAX = 99


class RoundTripError(DataError):
    """The tokenizer does not give a piece of text back (a normalizing or lowercasing one): no segment length
    or distance helps, so callers give other advice than for a document that does not fit."""


class PieceTokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def is_synthetic(item: dict[str, Any]) -> bool:
    """A synthetic passkey document of an MDS dataset (its ``source`` says so, or it has an answer span):
    not corpus text, so neither scored as held-out text nor used as passkey filler."""
    return item.get("source") == "passkey" or int(item.get("answer_len", 0) or 0) > 0


def depth_fraction(depth: str | float) -> float:
    """'start' | 'middle' | 'end' or a fraction in [0, 1] -> fraction of the free room."""
    if isinstance(depth, str):
        if depth not in DEPTHS:
            raise DataError(f"passkey depth {depth!r} is not one of {', '.join(DEPTHS)} or a number in [0, 1]")
        return DEPTHS[depth]
    f = float(depth)
    if not 0.0 <= f <= 1.0:
        raise DataError(f"passkey depth {depth!r} is not in [0, 1]")
    return f


def filler_stream(filler: Any) -> np.ndarray:
    """One int64 stream of filler tokens from a 1-D array or a list of documents.

    Pass one concatenated array when drawing many samples: a list is
    concatenated again on every call.
    """
    if isinstance(filler, np.ndarray) and filler.ndim == 1:
        arr = filler
    elif isinstance(filler, Sequence) and len(filler) > 0 and not np.isscalar(filler[0]):
        arr = np.concatenate([np.asarray(d).reshape(-1) for d in filler])
    else:
        arr = np.asarray(filler).reshape(-1)
    if arr.size == 0:
        raise DataError("passkey filler: no filler tokens (the corpus documents given are empty)")
    return arr


def take_filler(stream: np.ndarray, n: int, rng: np.random.Generator, eos_id: int | None) -> np.ndarray:
    """n tokens: slices of ``stream`` at random offsets, EOS dropped, wrapping when short.

    EOS is dropped because an end-of-document marker inside a passkey document
    would teach (and test) something else; only the slices are scanned, so a
    huge stream costs nothing per sample.
    """
    out = np.empty(n, dtype=np.int64)
    filled = 0
    for _ in range(1000 + 4 * n):
        if filled == n:
            return out
        want = n - filled
        start = int(rng.integers(0, max(1, stream.size - want + 1)))
        piece = stream[start : start + want]
        if eos_id is not None:
            piece = piece[piece != eos_id]
        out[filled : filled + piece.size] = piece
        filled += piece.size
    raise DataError("passkey filler: the filler documents hold no tokens other than EOS")


def encode_piece(tokenizer: PieceTokenizer, text: str) -> np.ndarray:
    """Token ids of one piece; the document is these pieces concatenated, so each must decode
    back to itself (a tokenizer that adds a dummy prefix space would not)."""
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if tokenizer.decode(ids.tolist()) != text:
        raise RoundTripError(
            f"passkey: the tokenizer does not round-trip {text!r}, and a tokenizer that does not (a normalizing"
            " or lowercasing one) cannot carry pass keys; leave them out (--passkey-trials 0, eval.passkey_trials=0,"
            " train.passkey.fraction=0, --passkey-docs 0) or use a lossless tokenizer (`mnemo tokenizer train`)"
        )
    return ids


def encode_value(tokenizer: PieceTokenizer, text: str) -> np.ndarray:
    """Token ids of a value (key digits, a word, a name): a piece that must not encode as nothing."""
    ids = encode_piece(tokenizer, text)
    if ids.size == 0:
        raise DataError(f"passkey: the tokenizer encodes the value {text!r} as nothing")
    return ids


def _random_key(rng: np.random.Generator, n_digits: int = KEY_DIGITS) -> str:
    return str(int(rng.integers(10 ** (n_digits - 1), 10**n_digits)))


def count_run(haystack: np.ndarray, needle: np.ndarray) -> int:
    """Number of (possibly overlapping) occurrences of the token run ``needle``."""
    n = needle.size
    if haystack.size < n:
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(haystack, n)
    return int((windows == needle).all(axis=1).sum())


def filler_mentions(tokenizer: PieceTokenizer, tokens: np.ndarray, busy: np.ndarray, texts: list[str]) -> bool:
    """Whether the filler (the tokens not ``busy``), decoded run by run, holds any of ``texts`` as a word or number.

    count_run compares token runs, and a value encoded on its own ("lemon") is often not the tokens the same
    word has in running text (" lemon" is another token of a BPE vocabulary): only the filler's text shows
    those copies. Whole words only ("lemonade" is no copy of "lemon"). The check draws nothing: a document
    whose filler text holds no copy that its tokens do not is the same as without it.
    """
    if not texts:
        return False
    word = re.compile("(?<!\\w)(?:" + "|".join(re.escape(t) for t in texts) + ")(?!\\w)")
    edges = np.flatnonzero(np.diff(np.concatenate(([0], (~busy).astype(np.int8), [0]))))
    return any(word.search(tokenizer.decode(tokens[lo:hi].tolist())) for lo, hi in zip(edges[::2], edges[1::2]))


def _offset(room: int, length: int, depth: str | float, what: str) -> int:
    """Start offset of a piece of ``length`` tokens placed at ``depth`` in ``room`` tokens."""
    if length > room:
        raise DataError(
            f"passkey: {what} needs {length} tokens but the segment has room for {room} (increase the segment length)"
        )
    return int(round(depth_fraction(depth) * (room - length)))


def make_passkey_sample(
    tokenizer: PieceTokenizer,
    filler_ids: Any,
    distance: int,
    depth: str | float,
    segment_len: int,
    rng: np.random.Generator,
) -> dict:
    """One passkey document.

    tokenizer   data_pipeline.tokenizer.Tokenizer (encode/decode/eos_id)
    filler_ids  corpus token ids: a 1-D array, or a list of documents' arrays
    distance    D >= 0: the key is in segment 0, the question in segment D
    depth       'start' | 'middle' | 'end' (or a fraction) within segment 0
    Returns dict(tokens=int64 [(D+1)*T + 1] ending in EOS, answer_start,
    answer_len, key=str, key_offset=int (token index of the key sentence)).
    """
    if distance < 0:
        raise DataError(f"passkey: distance must be >= 0, got {distance}")
    T = int(segment_len)
    stream = filler_stream(filler_ids)
    prefix, suffix, question = (encode_piece(tokenizer, s) for s in (KEY_PREFIX, KEY_SUFFIX, QUESTION))
    key, digits = "", np.zeros(0, dtype=np.int64)
    n = (distance + 1) * T
    for _ in range(100):
        key = _random_key(rng)
        digits = encode_value(tokenizer, key)
        key_sent = np.concatenate((prefix, digits, suffix))
        tail = np.concatenate((question, digits))
        if tail.size > T:
            raise DataError(f"passkey: the question needs {tail.size} tokens, more than the segment length {T}")
        # Segment 0 shares its room with the question when D == 0.
        room = T - (tail.size if distance == 0 else 0)
        key_off = _offset(room, key_sent.size, depth, "the key sentence")
        tokens = take_filler(stream, n, rng, tokenizer.eos_id)
        tokens[key_off : key_off + key_sent.size] = key_sent
        tokens[n - tail.size :] = tail
        # The key's digits must occur exactly twice: in the fact and in the answer, not in the filler's
        # tokens nor in its text (" 71432" may be other tokens than the key's).
        busy = np.zeros(n, dtype=bool)
        busy[key_off : key_off + key_sent.size] = busy[n - tail.size :] = True
        if count_run(tokens, digits) == 2 and not filler_mentions(tokenizer, tokens, busy, [key]):
            break
    else:
        raise DataError("passkey: could not draw a key absent from the filler in 100 tries")
    tokens = np.append(tokens, np.int64(tokenizer.eos_id))
    return dict(tokens=tokens, answer_start=n - digits.size, answer_len=int(digits.size), key=key, key_offset=key_off)


def _door_fact(door: int) -> tuple[str, str, str]:
    return (
        f" The pass key of door {door} is ",
        ". ",
        f" What is the pass key of door {door}? The pass key of door {door} is ",
    )


def make_multikey_sample(
    tokenizer: PieceTokenizer,
    filler_ids: Any,
    distance: int,
    n_keys: int,
    segment_len: int,
    rng: np.random.Generator,
    depth: str | float = "start",
) -> dict:
    """The harder variant: ``n_keys`` facts "The pass key of door 3 is NNNNN."

    The fact asked about sits in segment 0 at ``depth``; the other facts
    (distractors with the same wording and different doors and keys) are placed
    at random in segments 0..D, before the question. The document ends with
    "What is the pass key of door 3? The pass key of door 3 is NNNNN" + EOS.
    Returns the same keys as make_passkey_sample plus door=int and doors=list.
    """
    if not 1 <= n_keys <= MULTIKEY_MAX:
        raise DataError(f"passkey: n_keys must be in [1, {MULTIKEY_MAX}] (one door each), got {n_keys}")
    if distance < 0:
        raise DataError(f"passkey: distance must be >= 0, got {distance}")
    T = int(segment_len)
    n = (distance + 1) * T
    stream = filler_stream(filler_ids)
    doors = [int(d) for d in rng.choice(np.arange(1, MULTIKEY_MAX + 1), size=n_keys, replace=False)]
    keys: list[str] = []
    while len(keys) < n_keys:
        k = _random_key(rng)
        if k not in keys:
            keys.append(k)
    asked = 0  # doors/keys are random, so the first one is as good as any
    facts, digits = [], []
    for door, key in zip(doors, keys):
        pre, suf, _ = _door_fact(door)
        d = encode_value(tokenizer, key)
        digits.append(d)
        facts.append(np.concatenate((encode_piece(tokenizer, pre), d, encode_piece(tokenizer, suf))))
    tail = np.concatenate((encode_piece(tokenizer, _door_fact(doors[asked])[2]), digits[asked]))
    if tail.size > T:
        raise DataError(f"passkey: the question needs {tail.size} tokens, more than the segment length {T}")

    busy = np.zeros(n, dtype=bool)  # token slots already holding a fact or the question
    busy[n - tail.size :] = True
    room0 = T - (tail.size if distance == 0 else 0)
    placed = {asked: _offset(room0, facts[asked].size, depth, "the key sentence")}
    busy[placed[asked] : placed[asked] + facts[asked].size] = True
    for i in range(n_keys):
        if i == asked:
            continue
        L = facts[i].size
        # Valid starts: the fact lies inside one segment and on free slots only.
        csum = np.concatenate(([0], np.cumsum(busy)))
        starts = np.arange(n - L + 1)
        ok = (csum[starts + L] == csum[starts]) & (starts // T == (starts + L - 1) // T)
        if not ok.any():
            raise DataError(
                f"passkey: {n_keys} facts and the question do not fit in {distance + 1} "
                f"segment(s) of {T} tokens (use fewer keys, a larger distance or segment_len)"
            )
        placed[i] = int(rng.choice(starts[ok]))
        busy[placed[i] : placed[i] + L] = True
    for _ in range(100):
        tokens = take_filler(stream, n, rng, tokenizer.eos_id)
        for i, lo in placed.items():
            tokens[lo : lo + facts[i].size] = facts[i]
        tokens[n - tail.size :] = tail
        # The asked key's digits: once in its fact, once in the answer, not in the filler's text either.
        if count_run(tokens, digits[asked]) == 2 and not filler_mentions(tokenizer, tokens, busy, [keys[asked]]):
            break
    else:
        raise DataError("passkey: could not draw filler free of the key in 100 tries")
    tokens = np.append(tokens, np.int64(tokenizer.eos_id))
    return dict(
        tokens=tokens,
        answer_start=n - digits[asked].size,
        answer_len=int(digits[asked].size),
        key=keys[asked],
        key_offset=placed[asked],
        door=doors[asked],
        doors=doors,
    )
