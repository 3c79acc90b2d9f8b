"""The long-context task generators: each answer stands where the sample says, once, D segments before the question."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mnemo.data_pipeline.passkey import count_run, make_passkey_sample
from mnemo.data_pipeline.task_sizes import FACTS, fact_segments, with_facts
from mnemo.data_pipeline.tasks import (
    REPEATED_FILLER,
    TASKS,
    WORDS,
    TaskError,
    get_task,
    make_sample,
    parse_tasks,
    repeated_filler,
)
from mnemo.data_pipeline.tokenizer import Tokenizer
from tests.unit.stdlib import WordTokenizer, stdlib_filler, stdlib_tokenizer

T = 256  # the test tokenizer is small (600 pieces): a fact takes ~35 tokens

FACT = {  # family -> the sentence of one fact, decoded
    "passkey": re.compile(r"^ The pass key is (\d+)\. Remember it\. $"),
    "niah": re.compile(r"^ One of the special magic (?:number|word|uuid)s for ([\w-]+) is: ([\w-]+)\. $"),
    "mqar": re.compile(r"^ (\w+): (\d+)\.$"),
    "variable_tracking": re.compile(r"^ VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\. $"),
}
NIAH_FACT = re.compile(r" One of the special magic (?:number|word|uuid)s for ([\w-]+) is: ([\w-]+)\. ")

# (task, distances) covering every family and a few parameter values
CASES = [
    ("passkey", (0, 3)),
    ("niah_single_number", (0, 1, 4)),
    ("niah_single_word", (0, 2)),
    ("niah_single_uuid", (0, 2)),
    ("niah_single:value=number,digits=3,haystack=repeat", (1,)),
    ("niah_multikey_k4", (0, 3)),
    ("niah_multikey_k16", (2, 5)),
    ("niah_multikey:k=64", (12,)),
    ("niah_multikey_needles", (1, 3)),
    ("niah_multikey:k=4,value=uuid,haystack=needles", (2,)),
    ("niah_multivalue", (0, 2)),
    ("niah_multivalue:v=2,value=word", (1,)),
    ("niah_multiquery", (0, 2)),
    ("niah_multiquery:q=2,value=word", (1,)),
    ("mqar_n16", (0, 2)),
    ("mqar_n64", (1,)),
    ("mqar:n=256,q=8", (2,)),
    ("variable_tracking_h1", (0, 2)),
    ("variable_tracking_h2", (1,)),
    ("variable_tracking_h3", (2,)),
    ("variable_tracking_h4", (2, 4)),
    ("variable_tracking:h=2,c=3", (3,)),
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return stdlib_tokenizer(tmp_path_factory.mktemp("tok"), 12)


@pytest.fixture(scope="module")
def filler(tok) -> np.ndarray:
    return stdlib_filler(tok)


def _enc(tok, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text), dtype=np.int64)


def _question_keys(question: str) -> list[str]:
    """The keys a multi-key question names: "... for a, b and c? In that order ..." -> [a, b, c]."""
    names = re.search(r"(?:s for|values of) ([\w, -]+?)\? In that order", question).group(1)
    return re.split(r", | and ", names)


def _run_program(text: str) -> dict[str, str]:
    """Every variable of the document's VAR lines -> its value, assignments read in order."""
    env: dict[str, str] = {}
    order = []
    for name, rhs in re.findall(r" VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\. ", text):
        env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs
        order.append(name)
    return {n: env[n] for n in order}


