"""How many segments a task's facts take whatever is drawn, and a task with fewer facts: the episodes' fixed layouts.

Training episodes (train/episodes.py) need every document of a task at
distance D to have the same number of segments on every rank, whatever words,
values and tokenizations were drawn: ``fact_segments`` bounds S (the segment
of the last fact) from the task's parameters, and ``make_sample(...,
fact_segment=S)`` spreads the facts over segments 0..S. ``with_facts`` gives
the same task with fewer facts (the episodes' curriculum on the number of
facts), which fits the same S.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnemo.data_pipeline.passkey import DEPTHS, PieceTokenizer, make_multikey_sample, make_passkey_sample
from mnemo.data_pipeline.task_layout import Pieces, TaskError
from mnemo.data_pipeline.tasks import (
    NAME_LETTERS,
    REPEATED_FILLER,
    UUID_GROUPS,
    VT_QUESTION,
    WORDS,
    TaskSpec,
    make_sample,
    task,
)

# family -> the parameter counting the facts a question depends on or is hidden among (the facts curriculum)
FACTS = {"niah_multikey": "k", "niah_multivalue": "v", "niah_multiquery": "q", "mqar": "n", "variable_tracking": "h"}


def with_facts(spec: TaskSpec, count: int) -> TaskSpec:
    """``spec`` with ``count`` facts (its FACTS parameter; MQAR's queries capped at its pairs), its name kept."""
    if spec.family not in FACTS:
        return spec
    params = dict(spec.params)
    params[FACTS[spec.family]] = int(count)
    if spec.family == "mqar":
        params["q"] = min(params["q"], int(count))
    return TaskSpec(spec.name, spec.family, task(spec.family, **params).params)


def fact_segments(spec: TaskSpec, tokenizer: PieceTokenizer, segment_len: int, distance: int) -> int:
    """S for ``make_sample(fact_segment=S)``: the segments 0..S hold the block facts of any draw of ``spec``
    (and of ``with_facts(spec, c)`` for any c below its count), whatever words and values are drawn, and the
    S + D + 1 segments leave room for its distractor facts.

    A function of (task, parameters, tokenizer, T, D) only: each fact is bounded by its template pieces
    (encoded) plus the longest key word of WORDS plus one token per character of a number, name or uuid
    (every token decodes to at least one character), and the question and answer likewise.
    """
    fam, T = spec.family, int(segment_len)
    if fam == "passkey":
        return 0
    P = Pieces(tokenizer)
    word = max(P("", w).size for w in WORDS)
    sep = max(P(", ").size, P(" and ").size)
    if fam == "mqar":
        n = spec["n"]
        fact = P(" ").size + word + P(": ").size + spec["digits"] + P(".").size
        tail = spec["q"] * fact
    elif fam == "variable_tracking":
        n, name, value = spec["h"] + 1, NAME_LETTERS, spec["digits"]
        fact = P(" VAR ").size + name + max(P(" = ").size + value, P(" = VAR ").size + name) + P(". ").size
        lead = sum(P(t).size for t in VT_QUESTION)
        tail = lead + value + n * name + (n - 1) * sep
    else:
        kind = spec["value"]
        value = {"number": spec["digits"], "word": word, "uuid": sum(UUID_GROUPS) + len(UUID_GROUPS) - 1}[kind]
        n = spec["v"] if fam == "niah_multivalue" else spec["q"] if fam == "niah_multiquery" else 1
        fact = P(f" One of the special magic {kind}s for ").size + word + P(" is: ").size + value + P(". ").size
        texts = (f" What are all the special magic {kind}s for ", f"? The special magic {kind}s for ", " are: ")
        asked = sum(P(t).size for t in texts) + 2 * word
        texts = (f" What are the special magic {kind}s for ", "? In that order, they are: ")
        listed = sum(P(t).size for t in texts) + n * word + n * sep
        tail = max(asked, listed) + n * value + n * sep
    # Distractor facts: they go anywhere before the question, each inside a free run of one segment.
    others = distractor_facts(spec)
    D = int(distance)
    last_room = T - (tail if D == 0 else 0)
    for m in range(1, n + 2 * others + 2):
        big, last = (-(-n // m), n // m) if n >= m else (1, 1)  # facts in the fullest and the last segment
        # Distractors always find a run when the free room exceeds (distractors + runs) x the longest fact:
        # a piece fails only when every run has less room left than the piece.
        free = (m + D) * T - n * fact - tail
        runs = n + m + D  # the block facts split their segments' free room; one run per other segment
        if big * fact <= T and last * fact <= last_room and (not others or free >= (others + runs) * fact):
            return m - 1
    raise TaskError(
        f"{spec.name}: {n} facts of up to {fact} tokens"
        + (f" and {others} distractors" if others else "")
        + f" do not fit in segment_len {T}"
        + (" beside the question (distance 0)" if D == 0 else "")
    )


def distractor_facts(spec: TaskSpec) -> int:
    """Facts of ``spec`` that go anywhere before the question, each in a free run of one segment: the other
    k - 1 keys of niah_multikey, the c other chains' facts of variable_tracking, else none (needles, with
    haystack=needles, fill what room is left)."""
    if spec.family == "niah_multikey" and spec["haystack"] != "needles":
        return spec["k"] - 1
    if spec.family == "variable_tracking":
        return spec["c"] * (spec["h"] + 1)
    return 0


def least_tokens(spec: TaskSpec) -> tuple[int, int, int]:
    """(question + answer, all facts + question + answer, block facts): lower bounds of the tokens from the
    parameters alone, no tokenizer and nothing drawn. Every piece (template text, key, value) is encoded on its
    own and a non-empty piece takes a token or more (passkey.encode_piece and encode_value refuse less)."""
    fam = spec.family
    if fam == "mqar":
        n, q = spec["n"], spec["q"]
        return 5 * (q - 1) + 4, 5 * n + 5 * (q - 1) + 4, n  # " ", key, ": ", value, "." per pair and query
    if fam == "variable_tracking":
        h, c = spec["h"], spec["c"]
        tail = 3 + 2 * (h + 1) - 1  # the question's 3 pieces; h + 1 names and their separators
        return tail, 5 * (c + 1) * (h + 1) + tail, h + 1
    n_keys = spec["k"] if fam == "niah_multikey" else spec["q"] if fam == "niah_multiquery" else 1
    if fam == "niah_multiquery":
        tail = 4 * n_keys  # lead, q names, q - 1 separators, end; q values and q - 1 separators
    else:
        items = spec["v"] if fam == "niah_multivalue" else 1
        tail = 5 + 2 * items - 1  # "What is ... for", key, "? The ... for", key, " is: "; the answer's items
    block = spec["v"] if fam == "niah_multivalue" else n_keys if fam == "niah_multiquery" else 1
    facts = 5 * n_keys * (spec["v"] if fam == "niah_multivalue" else 1)
    return tail, facts + tail, block


def refuse_unfit(spec: TaskSpec, segment_len: int, distance: int, episodes: bool = False) -> None:
    """TaskError naming ``spec`` and its parameter when, from its parameters alone, its documents cannot fit
    segments of ``segment_len`` at distances up to ``distance`` (``least_tokens``): its question and answer
    more than one segment, or its facts more than the (block facts + D) segments a document of
    ``make_sample`` (fact_segment=None) has. Before drawing: ``niah_multivalue:v=2000000`` drew for 91 s and
    3 GB before the layout said so, v=100000000 ran on for good.

    ``episodes``: training's documents, whose facts may spread over the most segments ``fact_segments``
    tries (block facts + 2 x distractors + 1, then D): a task that trains is never refused."""
    if spec.family == "passkey":
        return
    T, D = int(segment_len), int(distance)
    tail, total, block = least_tokens(spec)
    fam = spec.family
    if episodes:
        block += 2 * distractor_facts(spec) + 1
    if tail > T:
        key = {"niah_multivalue": "v", "niah_multiquery": "q", "mqar": "q", "variable_tracking": "h"}.get(fam)
        raise TaskError(
            f"{spec.name}: {f'parameter {key}={spec[key]}: ' if key else ''}the question and answer take {tail:,}"
            f" tokens or more, more than segment_len {T}"
        )
    if total > (block + D) * T:
        key = {"mqar": "n", "variable_tracking": "c"}.get(fam, FACTS.get(fam))
        raise TaskError(
            f"{spec.name}: {f'parameter {key}={spec[key]}: ' if key else ''}its facts, question and answer take"
            f" {total:,} tokens or more, more than the {block + D} segment(s) of {T} tokens its documents have at"
            f" distance {D}"
        )


def corpus_passkey(spec: TaskSpec) -> bool:
    """The plain pass key over corpus filler: episodes draw it as make_passkey_sample does (and as
    ``train.passkey.max_keys`` says), draw for draw, not through make_sample."""
    return spec.family == "passkey" and spec["haystack"] == "corpus"


def check_fit(
    specs: list[TaskSpec], tokenizer: PieceTokenizer, segment_len: int, filler: Any, max_keys: int = 1
) -> None:
    """DataError (TaskError) unless documents of every task of ``specs`` fit segments of ``segment_len`` at
    every D an episode draws (0 is the tightest: the facts share a segment with the question).

    One check for the pre-flight (train/config.py, with ``stand_in_filler``: the fit does not depend on
    the filler's words) and each rank's episode source (its corpus filler). Layouts are at random, so a
    few draws at every depth with the most facts.
    """
    T = int(segment_len)
    for spec in specs:
        if corpus_passkey(spec):
            make_passkey_sample(tokenizer, filler, 0, "start", T, np.random.default_rng(0))
            if max_keys > 1:
                for depth in DEPTHS:
                    for seed in range(4):
                        make_multikey_sample(
                            tokenizer, filler, 0, max_keys, T, np.random.default_rng(seed), depth=depth
                        )
            continue
        for D in (0, 1):
            S = fact_segments(spec, tokenizer, T, D)
            for depth in DEPTHS:
                for seed in range(2):
                    make_sample(spec, tokenizer, filler, T, D, np.random.default_rng(seed), depth, fact_segment=S)


def stand_in_filler(tokenizer: PieceTokenizer, n_tokens: int) -> np.ndarray:
    """REPEATED_FILLER's token ids tiled as ``repeated_filler`` tiles them, without its round-trip check.

    For the pre-flight fits, whose outcome does not depend on the filler's words: documents made with
    the user's corpus filler (token ids already) need no round trip of this stand-in, so a tokenizer
    that does not give it back must neither be refused for it nor be told about its text.
    """
    unit = np.asarray(tokenizer.encode(REPEATED_FILLER), dtype=np.int64)
    if unit.size == 0:  # a tokenizer that drops the text: any one id stands in as well
        unit = np.zeros(1, dtype=np.int64)
    return np.tile(unit, n_tokens // unit.size + 2)
