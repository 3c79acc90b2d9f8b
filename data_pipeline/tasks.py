"""Long-context tasks: facts hidden in a haystack, asked for D segments later (RULER, MQAR, passkey).

Every sample is a document of whole segments of ``segment_len`` (T) tokens
followed by EOS, in the format of ``passkey.make_passkey_sample`` (so the
greedy and teacher-forced passkey scorers score it unchanged): ``tokens``
(int64), ``answer_start``, ``answer_len`` (the answer is the last tokens before
EOS), ``key`` (the answer text) and ``key_offset`` (where the last fact the
answer depends on starts), plus ``task``, ``answer_text``, ``values`` (the
answer's items), ``n_facts`` (fact sentences in the document, distractors
included), ``fact_spans`` ([start, end) of every fact the answer depends on,
in document order), ``question_start``, ``distance``, ``fact_segment``,
``n_segments`` and ``answer_spans`` ((start, length) of every answer to train
on, the scored one last).

Distance. The facts the answer depends on are packed in order from segment 0
(as few segments as they fit in, spread evenly; within a segment a lead of
``depth`` x the free room, the rest of the room split at random between the
facts). D is the number of segments between the last of them (segment S,
``fact_segment``) and the question: the question and answer close segment
S + D, the last of ``n_segments`` = S + D + 1. With D = 0 they share segment S,
after the facts. Earlier facts of a multi-fact answer lie D or more segments
back. Distractor facts go at random free places before the question, each
inside one segment. Only MQAR with many pairs has S > 0 at usual segment
lengths.

Tasks (the question is followed by the exact answer, which is what is scored:
``answer_len`` tokens, the items of a list answer separated by ", "; each key,
value and template piece is encoded on its own, so a value has the same
tokens in its fact and in the answer). Parameters and their defaults are in
FAMILIES (k, v, q = 4; n = 16; h = 4 hops, c = 1 distractor chain; values of
7 digits for NIAH as RULER, 4 for MQAR, 5 for variable tracking):

* ``passkey``: passkey.make_passkey_sample ("The pass key is 71432. Remember
  it." ... "What is the pass key? The pass key is" 71432).
* ``niah_single`` (RULER S-NIAH): "One of the special magic numbers for
  tiger is: 4712093." ... "What is the special magic number for tiger? The
  special magic number for tiger is:" 4712093. ``value``: number (``digits``
  digits), word (from WORDS) or uuid (hex groups 8-4-4-4-12).
* ``niah_multikey`` (MK-NIAH): ``k`` facts with distinct keys; the question
  names one (the fact placed at ``depth`` in segment 0), the other k - 1 are
  distractors. ``haystack=needles``: every free place before the question is
  filled with further distractor needles (keys "word-word"), corpus filler
  only in the gaps too short for one.
* ``niah_multivalue`` (MV-NIAH): ``v`` facts for one key; the answer is all v
  values in order of appearance.
* ``niah_multiquery`` (MQ-NIAH): ``q`` keys with one fact each; one question
  names all q (in a random order): "What are the special magic numbers for
  tiger, lemon, ... and otter? In that order, they are:" v1, v2, ...
* ``mqar`` (Zoology MQAR): ``n`` pairs "tiger: 4711." (word keys, ``digits``-digit
  values, all distinct), then ``q`` of them again as queries "lemon: 1234.
  tiger: 4711. ... otter:" 5678, each value right after its key. The answer
  (scored) is the last query's value, a pair of the last segment of pairs (D
  counts from there); ``answer_spans`` lists every query's value (trained).
* ``variable_tracking`` (RULER VT): a chain of ``h`` hops "VAR QWERT = 41523.
  VAR ASDFG = VAR QWERT. ..." and ``c`` distractor chains of the same length
  (other names and values). "Which variables hold the following value, in
  order of assignment? It is 41523." QWERT, ASDFG, ... (all h + 1 names).

Haystack (``haystack``): ``corpus`` (the filler given: held-out corpus tokens
at random offsets, see passkey.take_filler), ``repeat`` (REPEATED_FILLER over
and over, as Mohtashami & Jaggi), ``needles`` (niah_multikey only, above).

Uniqueness. Each answer item and the whole answer occur in the document only
where the task puts them (in its facts and after the question): not in the
filler, not across a piece boundary. A draw that breaks this is redrawn. The
filler is checked as tokens and as text (passkey.filler_mentions): a value
encoded on its own is often other tokens than the same word in running text
("lemon" and " lemon").

Naming tasks. ``TASKS`` holds ready names (``niah_single_number``,
``niah_multikey_k16``, ``mqar_n256``, ``variable_tracking_h2``, ...); a
family name or a ready name takes parameters as ``name:param=value,...``.
``parse_tasks("niah_multikey:k=4,mqar:n=16,q=8,passkey")`` reads a list: an
item with ``=`` and no ``:`` is a parameter of the task before it.

Over 500 lines: the families' parameters, their checks and their drafts are read together (a draft relies
on what task() bounds), and they share the private piece helpers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import DataError, brief, clip
from mnemo.data_pipeline.task_layout import Draft, Ending, Pieces, TaskError, layout
from mnemo.data_pipeline.passkey import (
    KEY_PREFIX,
    KEY_SUFFIX,
    QUESTION,
    PieceTokenizer,
    RoundTripError,
    count_run,
    depth_fraction,
    filler_mentions,
    encode_piece,
    filler_stream,
    make_passkey_sample,
    take_filler,
)


# Keys and word values: concrete nouns, none a word of the templates.
WORDS: tuple[str, ...] = tuple(
    """apple arrow badge bakery balloon bamboo banjo barrel basket beacon beaver bicycle blanket blossom bottle
    bracelet bridge bucket buffalo butter cabbage cactus camel candle canoe canyon carpet carrot castle cattle cellar
    cherry chimney cinema circus citizen cliff clover cobra coconut comet compass copper cotton cousin coyote crayon
    cricket crystal cucumber curtain cushion daisy desert diamond dolphin donkey dragon drawer eagle eclipse elbow
    engine falcon feather ferry fiddle garden garlic gazelle giraffe glacier goblet gorilla granite grape gravel guitar
    hammer harbor harvest hazel helmet hermit honey horizon hornet iceberg igloo island ivory jacket jaguar jasmine
    jelly jigsaw jungle kayak kettle kitten koala ladder lagoon lantern lemon leopard lettuce lizard lobster locket
    magnet mango maple marble meadow melon mirror monkey moose mosaic muffin museum mustard napkin needle nephew noodle
    nutmeg oasis octopus olive onion orchard ostrich otter oyster paddle palace panda panther parrot peach peanut
    pebble pelican pencil pepper piano pickle pigeon pillow pirate planet plum pocket pony poodle potato puddle pumpkin
    puppet quarry quartz quilt rabbit raccoon radish raven ribbon river robin rocket saddle salmon sandal satchel scarf
    scooter seagull shovel shrimp silver sled slipper snail sparrow spider spinach sponge squirrel stable statue sugar
    sunflower swan tablet teapot temple thimble thistle thunder tiger timber tomato tortoise tractor trumpet tulip
    turnip turtle umbrella valley velvet violin volcano wagon walnut walrus whistle willow window wizard wolf yacht
    yogurt zebra zipper acorn anchor antelope apron avocado bagel banana beetle biscuit blender bonnet bubble cannon
    caramel cashew chariot cheetah cobbler cookie cradle crocodile cupcake dagger dandelion dingo emerald falafel
    ferret flamingo fossil gadget galaxy gecko ginger goggles gondola hamster hedgehog hippo hyena iguana inkwell jackal
    kangaroo kiwi lemur llama lollipop macaw mammoth marmot meteor mitten mongoose narwhal nectar oatmeal omelet opal
    orca pancake papaya peacock penguin pepperoni pinecone platypus porcupine pretzel puffin quail raisin reindeer
    rhubarb saffron sardine sherbet skunk sloth spatula starfish sultan tamarind tapir toucan truffle tuba unicorn
    urchin vulture waffle weasel wombat""".split()
)
REPEATED_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VALUE_KINDS = ("number", "word", "uuid")
HAYSTACKS = ("corpus", "repeat", "needles")
UUID_GROUPS = (8, 4, 4, 4, 12)
NAME_LETTERS = 5  # variable names: 5 random capitals, as RULER
# The variable-tracking question around its value. The answer's first name follows its ". " at once, and
# each later name follows ", ": both end as an assignment does (the value and ". ", or the previous name and
# ". "), so the window of tokens before each name is the window its fact ends with (all of it, or all but
# the punctuation), as a question and its fact's context are in the other tasks.
VT_QUESTION = (" Which variables hold the following value, in order of assignment? It is ", ". ")
_CAPS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# family -> its parameters and their defaults (the order the names print in)
FAMILIES: dict[str, dict[str, Any]] = {
    "passkey": {"haystack": "corpus"},
    "niah_single": {"value": "number", "digits": 7, "haystack": "corpus"},
    "niah_multikey": {"k": 4, "value": "number", "digits": 7, "haystack": "corpus"},
    "niah_multivalue": {"v": 4, "value": "number", "digits": 7, "haystack": "corpus"},
    "niah_multiquery": {"q": 4, "value": "number", "digits": 7, "haystack": "corpus"},
    "mqar": {"n": 16, "q": 4, "digits": 4, "haystack": "corpus"},
    "variable_tracking": {"h": 4, "c": 1, "digits": 5, "haystack": "corpus"},
}
_KEYS = {"niah_multikey": "k", "niah_multiquery": "q", "mqar": "n"}  # the parameter counting the keys
_AT_LEAST = {"k": 1, "v": 1, "q": 1, "n": 1, "h": 1, "c": 0, "digits": 1}


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name as the user wrote it (the report key), its family and all its parameters."""

    name: str
    family: str
    params: tuple[tuple[str, Any], ...]

    def __getitem__(self, key: str) -> Any:
        return dict(self.params)[key]