def _check(tok, s: dict, spec, D: int) -> None:
    toks = s["tokens"]
    fam = spec.family
    # Passkey format: whole segments, EOS last and nowhere else, the answer the last tokens before EOS.
    assert toks.dtype == np.int64 and toks[-1] == tok.eos_id and tok.eos_id not in toks[:-1].tolist()
    assert len(toks) == s["n_segments"] * T + 1 == (s["fact_segment"] + D + 1) * T + 1
    a0, alen = s["answer_start"], s["answer_len"]
    answer = toks[a0 : a0 + alen]
    assert a0 + alen == len(toks) - 1 and tok.decode(answer.tolist()) == s["answer_text"] == s["key"]
    assert s["answer_text"] == ", ".join(s["values"]) and s["task"] == spec.name
    # Distance: the question (all of it in one segment) D segments after the last fact the answer needs.
    q0 = s["question_start"]
    assert q0 // T == (len(toks) - 2) // T == s["n_segments"] - 1
    spans = s["fact_spans"]
    assert spans == sorted(spans) and s["key_offset"] == spans[-1][0]
    assert q0 // T - spans[-1][0] // T == D == s["distance"]
    assert spans[-1][0] // T == s["fact_segment"]
    for lo, hi in spans:
        assert lo // T == (hi - 1) // T and hi <= q0, "a fact inside one segment, before the question"
    facts = [
        FACT["niah" if fam.startswith("niah") else fam].match(tok.decode(toks[lo:hi].tolist())) for lo, hi in spans
    ]
    assert all(facts), [tok.decode(toks[lo:hi].tolist()) for lo, hi in spans]
    question = tok.decode(toks[q0:a0].tolist())
    text = tok.decode(toks[:-1].tolist())
    # The trained answers: the scored one last, all in the question's segment after the question start.
    trained = [tuple(x) for x in s["answer_spans"]]
    assert trained[-1] == (a0, alen) and all(q0 < a and a + n <= a0 + alen for a, n in trained)
    assert trained == sorted(trained) and (fam == "mqar" or len(trained) == 1)

    # The answer follows from the facts at the stated places.
    if fam in ("passkey", "niah_single", "niah_multikey"):
        assert len(facts) == 1 and facts[-1].groups()[-1] == s["answer_text"]
        if fam != "passkey":
            assert f" for {facts[0].group(1)}? " in question
    elif fam == "niah_multivalue":
        assert [f.group(2) for f in facts] == s["values"], "in order of appearance"
        assert len({f.group(1) for f in facts}) == 1 and f" for {facts[0].group(1)}? " in question
    elif fam == "mqar":  # Zoology's queries "key: value." after the pairs; the last one's value is scored
        told = {f.group(1): f.group(2) for f in facts}
        asked = re.findall(r" (\w+): (\d*)\.?", question)
        assert len(told) == len(facts) == len(asked) == spec["q"] and s["values"] == [s["answer_text"]]
        assert all(told[k] == v for k, v in asked[:-1]) and asked[-1] == (asked[-1][0], "")
        assert told[asked[-1][0]] == s["answer_text"]
        queried = [tok.decode(toks[a : a + n].tolist()) for a, n in s["answer_spans"]]
        assert queried == [told[k] for k, _ in asked], "every query's value is trained"
    elif fam == "niah_multiquery":
        told = {f.group(1): f.group(2) for f in facts}
        assert len(told) == len(facts) == spec["q"]
        assert [told[k] for k in _question_keys(question)] == s["values"], "in the order of the question"
    else:  # variable_tracking: an interpreter of the VAR lines (distractor chains included) agrees
        value = re.search(r" It is (\d+)\. $", question).group(1)
        env = _run_program(text)
        assert [n for n, v in env.items() if v == value] == s["values"]
        assert len(s["values"]) == spec["h"] + 1 and len(env) == (spec["h"] + 1) * (spec["c"] + 1)
        assert facts[0].group(2) == value and [f.group(1) for f in facts] == s["values"]

    # Uniqueness: each answer item only in its fact(s) and the answer; the whole answer only there too.
    for j, v in enumerate(s["values"]):
        in_facts = 1 if fam != "variable_tracking" else (2 if j < len(s["values"]) - 1 else 1)
        assert count_run(toks, _enc(tok, v)) == in_facts + 1, v
        if fam != "variable_tracking" and not v.isalpha():
            assert text.count(v) == 2, v
    assert count_run(toks, answer) == (2 if len(s["values"]) == 1 else 1)


@pytest.mark.parametrize("name,distances", CASES, ids=[c[0] for c in CASES])
def test_layout_answer_and_distance(tok, filler, name, distances):
    spec = parse_tasks(name)[0]
    for D in distances:
        for seed, depth in ((D, "start"), (D + 100, "middle"), (D + 200, "end")):
            s = make_sample(name, tok, filler, T, D, np.random.default_rng(seed), depth=depth)
            _check(tok, s, spec, D)


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_and_varied(tok, filler, name):
    D = {"niah_multikey_k16": 3, "niah_multikey_k64": 12}.get(name, 2)
    a, b, c = (make_sample(name, tok, filler, T, D, np.random.default_rng(seed)) for seed in (5, 5, 6))
    assert (
        np.array_equal(a["tokens"], b["tokens"]) and a["values"] == b["values"] and a["fact_spans"] == b["fact_spans"]
    )
    assert not np.array_equal(a["tokens"], c["tokens"]) and a["values"] != c["values"]


