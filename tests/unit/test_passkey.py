"""The passkey generator: key present once, at the requested depth, D segments before the question."""

from __future__ import annotations

import re


import numpy as np
import pytest

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.passkey import KEY_PREFIX, KEY_SUFFIX, QUESTION, make_multikey_sample, make_passkey_sample
from mnemo.data_pipeline.tokenizer import Tokenizer
from tests.unit.stdlib import WordTokenizer, stdlib_filler, stdlib_tokenizer

T = 128


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 12)


@pytest.fixture(scope="module")
def filler(tok) -> np.ndarray:
    return stdlib_filler(tok)


def _find(hay: np.ndarray, needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(hay) - n + 1) if hay[i : i + n].tolist() == needle]


@pytest.mark.parametrize("distance", [0, 1, 3])
@pytest.mark.parametrize("depth", ["start", "middle", "end"])
def test_passkey_layout(tok, filler, distance, depth):
    rng = np.random.default_rng(distance * 10 + len(depth))
    s = make_passkey_sample(tok, filler, distance, depth, T, rng)
    toks, key = s["tokens"], s["key"]
    assert toks.dtype == np.int64
    assert len(toks) == (distance + 1) * T + 1 and toks[-1] == tok.eos_id
    assert tok.eos_id not in toks[:-1].tolist()  # filler EOS dropped
    assert len(key) == 5 and key.isdigit()

    key_sent = tok.encode(KEY_PREFIX) + tok.encode(key) + tok.encode(KEY_SUFFIX)
    starts = _find(toks, key_sent)
    assert len(starts) == 1, "the key sentence appears exactly once"
    k0 = starts[0]
    assert k0 == s["key_offset"]
    assert k0 + len(key_sent) <= T, "the key is in segment 0"
    # The key's digits appear exactly twice: in the fact and in the answer.
    assert len(_find(toks, tok.encode(key))) == 2

    # The question is entirely in segment D; the answer digits are the last tokens before EOS.
    q = tok.encode(QUESTION)
    a0, alen = s["answer_start"], s["answer_len"]
    assert a0 + alen == len(toks) - 1
    assert alen == 5  # split_digits: one token per digit
    assert tok.decode(toks[a0 : a0 + alen]) == key
    q0 = a0 - len(q)
    assert toks[q0:a0].tolist() == q
    assert q0 // T == distance and (a0 + alen - 1) // T == distance
    if distance > 0:
        # key segment 0, question segment D: D segments apart
        assert q0 // T - k0 // T == distance
    else:
        assert k0 + len(key_sent) <= q0

    # Depth: start = first token of the segment, end = flush with the free room's end.
    room = T - (len(q) + alen if distance == 0 else 0)
    want = {"start": 0, "middle": round((room - len(key_sent)) / 2), "end": room - len(key_sent)}[depth]
    assert abs(k0 - want) <= 1

    # The text reads as intended: decode of the document holds the sentences verbatim.
    text = tok.decode(toks[:-1])
    assert f"The pass key is {key}. Remember it." in text
    assert text.endswith(f"What is the pass key? The pass key is {key}")
    assert text.count(key) == 2


def test_passkey_deterministic_and_varied(tok, filler):
    a = make_passkey_sample(tok, filler, 2, "middle", T, np.random.default_rng(7))
    b = make_passkey_sample(tok, filler, 2, "middle", T, np.random.default_rng(7))
    c = make_passkey_sample(tok, filler, 2, "middle", T, np.random.default_rng(8))
    assert np.array_equal(a["tokens"], b["tokens"]) and a["key"] == b["key"]
    assert a["key"] != c["key"] or not np.array_equal(a["tokens"], c["tokens"])
    # Filler is real corpus text at random offsets: not all from one place.
    rng = np.random.default_rng(0)
    keys = {make_passkey_sample(tok, filler, 1, "start", T, rng)["key"] for _ in range(20)}
    assert len(keys) >= 18


def test_passkey_list_of_documents_and_errors(tok, filler):
    docs = [filler[:5000], filler[5000:9000]]
    s = make_passkey_sample(tok, docs, 1, "end", T, np.random.default_rng(1))
    assert len(s["tokens"]) == 2 * T + 1
    with pytest.raises(DataError, match="segment length"):
        make_passkey_sample(tok, filler, 0, "start", 20, np.random.default_rng(1))
    with pytest.raises(DataError, match="depth"):
        make_passkey_sample(tok, filler, 1, "bottom", T, np.random.default_rng(1))
    with pytest.raises(DataError, match="filler"):
        make_passkey_sample(tok, np.zeros(0, dtype=np.int64), 1, "start", T, np.random.default_rng(1))