def task(family: str, name: str | None = None, **params: Any) -> TaskSpec:
    """A checked TaskSpec of ``family`` with ``params`` over the family's defaults (strings are converted)."""
    if family not in FAMILIES:
        raise TaskError(f"unknown task {brief(family)} (tasks: {', '.join(dict.fromkeys([*FAMILIES, *TASKS]))})")
    full = dict(FAMILIES[family])
    for key, raw in params.items():
        if key not in full:
            raise TaskError(f"{family}: unknown parameter {brief(key)} (known: {', '.join(full)})")
        if isinstance(full[key], int):
            # ASCII digits only: int() also reads other scripts' digits ("٤" is 4), which nobody means here.
            if isinstance(raw, str) and not re.fullmatch(r"\s*-?[0-9]+\s*", raw):
                raise TaskError(f"{family}: parameter {key} must be an integer, got {brief(raw)}")
            try:
                raw = int(raw)
            except (TypeError, ValueError):
                raise TaskError(f"{family}: parameter {key} must be an integer, got {brief(raw)}") from None
            if raw < _AT_LEAST[key]:
                raise TaskError(f"{family}: parameter {key} must be >= {_AT_LEAST[key]}, got {brief(raw)}")
        full[key] = raw
    for key, kinds in (("value", VALUE_KINDS), ("haystack", HAYSTACKS if family == "niah_multikey" else HAYSTACKS[:2])):
        if key in full and full[key] not in kinds:
            raise TaskError(f"{family}: parameter {key} must be one of {', '.join(kinds)}, got {brief(full[key])}")
    if full.get("digits", 1) > 18:
        raise TaskError(f"{family}: parameter digits must be <= 18, got {brief(full['digits'])}")
    if family == "mqar" and full["q"] > full["n"]:
        raise TaskError(
            f"mqar: parameter q (queries) must be <= n (pairs), got q={brief(full['q'])} n={brief(full['n'])}"
        )
    n_keys = full[_KEYS[family]] if family in _KEYS else int(family.startswith("niah"))
    if (words := n_keys + (n_keys * full.get("v", 1) if full.get("value") == "word" else 0)) > len(WORDS):
        raise TaskError(
            f"{family}: {brief(words)} distinct words needed (keys and values), the word list has {len(WORDS)}"
        )
    refuse_too_many(family, full, n_keys)
    if name is None:
        name = family + (":" + ",".join(f"{k}={full[k]}" for k in params) if params else "")
    return TaskSpec(name, family, tuple(full.items()))