@pytest.mark.parametrize("depth", ["start", "end"])
def test_depth_places_the_fact(tok, filler, depth):
    s = make_sample("niah_single_number", tok, filler, T, 2, np.random.default_rng(0), depth=depth)
    lo, hi = s["fact_spans"][0]
    assert (lo == 0) if depth == "start" else (hi == T)
    s = make_sample("niah_multivalue", tok, filler, T, 1, np.random.default_rng(0), depth=depth)
    assert (s["fact_spans"][0][0] == 0) if depth == "start" else (s["fact_spans"][-1][1] == T)


def test_distinct_keys_and_values(tok, filler):
    """Every key and every value of a multi-key, multi-value or MQAR document differs from the others."""
    for name, D, n in (("niah_multikey_k16", 3, 16), ("niah_multikey:k=64", 12, 64), ("niah_multivalue:v=6", 1, 6)):
        s = make_sample(name, tok, filler, T, D, np.random.default_rng(1))
        found = NIAH_FACT.findall(tok.decode(s["tokens"][:-1].tolist()))
        assert len(found) == s["n_facts"] == n
        assert len({v for _, v in found}) == n
        assert len({k for k, _ in found}) == (1 if "multivalue" in name else n)
    s = make_sample("mqar_n256", tok, filler, T, 1, np.random.default_rng(1))
    pairs = re.findall(r" (\w+): (\d{4})\.", tok.decode(s["tokens"][: s["question_start"]].tolist()))
    assert len(pairs) == s["n_facts"] == 256
    assert len({k for k, _ in pairs}) == len({v for _, v in pairs}) == 256
    assert s["n_segments"] == s["fact_segment"] + 2 and s["fact_segment"] > 0


def test_needle_haystack_has_no_copy_of_the_answer(tok, filler):
    for seed in range(6):
        s = make_sample("niah_multikey_needles", tok, filler, T, 3, np.random.default_rng(seed))
        text = tok.decode(s["tokens"][:-1].tolist())
        found = NIAH_FACT.findall(text)
        assert len(found) == s["n_facts"] > 4 * 4, "the haystack is mostly needles"
        assert len({k for k, _ in found}) == len(found) and len({v for _, v in found}) == len(found)
        asked = re.search(r"What is the special magic number for ([\w-]+)\?", text).group(1)
        assert [v for k, v in found if k == asked] == [s["answer_text"]]
        assert text.count(s["answer_text"]) == 2
        assert count_run(s["tokens"], _enc(tok, s["answer_text"])) == 2


@pytest.mark.parametrize("name", ["niah_single:digits=3", "niah_multivalue:v=2,digits=4", "mqar:n=16,digits=3"])
def test_filler_full_of_digits_never_holds_the_answer(tok, name):
    """Filler of random digits holds most 3-digit numbers: only documents without a stray copy are kept."""
    digits = _enc(tok, "0123456789")
    assert digits.size == 10  # split_digits: one token per digit
    noise = np.random.default_rng(0).choice(digits, size=20_000)
    for seed in range(4):
        s = make_sample(name, tok, noise, T, 2, np.random.default_rng(seed))
        _check(tok, s, parse_tasks(name)[0], 2)


@pytest.mark.parametrize(
    "name,words",
    [("niah_single_word", list(WORDS)), ("niah_single:digits=2", [str(i) for i in range(10, 100)])],
)
def test_filler_copies_that_are_other_tokens_are_redrawn(name, words):
    """Before: a value is encoded on its own ("lemon") and only its token run was looked for, while in running
    text the same word is another token (" lemon", as in BPE): answers stood in the filler too, 4 times in the
    text instead of 2. Here the filler is every possible value, so most draws hold the answer."""
    tok = WordTokenizer()
    rng = np.random.default_rng(0)
    filler = np.concatenate([tok.encode(" " + w) for w in rng.permutation(words * 4)])
    hit = 0
    for seed in range(8):
        s = make_sample(name, tok, filler, 64, 3, np.random.default_rng(seed))
        text = tok.decode(s["tokens"][:-1].tolist())
        value = s["answer_text"]
        assert len(re.findall(rf"\b{value}\b", text)) == 2, (value, text)
        assert count_run(s["tokens"], _enc(tok, value)) == 2 and _enc(tok, " " + value).size == 1
        hit += count_run(filler[: s["tokens"].size], _enc(tok, " " + value))
    assert hit, "the filler's words are the values"