@pytest.mark.parametrize("distance,n_keys", [(0, 2), (2, 4), (3, 8)])
def test_multikey_layout(tok, filler, distance, n_keys):
    s = make_multikey_sample(tok, filler, distance, n_keys, T, np.random.default_rng(distance))
    toks, key, door = s["tokens"], s["key"], s["door"]
    assert len(toks) == (distance + 1) * T + 1 and toks[-1] == tok.eos_id
    assert len(set(s["doors"])) == n_keys and door in s["doors"]
    text = tok.decode(toks[:-1])
    for d in s["doors"]:
        assert text.count(f"The pass key of door {d} is ") == 1 + (d == door)
    fact = tok.encode(f" The pass key of door {door} is ") + tok.encode(key) + tok.encode(". ")
    starts = _find(toks, fact)
    assert starts == [s["key_offset"]] and starts[0] + len(fact) <= T
    a0, alen = s["answer_start"], s["answer_len"]
    assert a0 + alen == len(toks) - 1 and tok.decode(toks[a0 : a0 + alen]) == key
    assert text.endswith(f"What is the pass key of door {door}? The pass key of door {door} is {key}")
    assert (a0 - 1) // T == distance


@pytest.mark.parametrize("multikey", [False, True])
def test_key_in_the_filler_as_other_tokens_is_redrawn(multikey):
    """Before: only the key's own tokens ("71432") were looked for in the filler, and a tokenizer that keeps
    numbers whole writes " 71432" in running text as another token: the key stood in the filler's text."""
    tok = WordTokenizer()
    clean = np.asarray(tok.encode(" the cat and" * 200), dtype=np.int64)

    def sample(filler, seed):
        rng = np.random.default_rng(seed)
        if multikey:
            return make_multikey_sample(tok, filler, 1, 1, 64, rng)
        return make_passkey_sample(tok, filler, 1, "start", 64, rng)

    for seed in range(6):
        key = sample(clean, seed)["key"]  # the key this seed draws first
        # The key all over the filler (passkey: a new key is drawn), or in half of it (multikey, whose keys
        # are fixed: new filler is taken).
        with_key = np.asarray(tok.encode(f" the {key} and" * 200), dtype=np.int64)
        s = sample(np.concatenate((with_key, clean)) if multikey else with_key, seed)
        text = tok.decode(s["tokens"][:-1].tolist())
        assert len(re.findall(rf"\b{s['key']}\b", text)) == 2, text
        assert len(_find(s["tokens"], tok.encode(s["key"]))) == 2
        assert (s["key"] == key) == multikey


def test_multikey_too_many_facts(tok, filler):
    with pytest.raises(DataError, match="do not fit"):
        make_multikey_sample(tok, filler, 0, 6, T, np.random.default_rng(0))


def test_tokenizer_that_does_not_round_trip_is_refused(filler):
    class DummyPrefix:  # like SentencePiece with add_dummy_prefix: decode adds a space
        eos_id = 2

        def encode(self, text):
            return [ord(c) for c in text]

        def decode(self, ids):
            return " " + "".join(map(chr, ids))

    with pytest.raises(DataError, match="round-trip"):
        make_passkey_sample(DummyPrefix(), filler, 1, "start", T, np.random.default_rng(0))


def test_a_lossy_tokenizer_is_told_how_to_leave_pass_keys_out(filler):
    """Before: "train it with `mnemo tokenizer train`", wrong for a Hugging Face tokenizer.json that lowercases,
    and no word of --passkey-trials 0, which `mnemo eval` (30 trials by default) needs."""

    class Lowercasing:  # like a normalizing WordPiece tokenizer.json
        eos_id = 2

        def encode(self, text):
            return [ord(c) for c in text.lower()]

        def decode(self, ids):
            return "".join(map(chr, ids))

    with pytest.raises(DataError) as e:
        make_passkey_sample(Lowercasing(), filler, 1, "start", T, np.random.default_rng(0))
    msg = str(e.value)
    assert msg.startswith("passkey: the tokenizer does not round-trip ' The pass key is '"), msg
    for way_out in ("--passkey-trials 0", "eval.passkey_trials=0", "train.passkey.fraction=0", "lossless tokenizer"):
        assert way_out in msg, msg
    assert "train it with" not in msg