def refuse_too_many(family: str, full: dict[str, Any], n_keys: int) -> None:
    """TaskError naming the parameter when a task asks for more distinct numbers or variable names than exist
    (before, drawing them looped for minutes: ``niah_multivalue:v=100000000``)."""
    if family == "variable_tracking":
        count, names = full["c"] + 1, (full["c"] + 1) * (full["h"] + 1)
        if names > len(_CAPS) ** NAME_LETTERS:
            raise TaskError(
                f"{family}: parameters c={brief(full['c'])}, h={brief(full['h'])}: {brief(names)} distinct variable"
                f" names needed, only {len(_CAPS) ** NAME_LETTERS:,} of {NAME_LETTERS} capitals exist"
            )
    elif "digits" not in full or full.get("value", "number") != "number":
        return
    else:
        count = n_keys * full.get("v", 1)
    exist = 9 * 10 ** (full["digits"] - 1)
    if count > exist:
        key = {"variable_tracking": "c", "niah_multivalue": "v"}.get(family) or _KEYS[family]
        raise TaskError(
            f"{family}: parameter {key}={brief(full[key])}: {brief(count)} distinct {full['digits']}-digit values"
            f" needed, only {exist:,} exist (use fewer, or more digits)"
        )


TASKS: dict[str, TaskSpec] = {
    "passkey": task("passkey"),
    **{f"niah_single_{v}": task("niah_single", f"niah_single_{v}", value=v) for v in VALUE_KINDS},
    **{f"niah_multikey_k{k}": task("niah_multikey", f"niah_multikey_k{k}", k=k) for k in (4, 16, 64)},
    "niah_multikey_needles": task("niah_multikey", "niah_multikey_needles", haystack="needles"),
    "niah_multivalue": task("niah_multivalue", "niah_multivalue"),
    "niah_multiquery": task("niah_multiquery", "niah_multiquery"),
    **{f"mqar_n{n}": task("mqar", f"mqar_n{n}", n=n) for n in (16, 64, 256)},
    **{f"variable_tracking_h{h}": task("variable_tracking", f"variable_tracking_h{h}", h=h) for h in (1, 2, 3, 4)},
}