def test_variable_tracking_hops(tok, filler):
    for h in (1, 2, 3, 4):
        for seed in range(3):
            s = make_sample(f"variable_tracking:h={h},c=2", tok, filler, T, 3, np.random.default_rng(seed))
            _check(tok, s, get_task("variable_tracking", h=h, c=2), 3)
            assert len(s["values"]) == h + 1 and s["n_facts"] == 3 * (h + 1)
            # What the long-term layer's tied span matches (docs/memory.md): the question ends as the first
            # fact does (its value and ". "), and each later name of the answer follows the previous name
            # as the ". " closing its own assignment does (", " there): the windows before them agree.
            toks, a0, spans = s["tokens"], s["answer_start"], s["fact_spans"]
            value = re.search(r"= (\d+)\. $", tok.decode(toks[spans[0][0] : spans[0][1]].tolist())).group(1)
            tail = len(_enc(tok, value)) + len(_enc(tok, ". "))
            assert toks[a0 - tail : a0].tolist() == toks[spans[0][1] - tail : spans[0][1]].tolist()
            at, stop = a0, len(_enc(tok, ". "))
            for name, (_, end) in zip(s["values"], spans[1:]):
                ids = _enc(tok, name).tolist()
                n = len(ids)
                assert toks[at : at + n].tolist() == toks[end - stop - n : end - stop].tolist() == ids
                at += n + len(_enc(tok, ", "))


def test_repeated_haystack(tok, filler):
    s = make_sample("niah_single_word:haystack=repeat", tok, filler, T, 2, np.random.default_rng(0))
    text = tok.decode(s["tokens"][:-1].tolist())
    assert "The grass is green. The sky is blue." in text and "def " not in text
    stream = repeated_filler(tok, 1000)
    assert stream.size >= 1000 and tok.decode(stream[:40].tolist()).startswith(REPEATED_FILLER[:30])
    # No corpus filler is needed at all.
    s = make_sample("passkey:haystack=repeat", tok, None, T, 1, np.random.default_rng(0))
    assert "The grass is green." in tok.decode(s["tokens"][:-1].tolist())


def test_passkey_is_the_passkey_generator(tok, filler):
    s = make_sample("passkey", tok, filler, T, 2, np.random.default_rng(4), depth="middle")
    p = make_passkey_sample(tok, filler, 2, "middle", T, np.random.default_rng(4))
    assert np.array_equal(s["tokens"], p["tokens"]) and s["key"] == p["key"]
    assert s["answer_start"] == p["answer_start"] and s["key_offset"] == p["key_offset"]


def test_parse_tasks():
    specs = parse_tasks("niah_multikey:k=4,mqar:n=16,q=8, passkey,niah_single_word,variable_tracking_h2:c=3")
    assert [s.name for s in specs] == [
        "niah_multikey:k=4",
        "mqar:n=16,q=8",
        "passkey",
        "niah_single_word",
        "variable_tracking_h2:c=3",
    ]
    assert specs[0]["k"] == 4 and specs[1]["n"] == 16 and specs[1]["q"] == 8 and specs[3]["value"] == "word"
    assert specs[4]["h"] == 2 and specs[4]["c"] == 3 and specs[4].family == "variable_tracking"
    assert TASKS["niah_multikey_k64"]["k"] == 64 and TASKS["mqar_n256"]["n"] == 256
    assert parse_tasks("niah_multikey_k16")[0] is TASKS["niah_multikey_k16"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("niah_multikey:k=0", "parameter k"),
        ("niah_multikey:k=four", "parameter k"),
        ("niah_multivalue:v=0", "parameter v"),
        ("mqar:n=4,q=5", "parameter q"),
        ("mqar:n=400", "word list"),
        ("variable_tracking:h=0", "parameter h"),
        ("niah_single:value=color", "parameter value"),
        ("niah_single:haystack=needles", "parameter haystack"),
        ("niah_single:colour=red", "unknown parameter 'colour'"),
        ("needle_in_haystack", "unknown task"),
        ("k=4,passkey", "before any task"),
        ("mqar:n=16,n=32", "not a new param"),
        ("mqar,,passkey", "empty item"),
    ],
)
def test_bad_task_names_and_parameters(text, match):
    with pytest.raises(ValueError, match=match):
        parse_tasks(text)


