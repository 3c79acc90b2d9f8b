"""A task document's pieces (Pieces: token ids of its texts) and where they go: facts from segment 0, the question last.

``layout`` takes a Draft (what the document says, from ``tasks``) and places it
in whole segments of T tokens: the facts the answer depends on (the block)
packed in order from segment 0 over as few segments as hold them, then the
question and answer closing segment S + D, then distractor facts at random in
the free runs before the question, each inside one segment. The filler goes
wherever nothing was placed (``tasks.make_sample``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.passkey import PieceTokenizer, encode_piece, encode_value


class TaskError(DataError, ValueError):
    """A bad task name or parameter, or a task that does not fit the segment length and distance: names which."""


# Between the items of a list answer ("a, b, c"), a text piece of its own.
LIST_SEPARATOR = ", "


class Pieces:
    """Token ids of text pieces, each encoded on its own (so it tokenizes the same wherever it is put)."""

    def __init__(self, tokenizer: PieceTokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, *parts: str) -> np.ndarray:
        """Template text and values alternately: parts[0], parts[2], ... text; parts[1], parts[3], ... values."""
        out = []
        for i, text in enumerate(parts):
            if (i % 2, text) not in self.cache:
                enc = encode_piece if i % 2 == 0 else encode_value
                self.cache[(i % 2, text)] = enc(self.tok, text)
            out.append(self.cache[(i % 2, text)])
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def join(self, items: list[str]) -> np.ndarray:
        """The list answer "a, b, c": items and separators encoded on their own."""
        return self("", items[0], *[p for it in items[1:] for p in (LIST_SEPARATOR, it)])

    def separator(self) -> np.ndarray:
        """The token ids between two items of a ``join`` answer."""
        return self(LIST_SEPARATOR)


@dataclass
class Ending:
    """The question of a document and its answer (token ids), and what the answer depends on."""

    relevant: list[int]  # block facts the answer depends on (document order)
    question: np.ndarray
    answer: np.ndarray
    answer_text: str
    values: list[str]
    checks: list[tuple[np.ndarray, int]]  # (token run, its copies in the facts): no copy elsewhere but the tail
    # (offset in question + answer, length) of every answer a model is trained on; empty = just the answer
    trained: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Draft:
    """What a document says, before it is laid out: its facts (token ids) and how its question is made."""

    block: list[np.ndarray]  # facts packed in order from segment 0
    tail_bound: int  # the most tokens question + answer can take
    finish: Callable[[list[int]], Ending]  # segment of each block fact -> the question and answer
    groups: list[list[np.ndarray]]  # distractor facts; a group's in order, anywhere before the question
    needle: Callable[[], np.ndarray] | None = None  # haystack=needles: a fresh distractor fact


def pack_block(
    lengths: list[int], T: int, last_room: int, what: str, D: int, segments: int | None = None
) -> list[list[int]]:
    """Block facts (in order) over as few segments as hold them, spread evenly: indices per segment.

    segments  a required number of segments instead (the episodes' fixed layout); with fewer facts
              than segments the first ones stay empty, so the last fact still closes the block.
    """
    n = len(lengths)
    for m in range(1, n + 1) if segments is None else [int(segments)]:
        sizes = [n // m + (1 if i < n % m else 0) for i in range(m)] if n >= m else [0] * (m - n) + [1] * n
        cuts = np.cumsum([0, *sizes])
        groups = [list(range(int(a), int(b))) for a, b in zip(cuts, cuts[1:])]
        rooms = [T] * (m - 1) + [last_room]
        if all(sum(lengths[i] for i in g) <= r for g, r in zip(groups, rooms)):
            return groups
    beside = " beside the question (distance 0)" if D == 0 else ""
    into = "" if segments is None else f" {segments} segment(s) of"
    raise TaskError(
        f"{what}: {n} fact(s) of up to {max(lengths)} tokens do not fit in{into} segment_len {T}{beside} "
        "(use a larger segment_len or distance, or fewer facts)"
    )


def free_runs(busy: np.ndarray, T: int, limit: int) -> list[tuple[int, int]]:
    """Maximal runs [lo, hi) of free slots before ``limit``, each inside one segment."""
    runs = []
    for s0 in range(0, limit, T):
        free = np.flatnonzero(~busy[s0 : min(s0 + T, limit)]) + s0
        for run in np.split(free, np.flatnonzero(np.diff(free) > 1) + 1) if free.size else []:
            runs.append((int(run[0]), int(run[-1]) + 1))
    return runs


def spread(lengths: list[int], room: int, lead: int, rng: np.random.Generator) -> list[int]:
    """Offsets in ``room`` tokens of pieces in order: ``lead`` free tokens first, the rest split at random after each
    piece."""
    rest = room - sum(lengths) - lead
    cuts = np.sort(rng.integers(0, rest + 1, size=len(lengths) - 1))
    gaps = np.diff(np.concatenate(([0], cuts, [rest])))
    offsets = np.cumsum([lead, *(np.asarray(lengths[:-1]) + gaps[:-1])])
    return [int(o) for o in offsets]


def layout(
    draft: Draft, T: int, D: int, depth: float, rng: np.random.Generator, what: str, segments: int | None = None
) -> tuple[dict[int, np.ndarray], list[int], Ending, int, int]:
    """(start -> fact tokens, start of each block fact, ending, n tokens, S: the segment of the last block fact).

    segments  the block's segments S + 1 when fixed (``pack_block``); None: as few as hold it.
    """
    if draft.tail_bound > T:
        raise TaskError(f"{what}: the question and answer need {draft.tail_bound} tokens, more than segment_len {T}")
    lengths = [f.size for f in draft.block]
    groups = pack_block(lengths, T, T - (draft.tail_bound if D == 0 else 0), what, D, segments)
    ending = draft.finish([s for s, g in enumerate(groups) for _ in g])
    S = len(groups) - 1
    tail = ending.question.size + ending.answer.size
    n = (S + D + 1) * T
    placed: dict[int, np.ndarray] = {}
    block_at = [0] * len(lengths)
    for s, g in enumerate(groups):
        if not g:  # a segment of a fixed layout left empty: filler (and distractors)
            continue
        room = T - (tail if D == 0 and s == S else 0)
        sizes = [lengths[i] for i in g]
        for i, off in zip(g, spread(sizes, room, int(round(depth * (room - sum(sizes)))), rng)):
            placed[s * T + off], block_at[i] = draft.block[i], s * T + off
    busy = np.zeros(n, dtype=bool)  # token slots holding a fact or the question
    busy[n - tail :] = True
    for lo, f in placed.items():
        busy[lo : lo + f.size] = True
    # Distractors: each to a free run with room left (chance by that room; a group's pieces to runs in order,
    # the early ones among the front runs so the later ones still find room), then spread in their run.
    runs = free_runs(busy, T, n - tail)
    left = [hi - lo for lo, hi in runs]
    into: list[list[tuple[int, np.ndarray]]] = [[] for _ in runs]  # (group, fact) per run
    for gi, group in enumerate(draft.groups):
        r = 0  # the run of the group's previous piece: the next one goes there or later
        for j, f in enumerate(group):
            ok = [q for q in range(r, len(runs)) if left[q] >= f.size]
            if not ok:
                n_d = sum(len(g) for g in draft.groups)
                raise TaskError(
                    f"{what}: {n_d} distractor facts and the question do not fit in {S + D + 1} segment(s) of "
                    f"{T} tokens at distance {D} (use a larger distance or segment_len, or fewer facts)"
                )
            ok = ok[: -(-len(ok) // (len(group) - j))]
            room = np.asarray([left[r] for r in ok], dtype=np.float64)
            r = ok[int(rng.choice(len(ok), p=room / room.sum()))]
            into[r].append((gi, f))
            left[r] -= f.size
    for (lo, hi), pieces in zip(runs, into):
        if not pieces:
            continue
        order = [pieces[int(i)] for i in rng.permutation(len(pieces))]
        for gi in {g for g, _ in pieces}:  # a group's pieces keep their order within the run
            slots = [i for i, (g, _) in enumerate(order) if g == gi]
            mine = [p for p in pieces if p[0] == gi]
            for i, p in zip(slots, mine):
                order[i] = p
        facts = [f for _, f in order]
        for off, f in zip(spread([f.size for f in facts], hi - lo, 0, rng), facts):
            placed[lo + off] = f
            busy[lo + off : lo + off + f.size] = True
    if draft.needle is not None:  # every free run filled with needles while one fits
        for pos, end in free_runs(busy, T, n - tail):
            while True:
                f = draft.needle()
                if pos + f.size > end:
                    break
                placed[pos] = f
                pos += f.size
    return placed, block_at, ending, n, S