def get_task(name: str, **params: Any) -> TaskSpec:
    """A ready name of TASKS or a family name, with parameters over its own."""
    if name in TASKS and not params:
        return TASKS[name]
    if name in TASKS:
        base = TASKS[name]
        given = {k: v for k, v in base.params if v != FAMILIES[base.family][k]}
        spec = task(base.family, **{**given, **params})
        return TaskSpec(name + ":" + ",".join(f"{k}={v}" for k, v in params.items()), spec.family, spec.params)
    return task(name, **params)


def parse_tasks(text: str) -> list[TaskSpec]:
    """``"niah_multikey:k=4,mqar:n=16,q=8,passkey"`` -> TaskSpecs; a ``p=v`` item belongs to the task before it."""
    found: list[tuple[str, dict[str, str]]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            raise TaskError(f"tasks {brief(text)}: an empty item")
        head, colon, rest = item.partition(":")
        if colon or "=" not in item:
            found.append((head.strip(), {}))
            item = rest.strip()
            if not item:
                continue
        if not found:
            raise TaskError(f"tasks {brief(text)}: parameter {brief(item)} comes before any task name")
        key, eq, value = item.partition("=")
        if not eq or key.strip() in found[-1][1]:
            raise TaskError(f"tasks {brief(text)}: {brief(item)} is not a new param=value of {clip(found[-1][0])}")
        found[-1][1][key.strip()] = value.strip()
    return [get_task(name, **params) for name, params in found]


def repeated_task(specs: list[TaskSpec]) -> str | None:
    """Why ``specs`` hold one task twice, or None: a name twice, or two names of one (family, parameters)
    ("niah_multikey_k16" and "niah_multikey:k=16"); each task's documents, metrics and curriculum are its own."""
    seen: dict[tuple, str] = {}
    names: set[str] = set()
    for s in specs:
        if s.name in names:
            return f"task {brief(s.name)} named twice"
        names.add(s.name)
        other = seen.setdefault((s.family, s.params), s.name)
        if other != s.name:
            return f"{brief(other)} and {brief(s.name)} are the same task; name it once"
    return None


# ------------------------------------------------------------------ pieces


def _value(kind: str, digits: int, rng: np.random.Generator) -> str:
    if kind == "number":
        return str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    if kind == "word":
        return WORDS[int(rng.integers(0, len(WORDS)))]
    hexd = "0123456789abcdef"
    return "-".join("".join(hexd[int(i)] for i in rng.integers(0, 16, size=g)) for g in UUID_GROUPS)


def _distinct(n: int, draw: Callable[[], str], taken: set[str], what: str) -> list[str]:
    """n new strings from ``draw``, none in ``taken`` (which gets them)."""
    out: list[str] = []
    for _ in range(50 * n + 100):
        if len(out) == n:
            return out
        s = draw()
        if s not in taken:
            taken.add(s)
            out.append(s)
    raise TaskError(f"cannot draw {n} distinct {what} (use fewer, or more digits)")


def _words(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """n distinct words of WORDS not in ``taken`` (which gets them)."""
    out = [w for w in (WORDS[int(i)] for i in rng.permutation(len(WORDS))) if w not in taken][:n]
    if len(out) < n:
        raise TaskError(f"cannot draw {n} distinct words: the word list has {len(WORDS)}")
    taken.update(out)
    return out


# ------------------------------------------------------------------ drafts: what a document says


def _fixed(block: list[np.ndarray], groups: list[list[np.ndarray]], ending: Ending, needle=None) -> Draft:
    size = ending.question.size + ending.answer.size
    return Draft(block, size, lambda _segments: ending, groups, needle)


def _name_list(lead: str, names: list[str]) -> list[str]:
    """Pieces of ``lead`` "a, b, c and d? In that order, they are: " (text and values alternating)."""
    parts = [lead]
    for j, name in enumerate(names):
        if j:
            parts.append(" and " if j == len(names) - 1 else ", ")
        parts.append(name)
    return [*parts, "? In that order, they are: "]


def _draft_niah(spec: TaskSpec, P: Pieces, rng: np.random.Generator) -> Draft:
    fam, kind, digits = spec.family, spec["value"], spec["digits"]
    n_keys = spec["k"] if fam == "niah_multikey" else spec["q"] if fam == "niah_multiquery" else 1
    n_vals = spec["v"] if fam == "niah_multivalue" else 1
    n_asked = n_keys if fam == "niah_multiquery" else 1
    taken: set[str] = set()
    needles = spec["haystack"] == "needles"

    def compound() -> str:
        return f"{WORDS[int(rng.integers(0, len(WORDS)))]}-{WORDS[int(rng.integers(0, len(WORDS)))]}"

    keys = _distinct(n_keys, compound, taken, "keys") if needles else _words(n_keys, rng, taken)
    values = [_distinct(n_vals, lambda: _value(kind, digits, rng), taken, f"{kind} values") for _ in keys]

    def fact(key: str, value: str) -> np.ndarray:
        return P(f" One of the special magic {kind}s for ", key, " is: ", value, ". ")

    asked = list(range(n_asked))  # keys are random: the first ones are as good as any
    block = [fact(keys[i], v) for i in asked for v in values[i]]
    groups = [[fact(keys[i], values[i][0])] for i in range(n_asked, n_keys)]
    if fam == "niah_multiquery":
        order = [int(i) for i in rng.permutation(n_asked)]
        question = P(*_name_list(f" What are the special magic {kind}s for ", [keys[i] for i in order]))
        items = [values[i][0] for i in order]
    elif n_vals > 1:
        pre = f" What are all the special magic {kind}s for "
        question = P(pre, keys[0], f"? The special magic {kind}s for ", keys[0], " are: ")
        items = values[0]
    else:
        pre = f" What is the special magic {kind} for "
        question = P(pre, keys[0], f"? The special magic {kind} for ", keys[0], " is: ")
        items = values[0]
    checks = [(P("", v), 1) for v in items]
    answer = P.join(items)
    if len(items) > 1:
        checks.append((answer, 0))
    ending = Ending(list(range(len(block))), question, answer, ", ".join(items), items, checks)

    def needle() -> np.ndarray:
        return fact(
            _distinct(1, compound, taken, "keys")[0],
            _distinct(1, lambda: _value(kind, digits, rng), taken, "values")[0],
        )

    return _fixed(block, groups, ending, needle if needles else None)


def _draft_mqar(spec: TaskSpec, P: Pieces, rng: np.random.Generator) -> Draft:
    n, q, digits = spec["n"], spec["q"], spec["digits"]
    taken: set[str] = set()
    keys = _words(n, rng, taken)
    values = _distinct(n, lambda: _value("number", digits, rng), taken, f"{digits}-digit values")
    block = [P(" ", k, ": ", v, ".") for k, v in zip(keys, values)]
    # The queries repeat q pairs: the q longest pairs bound any choice's length.
    bound = sum(sorted((f.size for f in block), reverse=True)[:q])

    def finish(segments: list[int]) -> Ending:
        # Zoology's queries: "key: value." for q of the pairs, each value right after its key. The last
        # query (the scored one) is a pair of the last segment of pairs, so D counts from there.
        last = [i for i in range(n) if segments[i] == segments[-1]]
        final = int(last[int(rng.integers(0, len(last)))])
        rest = [i for i in range(n) if i != final]
        order = [*(int(i) for i in rng.choice(rest, size=q - 1, replace=False)), final]
        question: list[np.ndarray] = []
        trained: list[tuple[int, int]] = []  # (offset in the tail, length) of each query's value
        at = 0
        for i in order:
            head, value = P(" ", keys[i], ": "), P("", values[i])
            trained.append((at + head.size, value.size))
            piece = [head] if i == final else [head, value, P(".")]
            question += piece
            at += sum(x.size for x in piece)
        checks = [(P("", values[i]), 1) for i in order]
        answer = P("", values[final])
        return Ending(sorted(order), np.concatenate(question), answer, values[final], [values[final]], checks, trained)

    return Draft(block, bound, finish, [])


def _draft_vt(spec: TaskSpec, P: Pieces, rng: np.random.Generator) -> Draft:
    hops, chains, digits = spec["h"], spec["c"] + 1, spec["digits"]
    taken: set[str] = set()
    caps = np.array(list(_CAPS))

    def name() -> str:
        return "".join(rng.choice(caps, size=NAME_LETTERS))

    facts, names, values = [], [], []
    for _ in range(chains):
        value = _distinct(1, lambda: _value("number", digits, rng), taken, "values")[0]
        chain = _distinct(hops + 1, name, taken, "variable names")
        facts.append([P(" VAR ", chain[0], " = ", value, ". ")])
        facts[-1] += [P(" VAR ", b, " = VAR ", a, ". ") for a, b in zip(chain, chain[1:])]
        names.append(chain)
        values.append(value)
    question = P(VT_QUESTION[0], values[0], VT_QUESTION[1])
    answer = P.join(names[0])
    # A name is in its own assignment and in the next one's; the value in the first assignment only.
    checks = [(P("", nm), 1 if j == hops else 2) for j, nm in enumerate(names[0])]
    checks += [(P("", values[0]), 1), (answer, 0)]
    ending = Ending(list(range(hops + 1)), question, answer, ", ".join(names[0]), names[0], checks)
    return _fixed(facts[0], facts[1:], ending)


_DRAFTS = {"mqar": _draft_mqar, "variable_tracking": _draft_vt}


def repeated_filler(tokenizer: PieceTokenizer, n_tokens: int) -> np.ndarray:
    """REPEATED_FILLER over and over: at least ``n_tokens`` plus one whole repeat, so any offset serves."""
    unit = encode_piece(tokenizer, REPEATED_FILLER)
    return np.tile(unit, n_tokens // unit.size + 2)


def make_sample(
    task: TaskSpec | str,
    tokenizer: PieceTokenizer,
    filler: Any,
    segment_len: int,
    distance: int,
    rng: np.random.Generator,
    depth: str | float = "start",
    fact_segment: int | None = None,
) -> dict:
    """One document of ``task`` (a TaskSpec, a name of TASKS or a ``name:param=value,...`` string).

    filler        corpus token ids (1-D array or list of documents; pass one
                  array, filler_stream, when drawing many); unused by haystack=repeat
    distance      D >= 0 segments between the last fact the answer depends on and the question
    depth         'start' | 'middle' | 'end' or a fraction: where the facts sit in their segment
    fact_segment  S fixed: the facts spread over segments 0..S (``task_sizes.fact_segments`` gives
                  the S that holds any draw of a task); None: as few segments as hold this draw's facts
    Returns the passkey sample keys and more (module docstring).
    """
    specs = [task] if isinstance(task, TaskSpec) else parse_tasks(task)
    if len(specs) != 1:
        raise TaskError(f"make_sample: one task, got {task!r}")
    spec = specs[0]
    what = spec.name
    if int(distance) != distance or distance < 0:
        raise TaskError(f"{what}: distance must be an integer >= 0, got {distance}")
    if segment_len < 1:
        raise TaskError(f"{what}: segment_len must be >= 1, got {segment_len}")
    T, D = int(segment_len), int(distance)
    try:
        frac = depth_fraction(depth)
    except DataError as e:
        raise TaskError(f"{what}: {e}") from None
    fixed = None if fact_segment is None else int(fact_segment)
    if fixed is not None and (fixed < 0 or (fixed and spec.family == "passkey")):
        raise TaskError(f"{what}: fact_segment must be >= 0 (0 for passkey), got {fact_segment}")
    repeat = spec["haystack"] == "repeat"
    stream = None if repeat else filler_stream(filler)
    if spec.family == "passkey":
        try:
            s = make_passkey_sample(
                tokenizer, repeated_filler(tokenizer, (D + 1) * T) if repeat else stream, D, depth, T, rng
            )
        except RoundTripError:
            raise  # its own advice: no segment length or distance helps
        except DataError as e:  # the segment too short for the question; "passkey: passkey: ..." said it twice
            raise TaskError(f"{what}: {str(e).removeprefix('passkey: ')}") from None
        q0 = s["answer_start"] - encode_piece(tokenizer, QUESTION).size
        size = sum(encode_piece(tokenizer, t).size for t in (KEY_PREFIX, s["key"], KEY_SUFFIX))
        fact = [s["key_offset"], s["key_offset"] + size]
        s.update(task=what, answer_text=s["key"], values=[s["key"]], n_facts=1, fact_spans=[fact])
        spans = [(s["answer_start"], s["answer_len"])]
        return dict(s, question_start=q0, distance=D, fact_segment=0, n_segments=D + 1, answer_spans=spans)
    P = Pieces(tokenizer)
    for _ in range(100):
        draft = _DRAFTS.get(spec.family, _draft_niah)(spec, P, rng)
        placed, block_at, end, n, S = layout(draft, T, D, frac, rng, what, None if fixed is None else fixed + 1)
        tail = np.concatenate((end.question, end.answer))
        tokens = take_filler(repeated_filler(tokenizer, n) if repeat else stream, n, rng, tokenizer.eos_id)
        for lo, f in placed.items():
            tokens[lo : lo + f.size] = f
        tokens[n - tail.size :] = tail
        if all(count_run(tokens, run) == c + count_run(tail, run) for run, c in end.checks):
            # The filler's text too: in running text a value is often other tokens (" lemon", not "lemon").
            busy = np.zeros(n, dtype=bool)
            busy[n - tail.size :] = True
            for lo, f in placed.items():
                busy[lo : lo + f.size] = True
            if not filler_mentions(tokenizer, tokens, busy, [tokenizer.decode(run.tolist()) for run, _ in end.checks]):
                break
    else:
        raise DataError(f"{what}: could not draw a document whose answer is unique in 100 tries")
    spans = [[block_at[i], block_at[i] + draft.block[i].size] for i in end.relevant]
    q0 = n - tail.size
    trained = [(q0 + off, size) for off, size in end.trained] or [(n - end.answer.size, int(end.answer.size))]
    return dict(
        tokens=np.append(tokens, np.int64(tokenizer.eos_id)),
        answer_start=n - end.answer.size,
        answer_len=int(end.answer.size),
        key=end.answer_text,
        key_offset=spans[-1][0],
        task=what,
        answer_text=end.answer_text,
        values=end.values,
        n_facts=len(placed),
        fact_spans=spans,
        question_start=n - tail.size,
        distance=D,
        fact_segment=S,
        n_segments=S + D + 1,
        answer_spans=trained,
    )