LONG = "x" * 5000


@pytest.mark.parametrize(
    "text, msg",
    [
        (LONG, "--tasks: unknown task 'xxx"),
        ("passkey," + LONG, "--tasks: unknown task 'xxx"),
        (",," + LONG, "--tasks: tasks ',,xxx"),
        (LONG + "=1", "--tasks: tasks 'xxx"),
        ("passkey:" + LONG + "=1", "--tasks: passkey: unknown parameter 'xxx"),
        ("passkey:haystack=" + LONG, "--tasks: passkey: parameter haystack must be one of corpus, repeat, got 'xxx"),
        ("mqar:n=" + LONG, "--tasks: mqar: parameter n must be an integer, got 'xxx"),
        ("niah_single:value=" + LONG, "--tasks: niah_single: parameter value must be one of"),
        (LONG + ":a=1,a=2", "--tasks: tasks 'xxx"),
        (",".join(["mqar_n16:q=" + "0" * 3000 + "4"] * 2), "--tasks: task 'mqar_n16:q=000"),  # named as given
        # numbers the user gave, or made of them (the words needed: keys and values)
        ("mqar:n=1" + "6" * 3000, "--tasks: mqar: 1666"),
        ("mqar:n=-" + "6" * 3000, "--tasks: mqar: parameter n must be >= 1, got -666"),
        ("niah_single:digits=" + "9" * 3000, "--tasks: niah_single: parameter digits must be <= 18, got 999"),
        ("mqar:n=16,q=" + "9" * 3000, "--tasks: mqar: parameter q (queries) must be <= n (pairs), got q=999"),
        ("niah_multivalue:v=" + "9" * 3000 + ",value=word", "--tasks: niah_multivalue: 1000"),
    ],
)
def test_a_huge_tasks_value_is_quoted_cut(text, msg):
    """mnemo eval --tasks quoted a bad value whole: 5,000 characters of task name in the error line."""
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.task_eval import task_specs

    with pytest.raises(EvalError) as e:
        task_specs([text])
    line = str(e.value)
    assert len(line) < 600 and "\n" not in line, line[:300]
    assert msg is None or line.startswith(msg), line[:300]


def test_what_cannot_fit_is_refused(tok, filler):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="distance"):
        make_sample("niah_single_number", tok, filler, T, -1, rng)
    with pytest.raises(ValueError, match="distance"):  # 64 needles in one segment
        make_sample("niah_multikey_k64", tok, filler, T, 0, rng)
    with pytest.raises(ValueError, match="segment_len"):  # the question alone is longer than a segment
        make_sample("niah_multiquery", tok, filler, 40, 3, rng)
    with pytest.raises(ValueError, match="depth"):
        make_sample("niah_single_number", tok, filler, T, 1, rng, depth="bottom")
    with pytest.raises(ValueError, match="digits"):  # 16 distinct one-digit values do not exist
        make_sample("niah_multikey:k=16,digits=1", tok, filler, T, 6, rng)
    assert issubclass(TaskError, ValueError)


@pytest.mark.parametrize(
    "name",
    ["niah_multikey:k=4", "niah_multivalue:v=4", "niah_multiquery:q=3", "mqar:n=64", "variable_tracking:h=3,c=2"],
)
def test_fixed_layout_holds_any_draw_and_fewer_facts(tok, filler, name):
    """fact_segments(spec, D) bounds the segments: every draw, with any fewer facts, has S + D + 1 of them."""
    spec = parse_tasks(name)[0]
    family_count = FACTS[spec.family]
    for D in (0, 1, 3):
        S = fact_segments(spec, tok, T, D)
        assert S >= fact_segments(spec, tok, T, D + 1), "more distance never needs more fact segments"
        for count in sorted({1, 2, spec[family_count]}):
            fewer = with_facts(spec, count)
            assert fewer[family_count] == count and fewer.name == spec.name
            for seed in range(3):
                s = make_sample(fewer, tok, filler, T, D, np.random.default_rng(seed), depth="end", fact_segment=S)
                assert s["n_segments"] == S + D + 1 and s["fact_segment"] == S
                _check(tok, s, fewer, D)
    if spec.family == "mqar":
        assert fact_segments(spec, tok, T, 1) > 0 and with_facts(spec, 2)["q"] == 2
    with pytest.raises(ValueError, match="fact_segment"):
        make_sample("passkey", tok, filler, T, 1, np.random.default_rng(0), fact_segment=1)


def test_mqar_queries_are_zoology_pairs(tok, filler):
    s = make_sample("mqar:n=16,q=4", tok, filler, T, 2, np.random.default_rng(3))
    tail = tok.decode(s["tokens"][s["question_start"] : -1].tolist())
    assert re.fullmatch(r"( \w+: \d+\.){3} \w+: \d+", tail), tail
    assert len(s["answer_spans"]) == 4 and s["answer_spans"][-1] == (s["answer_start"], s["answer_len"])
    # Each value right after its key; only the last one is the scored answer.
    assert tail.endswith(s["answer_text"]) and s["values"] == [s["answer_text"]]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("niah_multivalue:v=100000000", "niah_multivalue: parameter v=100000000: 100000000 distinct 7-digit values"),
        ("niah_multikey:k=10,digits=1", "niah_multikey: parameter k=10: 10 distinct 1-digit values needed, only 9"),
        ("mqar:n=10,digits=1", "mqar: parameter n=10: 10 distinct 1-digit values needed, only 9 exist"),
        ("variable_tracking:c=9,digits=1", "variable_tracking: parameter c=9: 10 distinct 1-digit values"),
        ("variable_tracking:c=100000000,digits=18", "variable_tracking: parameters c=100000000, h=4: 500000005"),
    ],
)
def test_more_distinct_values_than_exist_are_refused_when_parsed(text, needle):
    """_distinct drew up to 50n + 100 values one at a time from 9 x 10^(digits-1): v=100000000 ran for good."""
    with pytest.raises(TaskError) as e:
        parse_tasks(text)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value), str(e.value)
    assert parse_tasks("mqar:n=9,q=2,digits=1,niah_multikey:k=9,digits=1,variable_tracking:c=8,digits=1")  # room


@pytest.mark.parametrize(
    "text, needle",
    [
        ("niah_multivalue:v=2000000", "parameter v=2000000: the question and answer take 4,000,004 tokens or more"),
        ("variable_tracking:c=50000,digits=9", "parameter c=50000: its facts, question and answer take 1,250,037"),
    ],
)
def test_a_task_too_big_for_its_segments_is_refused_before_drawing(tok, filler, text, needle):
    """niah_multivalue:v=2000000 drew for 91 s and 3 GB before the layout found the answer longer than a segment."""
    import time

    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.task_eval import task_samples

    specs = parse_tasks(text)
    start = time.monotonic()
    with pytest.raises(EvalError) as e:
        task_samples(specs, tok, filler, T, [1, 2], 1)
    assert str(e.value).startswith(f"task {text}: {needle}") and "\n" not in str(e.value), str(e.value)
    skipped: dict[str, str] = {}
    assert task_samples(specs, tok, filler, T, [1, 2], 1, skipped=skipped) == {} and needle in skipped[text]
    assert time.monotonic() - start < 30  # drawn first, v = 2,000,000 took 91 s


@pytest.mark.parametrize("text", ["variable_tracking:h=2,c=100", "niah_multikey:k=64"])
def test_a_training_task_whose_distractors_spread_over_more_segments_is_not_refused(text):
    """Training's episodes spread distractor facts over more segments than an evaluation document has
    (task_sizes.fact_segments); the bound for eval refused variable_tracking:h=2,c=100 at T = 128, which trains."""
    from mnemo.data_pipeline.task_sizes import refuse_unfit
    from mnemo.train.config import load_config

    (spec,) = parse_tasks(text)
    with pytest.raises(TaskError):
        refuse_unfit(spec, 128, 1)  # an evaluation document at D = 1 has too few segments
    refuse_unfit(spec, 128, 1, episodes=True)
    cfg = load_config(
        "configs/tasks.yaml",
        [f'train.passkey.tasks=["{text}"]', "train.passkey.task_weights=[]", "train.passkey.max_distance=1"],
    )
    assert cfg.train.passkey.tasks == [text]
