"""The one typed config tree of a mnemo job.

Precedence: dotted command-line overrides > YAML file > dataclass defaults. A key given
twice in the file is an error (at any depth); given twice on the command line, the last wins.
Every field is declared once, here, with a comment saying what it means.
Unknown keys, wrong types and out-of-range values raise ``ConfigError`` whose
message names the dotted key, before any process is spawned.

Over 500 lines: the whole tree, its defaults and every check are one place on purpose.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mnemo.data_pipeline.errors import DataError, brief, clip
from mnemo.data_pipeline.files import not_a_regular_file, open_regular, read_bounded
from mnemo.data_pipeline.paths import (
    is_remote,
    local_path,
    not_a_dataset_dir,
    not_utf8,
    parse_url,
    remote_output_problem,
    tilde_problem,
    unstreamed_scheme,
)
from mnemo.train.errors import UserError, path_errors
from mnemo.data_pipeline.redact import redact_uri, redact_uri_value


class ConfigError(UserError):
    """A bad config: the message names the key (and file) at fault."""


@dataclass
class RunConfig:
    # Run directory: checkpoints/, logs/, config.yaml, mlflow.db live here.
    dir: str = "runs/debug"
    # Human-readable run name (MLflow run name); empty = basename of run.dir.
    name: str = ""


@dataclass
class DataSourceConfig:
    # MDS directory of this source, written by `mnemo prepare` (local path or remote URL; the first source
    # local: _refuse_remote_first_dataset says why).
    path: str = ""
    # Share of training TOKENS this source supplies (streaming's `proportion`), relative to the others' (>= 0).
    weight: float = 1.0
    # Name in metrics (data/<name>/tokens, data/<name>/share); empty = the last part of path.
    name: str = ""
    # Passes over this source before it drops out (streaming's `repeat`, as a limit); 0 = no limit.
    max_epochs: int = 0


@dataclass
class DataConfig:
    # MDS directory written by `mnemo prepare`: a local path or file:// URL (a remote one is refused: its
    # manifest.json and tokenizer are read locally: _refuse_remote_first_dataset).
    path: str = ""
    # A weighted mixture instead of data.path: a list of {path, weight, name, max_epochs} (docs/streams.md).
    # Exactly one of data.path and data.sources is set; all sources share one tokenizer.
    sources: list[DataSourceConfig] = field(default_factory=list)
    # Tokenizer file (local): a SentencePiece model or a Hugging Face tokenizer.json; empty = the one the
    # dataset holds, <data.path>/tokenizer.model or .json (data.sources: the first source's).
    tokenizer: str = ""
    # Fraction of documents held out for evaluation (chosen by a fixed hash of
    # the sample index, so the split never depends on seed or world size).
    val_fraction: float = 0.01
    # Threads that prefetch upcoming documents for the stream slots.
    num_workers: int = 2
    # Local cache dir for remote sources (data.sources after the first) and for the decompressed shards of
    # local compressed datasets (never written into the dataset dir); empty = <run.dir>/data_cache.
    cache_dir: str = ""


@dataclass
class ShortMemoryConfig:
    # M: tokens of the previous segments each layer attends to (0 = off).
    length: int = 128


@dataclass
class LongMemoryConfig:
    # none | knn (Memorizing-Transformer retrieval).
    kind: Literal["none", "knn"] = "none"
    # N: (key, value) pairs stored per slot and layer (FIFO beyond).
    capacity: int = 4096
    # k: keys retrieved per query.
    topk: int = 16
    # Layers (0-based; negative counts from the end) that have a long-term store.
    layers: list[int] = field(default_factory=lambda: [-2])
    # Initial temperature of the cosine-similarity memory attention.
    temperature_init: float = 10.0
    # How a long-term layer combines the store with local attention: "gate"
    # (a learned per-head gate mixes kNN attention with RoPE local attention)
    # or "joint" (one softmax over retrieved, short-term and segment keys, all
    # scored by cosine similarity, no RoPE in that layer). docs/memory.md.
    mix: Literal["gate", "joint"] = "joint"
    # Each key of a long-term layer mixes in the previous token's key (a
    # learned weight per head), so facts are found by what precedes them.
    smear_keys: bool = True
    # Tokens each query and key of a long-term layer is projected from: the
    # token and the qk_span - 1 before it (1 = the token alone), so a fact is
    # found by the few tokens that name it (docs/many_facts.md).
    qk_span: int = 1
    # With qk_span >= 2: one projection of the span makes both queries and
    # keys, a key from the tokens just before its own, random at the start, so
    # a question ending as a fact's context did finds the fact's next token
    # before any training (docs/memory.md, docs/many_facts.md).
    qk_tied: bool = False
    # Tokens whose values each value of a long-term layer mixes in: the token
    # and the value_span - 1 before it, a learned weight per head and offset
    # (1 = the token alone; the weights start at zero), so a fact found by its
    # last tokens can return what came before them ("VAR QNHIB = 86556.": the
    # name, found by the value; docs/memory.md).
    value_span: int = 1
    # How those weights are chosen: "fixed" (one per head and offset) or
    # "input" (plus a learned linear function of each token's key, zero at
    # the start), so facts of different shapes can each carry their own
    # earlier tokens (needs value_span >= 2; docs/memory.md).
    value_mix: Literal["fixed", "input"] = "fixed"
    # Each earlier token scales its own share of the value span (a learned
    # function of its input, zero at the start): where a fact's name begins
    # hangs on how many tokens the words before it took, which an offset
    # cannot know but the token itself can (needs value_span >= 2;
    # docs/memory.md).
    value_gate: bool = False
    # A pointer from each read to the next, in a joint layer: each query also
    # favours (a learned bias per head and offset, zero at the start) the
    # entries -(pointer-2) .. +1 positions from the one the query before it
    # read most, and those store entries join its candidates, so a name is
    # returned token after token from the place its first token was found
    # (needs mix joint; 0 = off; docs/memory.md).
    pointer: int = 0
    # How the store is searched: "exact" (every stored key scored per query),
    # "blocks" (approximate: per-block summaries first, then the best blocks
    # exactly; cost per query ~ N/256 + 2048 keys) or "ivf" (an inverted file kept
    # in the memory state: per query C centroids + the probed lists' keys + the
    # keys pushed since the index was last sorted). Not a weight: safe to change
    # at resume and at evaluation. docs/memory.md.
    search: Literal["exact", "blocks", "ivf"] = "exact"
    # search "ivf": inverted-file lists each query searches, of about 128 keys each
    # at any store size (probing every list in use is the exact search, run as
    # such). More: higher recall of the exact top-k, proportionally more keys
    # scored (measured on a 1M-token store: recall@16 0.82 at 32, 0.945 at 128,
    # 0.957 at 160, 0.974 at 256; the pass key at 160 segments 0.84 at 32 against
    # exact's 0.96; docs/memory.md). Not a weight either. Equal to model/retrieval.py's
    # IVF_PROBE (tests/unit/test_ivf.py holds them together).
    ivf_probe: int = 160


@dataclass
class MemoryConfig:
    short: ShortMemoryConfig = field(default_factory=ShortMemoryConfig)
    long: LongMemoryConfig = field(default_factory=LongMemoryConfig)
    # k: gradients flow through memory across this many segments; one
    # optimizer step consumes k consecutive segments (1 = detach every step).
    bptt_segments: int = 1


@dataclass
class ModelConfig:
    # Named size from model.sizes.SIZES (debug, small, medium, large, xl).
    size: str = "debug"
    # T: tokens per segment.
    segment_len: int = 128
    # Recompute each block's activations in backward (saves memory).
    activation_checkpointing: bool = False
    # torch.compile the model (GPU only; ignored on CPU).
    compile: bool = False
    # auto = bf16 on CUDA, fp32 on CPU.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # MLP of every block: SwiGLU, or a GELU MLP with the same parameter count.
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    # Weight init: "scaled" (normal 0.02, residual projections / sqrt(2 L));
    # "fan_in" (PyTorch's layer defaults: 1/sqrt(3 fan_in), embeddings N(0, 1)).
    init: Literal["scaled", "fan_in"] = "scaled"
    # Input embedding shared with the LM head: "auto" = the named size's choice.
    embeddings: Literal["auto", "tied", "untied"] = "auto"


@dataclass
class PasskeyTrainConfig:
    # Share of optimizer steps that train on passkey episodes instead of the
    # corpus streams (0 = none; 0.5 alternates). train/episodes.py explains
    # the episode and its curriculum.
    fraction: float = 0.0
    # Max distance D (segments from key to question) when training starts ...
    start_distance: int = 1
    # ... and the most the curriculum raises it to.
    max_distance: int = 8
    # Max D grows by one when the exact match of the last promote_window
    # max-D episode steps averages above promote_exact.
    promote_exact: float = 0.7
    promote_window: int = 5
    # Read the max-D episodes without the short-term memory (models with
    # long-term memory), so that their key must come from the long-term store.
    ltm_only_at_max: bool = False
    # Training documents read (once, at start-up) as the episodes' filler.
    filler_docs: int = 256
    # Facts per episode document: 1 = "The pass key is NNNNN."; K > 1 = each
    # document holds 1..K facts "The pass key of door N is NNNNN." and asks
    # for one of them (the harder variant of `mnemo eval --multikey`).
    max_keys: int = 1
    # Tasks of the episodes (data_pipeline/tasks.py names, `name:param=value`):
    # each episode step draws one (same on every rank), each has its own
    # curriculum on D and on its number of facts (train/episodes.py).
    tasks: list[str] = field(default_factory=lambda: ["passkey"])
    # Their relative frequencies, one > 0 per task (empty = equal).
    task_weights: list[float] = field(default_factory=list)
    # A task whose curriculum has ended (its max D is max_distance and its
    # facts all of its spec's) is drawn this fraction as often as its weight
    # says (1 = no change): the episodes it no longer needs go to the tasks
    # still climbing, while it keeps a share that holds what it learned.
    done_weight: float = 1.0


@dataclass
class SpikeConfig:
    # Loss-spike handling (train/spikes.py, docs/spikes.md): off | log (detect and
    # report only, a dry run) | skip (the step's update is not applied) | rollback
    # (back to the last checkpoint, the data read since then skipped).
    policy: Literal["off", "log", "skip", "rollback"] = "off"
    # A corpus step's loss is a spike when its z-score against the running
    # mean/std is above z ...
    z: float = 6.0
    # ... and it is more than ratio x the running mean.
    ratio: float = 1.2
    # Span in steps of the exponential moving mean and variance.
    window: int = 100
    # Steps observed before a spike can be flagged.
    warmup: int = 50
    # Also watch the gradient norm (seen only after its update: log or rollback).
    grad_norm: bool = False
    # Rollbacks in a row (none past the previous one's step) before the run stops with an error.
    max_rollbacks: int = 3


@dataclass
class TrainConfig:
    # B: stream slots (sequences) per rank.
    batch_size: int = 8
    # Sequences (stream slots) per optimizer step across the job; gradient
    # accumulation micro-steps = global_batch_size / (world size x batch_size),
    # which must divide. 0 = world size x batch_size (no accumulation). Kept
    # when a run resumes on another world size (the accumulation changes).
    global_batch_size: int = 0
    max_steps: int = 100
    # Token budget: > 0 replaces train.max_steps (then ignored) by
    # ceil(max_tokens / (global batch x model.segment_len x memory.bptt_segments));
    # the LR schedule ends there. 0 = train.max_steps decides.
    max_tokens: int = 0
    lr: float = 1e-3
    # Final LR of the cosine schedule, as a fraction of train.lr.
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    # Stop training after this many seconds (0 = no limit); a checkpoint is
    # written before stopping.
    max_time_s: float = 0.0
    # With train.max_time_s > 0: when the steps left will not fit in the time
    # left (measured every few steps), the cosine is shortened to end about
    # where the time limit comes, so a run the limit stops still ends with a
    # decayed learning rate (train/schedule.py DecayFit). false = the schedule
    # is the steps' alone; either way a run that fits in its time is unchanged.
    decay_within_time: bool = False
    # What a NaN/inf loss or gradient norm does: stop the run (nothing of that
    # step is saved), or skip the optimizer step.
    nan_policy: Literal["stop", "skip"] = "stop"
    # auto = cuda if available, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Loss weight of synthetic passkey answer tokens (1 = plain LM loss).
    answer_weight: float = 1.0
    # Loss weight of the other tokens of a document that has an answer span
    # (passkey filler: random corpus slices glued together), and of the
    # filler of passkey episodes; 0 trains them on their answers only
    # (docs/demo.md has what each setting did). Corpus documents weigh 1.
    answer_context_weight: float = 1.0
    # Episodic passkey training beside the corpus (the answer is weighted
    # answer_weight, the rest of the episode answer_context_weight).
    passkey: PasskeyTrainConfig = field(default_factory=PasskeyTrainConfig)
    # Loss-spike detection and recovery (default off).
    spike: SpikeConfig = field(default_factory=SpikeConfig)


@dataclass
class ZeroConfig:
    # DeepSpeed ZeRO stage: 1, 2 or 3.
    stage: int = 2
    # Build the model inside deepspeed.zero.Init (ZeRO-3 only) so that a large
    # model is never materialized whole on one rank.
    init_partitioned: bool = True


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps (0 = only at the end / on preemption).
    interval: int = 50
    # Keep the newest K complete checkpoints.
    keep: int = 2
    # Also keep every checkpoint whose step is a multiple of this (0 = none).
    keep_every: int = 0
    # auto (newest valid checkpoint of run.dir) | never | PATH to a checkpoint (empty is refused).
    resume: str = "auto"
    # Load through DeepSpeed's universal checkpoint format: auto = when the
    # world size or ZeRO stage differs from the checkpoint's.
    load_universal: Literal["auto", "always", "never"] = "auto"
    # Seconds a preempted job (SIGTERM/SIGUSR1) has to save and exit.
    grace_period_s: float = 120.0
    # Seconds a collective may hang before the job aborts.
    collective_timeout_s: float = 600.0


@dataclass
class TrackingConfig:
    # MLflow tracking URI; empty = $MLFLOW_TRACKING_URI or sqlite:///<run.dir>/mlflow.db.
    uri: str = ""
    # Experiment; empty = $MLFLOW_EXPERIMENT_NAME or "mnemo".
    experiment: str = ""
    enabled: bool = True
    # Peak FLOP/s of one device for MFU; 0 = known GPU table, none on CPU.
    peak_flops: float = 0.0


@dataclass
class EvalConfig:
    # Evaluate every N steps during training (0 = only at the end).
    interval: int = 0
    # Held-out documents read for loss-by-position (0 = none: the in-run evaluation is skipped with a warning,
    # passkey and tasks too, which take their filler from these documents).
    max_docs: int = 32
    # Tokens per held-out document at most (longer ones are cut).
    max_doc_tokens: int = 8192
    # Passkey trials per distance (0 = skip passkey evaluation).
    passkey_trials: int = 0
    # Distances D (in segments) between passkey and question.
    passkey_distances: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # Long-context tasks scored at each evaluation (names of mnemo.data_pipeline.tasks, each may take
    # parameters: "niah_multikey:k=4"); empty = none. MLflow: eval/task/<name>/d<D>/exact (+ _lo, _hi).
    tasks: list[str] = field(default_factory=list)
    # Distances D (in segments) between the last fact and the question of each task.
    task_distances: list[int] = field(default_factory=lambda: [1, 8])
    # Documents per task and distance.
    task_trials: int = 100


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Start a NEW run from these weights (an export dir, a checkpoint or a run dir: its newest):
    # fresh optimizer, step 0, new MLflow run tagged with the parent's id; empty = from scratch.
    init_from: str = ""


# --------------------------------------------------------------------------- #
# Loading


def _clip(text: str) -> str:
    """``text`` (a key, another module's message) for an error message: credentials hidden, then cut."""
    return clip(redact_uri(text))


def _brief(value: Any) -> str:
    """repr(value) for an error message: bounded, credentials in URIs hidden (data_pipeline/errors.py)."""
    return brief(value, hide=redact_uri)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# An integer as the command line writes it: ASCII digits, maybe grouped by "_" (as YAML and int() read them),
# one optional sign (str.isdigit() also takes "²" and other digits int() refuses; lstrip("+-") took "+-5").
_INT_TEXT = re.compile(r"[+-]?[0-9]+(_[0-9]+)*", re.ASCII)
# Number text that YAML 1.1 reads in another base, which int()/float() on the command line read otherwise or
# not at all: 010 (octal 8; int("010") is 10), 0b11, 0x10, 0o10, and base 60 (1:30 is 90, 1:30.0 is 90.0).
# Refused in a number field wherever written, so that one text has one meaning.
_NOT_DECIMAL = re.compile(r"[+-]?(0[0-9_]+|0[bBoOxX][0-9a-fA-F_]*|[0-9][0-9_]*(:[0-9_]*)+(\.[0-9_]*)?)", re.ASCII)


def _number(value: Any) -> float | None:
    """``value`` as a float (int, float, or ASCII number text such as "1e-3", "1_000", "inf"), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, str) and not value.isascii():  # float() reads "٣" as 3.0
        return None
    try:
        return float(value)
    except ValueError:
        return None
    except OverflowError:  # an int past float's range (10**400): a number, not a finite one
        return math.inf if value > 0 else -math.inf


def _yaml_problem(e: yaml.YAMLError, text: str, file: bool = False) -> str:
    """What a YAML error in ``text`` says, on one line: where and the problem ("line 3, column 7: ...").

    ``file``: always name the line; else (a command-line value) only when the value has several.
    """
    if isinstance(e, yaml.reader.ReaderError):  # a control character: PyYAML gives its offset
        line = text.count("\n", 0, e.position)
        column = e.position - (text.rfind("\n", 0, e.position) + 1)
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        problem = f"unacceptable character {char}: {e.reason}"
    elif isinstance(e, yaml.MarkedYAMLError) and e.problem and e.problem_mark is not None:
        line, column, problem = e.problem_mark.line, e.problem_mark.column, e.problem
        if e.context and problem.startswith("but "):  # "expected a single document in the stream but found ..."
            problem = f"{e.context} {problem}"
    else:
        return " ".join(str(e).split())
    if file or line > 0:
        return f"line {line + 1}, column {column + 1}: {problem}"
    return f"column {column + 1}: {problem}"


_YAML = "tag:yaml.org,2002:"
# Values (scalars, lists, mappings) a config's YAML may hold once its aliases are expanded: a
# shipped config has ~50, a mixture of 1000 sources ~10000. Anchors and aliases are fine; a
# "billion laughs" (each level aliasing the previous one 9 times) is refused in milliseconds.
_MAX_YAML_NODES = 100_000
# The YAML types a config value is made of; other tags build what no field means: bytes
# (!!binary: run.dir became "b'hello'"), dates (!!timestamp), sets, ordered pairs.
_PLAIN_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class _YamlInt(int):
    """An integer read from YAML, with the text written (``text``): YAML 1.1 reads unquoted ``1:30`` as 90
    (base 60), ``0x10`` as 16 and ``0123`` as 83 (octal), and a field of type str keeps what was written."""

    text: str


class _YamlFloat(float):
    """A float read from YAML, with the text written (``text``): ``1.10`` is the name "1.10", not "1.1"."""

    text: str


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    if node.tag == _YAML + "int":
        out: Any = _YamlInt(loader.construct_yaml_int(node))
    else:
        out = _YamlFloat(loader.construct_yaml_float(node))
    out.text = node.value
    return out


# The tags whose scalars PyYAML's constructors parse (a text that does not fit raised from inside them).
_TYPED_TAGS = frozenset(_YAML + t for t in ("bool", "int", "float", "null"))


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, refusing what a config never means: a key given twice in one mapping
    (at any depth; plain YAML keeps the last, so a second ``train:`` section would silently
    replace the first one whole), and a tag outside ``_PLAIN_TAGS``. Keys given beside a merge
    (``<<: *base``) override the merged ones, as YAML says. Unquoted text that YAML 1.1 reads as a
    date (2024-01-01) or as its "=" value stays the text written; numbers keep their text for
    fields of type str (``_YamlInt``). Errors name the dotted key (after ``base``) and, in a file, the line.
    """

    base = ""  # dotted key the text is the value of ("" = a whole config file)
    file = False  # the text is a file: errors name the line
    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in (_YAML + "timestamp", _YAML + "value")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    composed = 0

    def compose_node(self, parent, index):
        # A literal list of millions of items took minutes to parse before _check counted it. Each value
        # has at most one key beside it, so more than twice the limit composed is more than it expanded.
        self.composed += 1
        if self.composed > 2 * _MAX_YAML_NODES:
            self._refuse(self.peek_event().start_mark.line + 1, f"more than {_MAX_YAML_NODES} values")
        return super().compose_node(parent, index)

    def construct_document(self, node):
        self._check(node)
        return super().construct_document(node)

    def _check(self, root: yaml.Node) -> None:
        stack = [(root, self.base)]
        visited = 0
        while stack:
            node, path = stack.pop()
            # Each alias is walked again where it is used: the walk sees the tree as expanded.
            visited += 1
            if visited > _MAX_YAML_NODES:
                self._refuse(
                    node.start_mark.line + 1,
                    f"{_clip(path) or 'top level'}: more than {_MAX_YAML_NODES} values once YAML aliases are expanded",
                )
            self._check_tag(node, path)
            if node.tag == _YAML + "int" and len(node.value) > 1000:  # int() reads 4300 digits at most
                self._refuse(node.start_mark.line + 1, f"{_clip(path)}: an integer of {len(node.value)} characters")
            if isinstance(node, yaml.SequenceNode):
                stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for k, v in node.value:
                    if k.tag == _YAML + "merge":
                        stack.append((v, path))
                        continue
                    name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                    dotted = f"{path}.{name}" if path else str(name)
                    self._check_tag(k, dotted)
                    ident = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else id(k)
                    line = k.start_mark.line + 1
                    if ident in first_line:
                        self._refuse(line, f"duplicate key {_brief(dotted)} (first at line {first_line[ident]})")
                    first_line[ident] = line
                    stack.append((v, dotted))

    def _check_tag(self, node: yaml.Node, path: str) -> None:
        tag = "!!" + node.tag.removeprefix(_YAML) if node.tag.startswith(_YAML) else node.tag
        if node.tag not in _PLAIN_TAGS:
            self._refuse(
                node.start_mark.line + 1,
                f"{_clip(path) or 'top level'}: YAML tag {_brief(tag)} is not allowed in a config "
                "(values are strings, numbers, true/false, null, lists and mappings)",
            )
        if isinstance(node, yaml.ScalarNode) and node.tag in _TYPED_TAGS:
            # An explicit tag on text it does not fit (`!!bool 1`, `!!int x`) was a KeyError or ValueError
            # traceback from PyYAML's constructors. A whole number may be tagged !!float.
            found = self.resolve(yaml.ScalarNode, node.value, (True, False))
            if found != node.tag and (node.tag, found) != (_YAML + "float", _YAML + "int"):
                self._refuse(
                    node.start_mark.line + 1,
                    f"{_clip(path) or 'top level'}: {_brief(node.value)} is not a value of YAML tag {tag}",
                )

    def _refuse(self, line: int, msg: str) -> None:
        raise ConfigError(f"line {line}: {msg}" if self.file else msg)


_ConfigLoader.add_constructor(_YAML + "int", _construct_number)
_ConfigLoader.add_constructor(_YAML + "float", _construct_number)


def _load_yaml(text: str, base: str = "", file: bool = False) -> Any:
    """``text`` parsed by ``_ConfigLoader``: YAMLError for bad syntax, ConfigError for what it refuses."""
    loader = _ConfigLoader(text)
    loader.base, loader.file = base, file
    try:
        return loader.get_single_data()
    except RecursionError:  # PyYAML composes nested nodes recursively: [[[[...]]]] a few hundred deep
        raise ConfigError(f"{_clip(base) + ': ' if base else ''}YAML nested too deeply") from None
    finally:
        loader.dispose()


def _yaml_value(text: str, key: str) -> Any:
    """A value given as YAML text on the command line ("[1, 3]"), or ConfigError naming the key."""
    try:
        return _load_yaml(text, base=key)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: invalid YAML {_brief(text)} ({_clip(_yaml_problem(e, text))})") from None


def _whole_decimal(text: str) -> int | None:
    """The whole number a decimal text like '1e3' or '9007199254740993.0' writes, exactly (float() rounds
    past 2**53); None for anything else (other forms, fractions, more than 40 digits before the point)."""
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text.strip(), re.ASCII):
        return None
    try:
        d = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        return None
    if not d.is_finite() or d.adjusted() > 40 or d != d.to_integral_value():
        return None
    return int(d)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {_brief(value)} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, typing.List):
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "[1, 3]" from the command line: a YAML flow list
            value = _yaml_value(value, key) if value.strip() else []
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_brief(value)}")
        if dataclasses.is_dataclass(item_tp):  # a list of small sections (data.sources): unknown keys name the item
            return [_build(item_tp, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported")  # none declared
    if tp is bool:
        if isinstance(value, bool):
            return value
        # The words YAML reads as booleans, in any case, and 1 / 0 as written (the command line took "0" while
        # `enabled: 0` in the file, a YAML number, was an error): the same text means the same in both places.
        text = getattr(value, "text", value)  # a YAML number's text as written
        if isinstance(text, int) and not isinstance(text, bool):
            text = str(text)
        if isinstance(text, str) and text.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(text, str) and text.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {_brief(text)}")
    text = getattr(value, "text", value)  # a YAML number's text as written, or a command-line value
    if tp in (int, float) and isinstance(text, str) and _NOT_DECIMAL.fullmatch(text.strip()):
        raise ConfigError(
            f"{key}: {_brief(text)} is not a decimal number (YAML 1.1 reads a leading 0 as octal, 0b/0x as binary/"
            "hex and 1:30 as base 60): write the number in decimal"
        )
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {_brief(value)}")
        if isinstance(value, int):
            # The file's text by the command line's rule: YAML 1.1 also reads 1_ and 1__0 (as 1 and 10).
            if isinstance(text, str) and not _INT_TEXT.fullmatch(text.strip()):
                raise ConfigError(f"{key}: expected an integer, got {_brief(text)}")
            return int(value)  # a plain int, not the _YamlInt read from the file
        if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
            try:
                return int(value)  # exactly: float() would round past 2**53
            except ValueError:  # more digits than int() reads (4300)
                raise ConfigError(f"{key}: expected an integer, got {_brief(value)}") from None
        exact = _whole_decimal(text) if isinstance(text, str) else None  # 9007199254740993.0, 1e3: exactly
        if exact is not None:
            return exact
        f = _number(value)
        if f is None or not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {_brief(value)}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {_brief(value)}")
        f = _number(value)
        if f is None:
            raise ConfigError(f"{key}: expected a number, got {_brief(value)}")
        if not math.isfinite(f):  # no field means anything by nan or inf (0 is "no limit" where there is one)
            raise ConfigError(f"{key}: expected a finite number, got {_brief(value)}")
        return f
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML reads unquoted yes/no/on/off/true/false as booleans
            raise ConfigError(f"{key}: expected a string, got {_brief(value)} (quote the text)")
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key}: expected a string, got {_brief(value)}")
        # A number written unquoted in the file stays the text written (run.dir: 1:30 is "1:30", not "90").
        text = str(getattr(value, "text", value))
        if "\0" in text:  # no path, URI or name holds one: os.stat raised a bare "embedded null byte" ValueError
            raise ConfigError(f"{key}: {_brief(text)} contains a NUL character")
        return text
    raise ConfigError(f"{key}: unsupported type {tp}")


class _Override(str):
    """A value given on the command line (``key=value``): an error in it names the override, not the file."""


class _OverrideError(ConfigError):
    """A ConfigError in a command-line override (load_config does not blame the config file for it)."""


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{_clip(prefix.rstrip('.')) or 'config'}: expected a mapping, got {_brief(data)}")
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in types_:
            raise ConfigError(f"unknown config key '{_clip(key)}' (known: {', '.join(sorted(types_))})")
        tp = types_[k]
        if dataclasses.is_dataclass(tp):
            # An empty section ("train:" alone) is null: all defaults. A scalar or a list is an error
            # (it was read as empty: "train: 0" dropped every train key without a word).
            kwargs[k] = _build(tp, {} if v is None else v, key + ".")
        elif isinstance(v, _Override):
            try:
                kwargs[k] = _coerce(str(v), tp, key)
            except ConfigError as e:
                msg = str(e)
                raise _OverrideError(f"override {msg}" if msg.startswith(key) else f"override {key}: {msg}") from None
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: str) -> None:
    """Place a CLI override into the raw tree, checking the key exists."""
    parts = dotted.split(".")
    cls = Config
    node = tree
    for i, part in enumerate(parts):
        types_ = _field_types(cls)
        if part not in types_:
            raise ConfigError(
                f"override {_clip(dotted)}: unknown config key '{_clip('.'.join(parts[: i + 1]))}'"
                f" (known: {', '.join(sorted(types_))})"
            )
        tp = types_[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(tp):
            if last:
                raise ConfigError(f"override {_clip(dotted)}: is a section; set one of its keys")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                return  # the file gives this section a scalar or a list: _build names it (and the file)
            node = child
            cls = tp
        else:
            if not last:
                raise ConfigError(f"override {_clip(dotted)}: '{_clip('.'.join(parts[: i + 1]))}' is not a section")
            node[part] = _Override(value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {_brief(o)} is not of the form dotted.key=value")
        k, v = o.split("=", 1)
        out.append((k.strip(), v))
    return out


# The most bytes of a config file read: the largest recipe is a few KiB; every other file mnemo reads has a bound.
MAX_CONFIG_BYTES = 16 << 20


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load YAML (if given), apply dotted overrides, validate. Raises ConfigError."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        try:  # read_bounded looks first: a directory, FIFO (never waited on) or device (/dev/zero) is named as such
            raw = read_bounded(p, MAX_CONFIG_BYTES)  # a 3 GiB file was read whole (6.3 GB resident) before its error
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except OSError as e:  # NotRegularFile's message says what it is ("a directory, not a file")
            # Named as the key, the path cut (a name too long is the reason: printing it whole buries that).
            raise ConfigError(f"config file: {clip(redact_uri(str(p)))}: cannot read: {e.strerror or e}") from None
        try:
            text = raw.decode("utf-8")  # YAML is UTF-8 here, whatever the locale says
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ConfigError(
                f"{p}: not UTF-8 text (line {line}: byte 0x{raw[e.start]:02x} at offset {e.start})"
            ) from None
        try:
            tree = _load_yaml(text, file=True)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML ({_yaml_problem(e, text, file=True)})") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
        if tree is None:  # an empty (or comments-only) file: all defaults. 0, false, [] and "" are not empty.
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping (section: key: value), got {_brief(tree)}")
    file_keys = set(_dotted_keys(tree))
    given = parse_overrides(overrides or [])
    for k, v in given:
        _set_dotted(tree, k, v)
    try:
        cfg = _build(Config, tree, "")
    except _OverrideError as e:
        raise ConfigError(str(e)) from None
    except ConfigError as e:  # from a value of the file
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    try:
        validate(cfg)
        validate_start(cfg)
    except ConfigError as e:  # say where the key at fault was given, as the type errors above do
        msg = str(e)
        # The key the value was given as: a list's item or its field is given with the list (data.sources[0].weight)
        key = re.sub(r"\[\d+\].*$", "", msg.split(":", 1)[0])
        if key in {k for k, _ in given}:
            msg = f"override {msg}"
        elif path is not None and key in file_keys:
            msg = f"{path}: {msg}"
        raise ConfigError(msg) from None
    return cfg


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """The dotted keys a raw YAML tree sets (sections and leaves; lists are leaves)."""
    out = []
    for k, v in tree.items():
        out.append(f"{prefix}{k}")
        if isinstance(v, dict):
            out.extend(_dotted_keys(v, f"{prefix}{k}."))
    return out


# The most segments one optimizer step may read with gradients through memory (memory.bptt_segments): the step
# holds all k batches and keeps every segment's activations until its backward, so k beyond a thousand is
# a typo, not a recipe (10**9 grew a rank to 20 GB reading batches, with no error, until the machine was full).
MAX_BPTT_SEGMENTS = 1024


# The largest whole number any key takes (train.seed aside: [0, 2**64)): a C int64, what torch, numpy and the
# schedule's float arithmetic take. 1 followed by 400 zeros passed validation and was an OverflowError in a rank
# (train.max_tokens in the schedule, train.spike.window as a float), after run.dir was written to.
MAX_INT = 2**63 - 1


def int_values(cfg: Any, prefix: str = "") -> list[tuple[str, int]]:
    """(dotted key, value) of every whole number of ``cfg`` (a Config or one of its sections), list items and
    the items of lists of sections (data.sources) included: ``memory.long.layers[0]``."""
    out: list[tuple[str, int]] = []
    for name, tp in _field_types(type(cfg)).items():
        key, value = f"{prefix}{name}", getattr(cfg, name)
        if dataclasses.is_dataclass(tp):
            out += int_values(value, key + ".")
        elif tp is int:
            out.append((key, value))
        elif typing.get_origin(tp) is list:
            (item_tp,) = typing.get_args(tp)
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item_tp):
                    out += int_values(item, f"{key}[{i}].")
                elif item_tp is int:
                    out.append((f"{key}[{i}]", item))
    return out


def _need(cond: bool, key: str, msg: str) -> None:
    """A rule of ``validate`` / ``validate_start``: ConfigError "KEY: MSG" unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate_start(cfg: Config) -> None:
    """Rules of key pairs that hold for a run being started (`load_config`), not for a checkpoint's saved config
    (``from_dict``): a checkpoint whose config breaks one, saved before the rule, still loads for eval or export."""
    need = _need
    # A resume from a named checkpoint loads its weights, optimizer and step: init_from went unread. With auto,
    # init_from starts the run and a relaunch goes on from the run's own checkpoints (its weights are in them).
    need(
        not cfg.init_from or cfg.checkpoint.resume in ("auto", "never", ""),  # "": refused by check_paths
        "init_from",
        f"{_brief(cfg.init_from)} with checkpoint.resume={_brief(cfg.checkpoint.resume)}: a resume loads that"
        " checkpoint's weights, so init_from would go unread; use one of them (checkpoint.resume=never or auto"
        " with init_from, or init_from= to resume)",
    )
    # An empty list scored nothing without a word (the tasks' accuracy plot drawn empty, with a warning).
    need(
        cfg.eval.passkey_trials == 0 or bool(cfg.eval.passkey_distances),
        "eval.passkey_distances",
        "must name at least one distance while eval.passkey_trials > 0 (0 = no passkey evaluation)",
    )
    need(
        not cfg.eval.tasks or bool(cfg.eval.task_distances),
        "eval.task_distances",
        "must name at least one distance while eval.tasks names tasks (empty = no task evaluation)",
    )


def validate(cfg: Config) -> None:
    """Range and consistency checks that need no files."""
    from mnemo.model.sizes import MAX_COUNT, SIZES, arg_problem, count_problem

    need = _need

    def count(key: str, value: int, low: int, high: int, why: str = "") -> None:
        problem = count_problem(value, low, high, why)
        need(problem is None, key, problem or "")

    # First: the checks below compute with these and quote them (a key's own, tighter bound is named from there up).
    for key, value in int_values(cfg):
        if key != "train.seed":  # its own range, below
            count(key, value, -MAX_INT, MAX_INT)
    need(cfg.model.size in SIZES, "model.size", f"unknown size {_brief(cfg.model.size)} (known: {', '.join(SIZES)})")
    count("model.segment_len", cfg.model.segment_len, 1, MAX_COUNT)
    # The model's numbers: the bounds ModelArgs checks in a model_args.json (model/sizes.py ARG_RANGES).
    lm = cfg.memory.long
    model_args = {
        "memory.short.length": ("stm_length", cfg.memory.short.length),
        "memory.long.temperature_init": ("ltm_temperature_init", lm.temperature_init),
        "memory.long.qk_span": ("ltm_qk_span", lm.qk_span),
        "memory.long.value_span": ("ltm_value_span", lm.value_span),
        "memory.long.pointer": ("ltm_pointer", lm.pointer),
        "memory.long.ivf_probe": ("ltm_ivf_probe", lm.ivf_probe),
    }
    if lm.kind != "none":  # unused without long-term memory
        model_args.update(
            {"memory.long.capacity": ("ltm_capacity", lm.capacity), "memory.long.topk": ("ltm_topk", lm.topk)}
        )
    for key, (name, value) in model_args.items():
        problem = arg_problem(name, value)
        need(problem is None, key, problem or "")
    need(
        not lm.qk_tied or lm.qk_span >= 2,
        "memory.long.qk_tied",
        f"needs memory.long.qk_span >= 2 (it is {lm.qk_span}: one token's query and key have no span to share)",
    )
    # A smeared key mixes in the previous token's key, whose window is one token older: the match the tie makes
    # at the start was lost in 3 heads of 4 (docs/memory.md).
    need(
        not lm.qk_tied or not lm.smear_keys,
        "memory.long.qk_tied",
        "needs memory.long.smear_keys: false (a smeared key mixes in the previous token's window and blurs the"
        " tied match)",
    )
    need(
        lm.value_mix == "fixed" or lm.value_span >= 2,
        "memory.long.value_mix",
        f"{lm.value_mix!r} needs memory.long.value_span >= 2 (it is {lm.value_span}: one token's value has nothing"
        " to mix)",
    )
    need(
        not lm.value_gate or lm.value_span >= 2,
        "memory.long.value_gate",
        f"needs memory.long.value_span >= 2 (it is {lm.value_span}: one token's value has nothing to mix)",
    )
    need(
        lm.pointer != 1 and (lm.pointer == 0 or lm.mix == "joint"),
        "memory.long.pointer",
        "must be 0 (off), or >= 2 with memory.long.mix joint",
    )
    count("memory.bptt_segments", cfg.memory.bptt_segments, 1, MAX_BPTT_SEGMENTS)
    if lm.kind != "none":
        need(lm.topk <= lm.capacity, "memory.long.topk", "must be <= memory.long.capacity")
        n_layers = SIZES[cfg.model.size].n_layers
        seen: dict[int, int] = {}
        for i, layer in enumerate(lm.layers):
            need(
                -n_layers <= layer < n_layers,
                f"memory.long.layers[{i}]",
                f"layer {layer} out of range for {n_layers}-layer size {cfg.model.size!r}",
            )
            # -1 and n_layers - 1 are the same layer: one store each, so no layer twice.
            need(
                layer % n_layers not in seen,
                f"memory.long.layers[{i}]",
                f"layer {layer} is also memory.long.layers[{seen.get(layer % n_layers)}]",
            )
            seen[layer % n_layers] = i
        need(len(lm.layers) > 0, "memory.long.layers", "must name at least one layer")
    count("train.batch_size", cfg.train.batch_size, 1, MAX_COUNT)
    # A token budget sets the step count (train/schedule.py total_steps) and max_steps goes unused: 0 is fine.
    need(
        cfg.train.max_steps >= (0 if cfg.train.max_tokens > 0 else 1),
        "train.max_steps",
        "must be >= 1 (or 0 with a train.max_tokens budget)",
    )
    need(cfg.train.max_tokens >= 0, "train.max_tokens", "must be >= 0 (0 = train.max_steps decides)")
    gb, b = cfg.train.global_batch_size, cfg.train.batch_size
    need(gb >= 0, "train.global_batch_size", "must be >= 0 (0 = world size x train.batch_size)")
    need(gb % max(1, b) == 0, "train.global_batch_size", f"{gb} is not a multiple of train.batch_size {b}")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(0 <= cfg.train.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    need(cfg.train.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    need(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    # AdamW's moment decay rates: 1 or more never forgets (and divides by 1 - beta**t = 0).
    need(0 <= cfg.train.beta1 < 1, "train.beta1", "must be in [0, 1)")
    need(0 <= cfg.train.beta2 < 1, "train.beta2", "must be in [0, 1)")
    # torch.manual_seed takes [0, 2**64); numpy's default_rng refuses negative seeds.
    need(0 <= cfg.train.seed < 2**64, "train.seed", "must be in [0, 2**64)")
    need(cfg.train.max_time_s >= 0, "train.max_time_s", "must be >= 0 (0 = no limit)")
    need(cfg.train.log_interval >= 1, "train.log_interval", "must be >= 1")
    need(cfg.train.grad_clip >= 0, "train.grad_clip", "must be >= 0")
    need(cfg.train.answer_weight > 0, "train.answer_weight", "must be > 0")
    need(cfg.train.answer_context_weight >= 0, "train.answer_context_weight", "must be >= 0")
    sp = cfg.train.spike
    need(sp.z > 0, "train.spike.z", "must be > 0")
    need(sp.ratio >= 1, "train.spike.ratio", "must be >= 1 (a spike lies above the running mean)")
    need(sp.window >= 1, "train.spike.window", "must be >= 1")
    need(sp.warmup >= 2, "train.spike.warmup", "must be >= 2 (a variance needs two values)")
    need(sp.max_rollbacks >= 1, "train.spike.max_rollbacks", "must be >= 1")
    need(
        not (sp.grad_norm and sp.policy == "skip"),
        "train.spike.grad_norm",
        "a gradient-norm spike is seen after its update: use train.spike.policy=rollback or log",
    )
    pk = cfg.train.passkey
    need(0 <= pk.fraction <= 1, "train.passkey.fraction", "must be in [0, 1]")
    need(pk.start_distance >= 0, "train.passkey.start_distance", "must be >= 0")
    need(pk.max_distance >= pk.start_distance, "train.passkey.max_distance", "must be >= train.passkey.start_distance")
    need(0 <= pk.promote_exact < 1, "train.passkey.promote_exact", "must be in [0, 1)")
    need(pk.promote_window >= 1, "train.passkey.promote_window", "must be >= 1")
    need(pk.filler_docs >= 1, "train.passkey.filler_docs", "must be >= 1")
    need(pk.max_keys >= 1, "train.passkey.max_keys", "must be >= 1")
    from mnemo.data_pipeline.tasks import parse_tasks

    try:
        specs = parse_tasks(",".join(pk.tasks)) if pk.tasks else []
    except ValueError as e:
        raise ConfigError(f"train.passkey.tasks: {_brief(pk.tasks)}: {_clip(str(e))}") from None
    need(bool(specs), "train.passkey.tasks", "must name at least one task")
    refuse_repeated_task(specs, "train.passkey.tasks")
    refuse_unfit_tasks(specs, "train.passkey.tasks", cfg.model.segment_len, pk.max_distance, episodes=True)
    if pk.fraction > 0 and lm.kind != "none":
        # An episode's question segment reads a key written (S + D) segments before it, S >= 0 (0 for the
        # pass key: docs/memory.md); a FIFO store of fewer than D x T entries has always evicted it.
        need(
            pk.max_distance * cfg.model.segment_len <= lm.capacity,
            "train.passkey.max_distance",
            f"{pk.max_distance} segments of model.segment_len {cfg.model.segment_len} need a long-term store of at"
            f" least {pk.max_distance * cfg.model.segment_len} entries, more than memory.long.capacity"
            f" {lm.capacity} (the key would always be evicted): lower it or raise the capacity",
        )
    need(
        not pk.task_weights or (len(pk.task_weights) == len(specs) and all(w > 0 for w in pk.task_weights)),
        "train.passkey.task_weights",
        f"{_brief(pk.task_weights)}: one weight > 0 per task of train.passkey.tasks ({len(specs)}), or empty",
    )
    need(0 < pk.done_weight <= 1, "train.passkey.done_weight", f"must be in (0, 1], got {pk.done_weight}")
    need(cfg.zero.stage in (1, 2, 3), "zero.stage", f"must be 1, 2 or 3, got {cfg.zero.stage}")
    need(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.checkpoint.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    # SLURM's --signal=B:USR1@N takes at most 65535 s.
    need(0 < cfg.checkpoint.grace_period_s <= 65535, "checkpoint.grace_period_s", "must be in (0, 65535]")
    # A timeout is added to a nanosecond clock (int64, ~292 years): keep it far below that.
    need(0 < cfg.checkpoint.collective_timeout_s <= 1e9, "checkpoint.collective_timeout_s", "must be in (0, 1e9]")
    need(cfg.tracking.peak_flops >= 0, "tracking.peak_flops", "must be >= 0 (0 = known GPU table)")
    need(cfg.eval.interval >= 0, "eval.interval", "must be >= 0")
    need(cfg.eval.max_docs >= 0, "eval.max_docs", "must be >= 0")
    need(cfg.eval.max_doc_tokens >= 1, "eval.max_doc_tokens", "must be >= 1")
    need(cfg.eval.passkey_trials >= 0, "eval.passkey_trials", "must be >= 0 (0 = no passkey evaluation)")
    need(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    validate_sources(cfg)
    need(bool(cfg.run.dir), "run.dir", "must not be empty")
    need(all(d >= 1 for d in cfg.eval.passkey_distances), "eval.passkey_distances", "must be >= 1")
    need(all(d >= 0 for d in cfg.eval.task_distances), "eval.task_distances", "must be >= 0")
    # Each distance D in use builds whole documents of (D + 1) x T tokens or more (check_passkey_eval_fit builds
    # one before any rank starts): 10**30 was numpy's "maximum allowed dimension exceeded", 10**8 asked for 95 GiB.
    ev = cfg.eval
    in_use = [("train.passkey.max_distance", pk.max_distance)] if pk.fraction > 0 else []  # start_distance: no more
    if ev.passkey_trials > 0:
        in_use += [(f"eval.passkey_distances[{i}]", d) for i, d in enumerate(ev.passkey_distances)]
    if ev.tasks:
        in_use += [(f"eval.task_distances[{i}]", d) for i, d in enumerate(ev.task_distances)]
    document_fits(in_use, cfg.model.segment_len)
    need(cfg.eval.task_trials >= 1, "eval.task_trials", "must be >= 1")
    if cfg.eval.tasks:  # the task generators (numpy): imported only when tasks are named
        from mnemo.data_pipeline.tasks import parse_tasks

        seen: list = []
        for i, item in enumerate(cfg.eval.tasks):
            n_before = len(seen)
            try:
                seen += parse_tasks(str(item))
            except DataError as e:
                raise ConfigError(f"eval.tasks[{i}]: {_clip(str(e).splitlines()[0])}") from None
            refuse_repeated_task(seen, f"eval.tasks[{i}]")
            refuse_unfit_tasks(
                seen[n_before:], f"eval.tasks[{i}]", cfg.model.segment_len, max(ev.task_distances, default=0)
            )


def document_fits(distances: list[tuple[str, int]], segment_len: int) -> None:
    """ConfigError naming the key of the first (key, D) of ``distances`` whose documents, (D + 1) x segment_len
    tokens or more, would be over the PASSKEY_MAX_TOKENS of `mnemo prepare --passkey-max-distance`: a passkey
    or task document is built whole in memory (int64, from as much filler again)."""
    from mnemo.data_pipeline.limits import PASSKEY_MAX_TOKENS

    for key, d in distances:
        tokens = (d + 1) * segment_len
        if tokens > PASSKEY_MAX_TOKENS:
            raise ConfigError(
                f"{key}: D = {_brief(d)} with model.segment_len {segment_len} needs documents of (D + 1) x T ="
                f" {_brief(tokens)} tokens, over the {PASSKEY_MAX_TOKENS:,} a document may hold: lower it or"
                " model.segment_len"
            )


def refuse_repeated_task(specs: list, key: str) -> None:
    """ConfigError naming ``key`` when ``specs`` (TaskSpecs) hold one task twice, under one name or two (the check
    of `mnemo eval --tasks`, data_pipeline.tasks.repeated_task): each task's curriculum, metrics, summary entry
    and resume state are keyed by its name, and evaluation refuses the repeat mid-run."""
    from mnemo.data_pipeline.tasks import repeated_task

    why = repeated_task(specs)
    if why:
        raise ConfigError(f"{key}: {_clip(why)}")


def refuse_unfit_tasks(specs: list, key: str, segment_len: int, distance: int, episodes: bool = False) -> None:
    """ConfigError naming ``key`` when a task of ``specs`` cannot fit segments of model.segment_len at distances up
    to ``distance`` from its parameters alone (data_pipeline.task_sizes.refuse_unfit, the check of `mnemo eval`;
    ``episodes``: training's layouts): before, niah_multivalue:v=100000000 passed and the evaluation drew values
    for good."""
    from mnemo.data_pipeline.task_sizes import refuse_unfit

    for spec in specs:
        try:
            refuse_unfit(spec, segment_len, distance, episodes=episodes)
        except DataError as e:
            raise ConfigError(f"{key}: {_clip(str(e))}") from None


def validate_sources(cfg: Config) -> None:
    """data.path xor data.sources; each source's weight, name and max_epochs (no filesystem)."""
    from mnemo.data_pipeline.mixture import name_problem, shares, source_names

    src = cfg.data.sources
    if not src:
        return
    if cfg.data.path:
        raise ConfigError("data.sources: set either data.path or data.sources, not both")
    for i, s in enumerate(src):
        if not s.path:
            raise ConfigError(f"data.sources[{i}].path: not set (a data dir written by `mnemo prepare`)")
        if s.weight < 0:
            raise ConfigError(f"data.sources[{i}].weight: must be >= 0, got {s.weight}")
        if s.max_epochs < 0:
            raise ConfigError(f"data.sources[{i}].max_epochs: must be >= 0 (0 = no limit), got {s.max_epochs}")
    try:  # the check `mnemo data inspect --weights` makes: one > 0, none too small to get a share
        shares([s.weight for s in src])
    except DataError as e:
        raise ConfigError(str(e)) from None
    names = source_names([s.path for s in src], [s.name for s in src])
    for i, n in enumerate(names):
        why = name_problem(n)
        if why and src[i].name:
            raise ConfigError(f"data.sources[{i}].name: {_brief(n)} {why}")
        if why:  # the name comes from the path
            raise ConfigError(
                f"data.sources[{i}].path: {_brief(src[i].path)} gives the source no usable name "
                f"({_brief(n)} {why}); set data.sources[{i}].name"
            )
        if n in names[:i]:
            j = names.index(n)
            raise ConfigError(
                f"data.sources[{i}]: name {_brief(n)} is also data.sources[{j}]'s; set data.sources[{i}].name"
            )


def data_paths(cfg: Config) -> list[tuple[str, str]]:
    """(config key, path) of every dataset of the run: data.path, or each data.sources[i].path."""
    if cfg.data.sources:
        return [(f"data.sources[{i}].path", s.path) for i, s in enumerate(cfg.data.sources)]
    return [("data.path", cfg.data.path)]


def _local_path_keys(cfg: Config) -> list[tuple[str, str]]:
    """(config key, value) of every key that names a file or folder on this machine's filesystem."""
    keys = [*data_paths(cfg), ("data.tokenizer", cfg.data.tokenizer), ("data.cache_dir", cfg.data.cache_dir)]
    keys += [("init_from", cfg.init_from), ("run.dir", cfg.run.dir)]
    if cfg.checkpoint.resume not in ("auto", "never"):
        keys.append(("checkpoint.resume", cfg.checkpoint.resume))
    return keys


def refuse_tilde(key: str, path: str, prefix: str = "") -> None:
    """A path that starts with ``~`` or ``~user``: no shell reads a config file, so it would name a folder
    called ``~`` under the working directory (``run.dir: ~/runs/x`` made ./~/runs/x). Refused, with the
    expanded path to write instead (``tilde_problem``, the CLI's rule too)."""
    problem = tilde_problem(path, prefix)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")


# The first line of <run.dir>/config.yaml, the resolved config each start of `mnemo train` writes: the mark
# by which mnemo knows the file is its own to replace (train/rundir.py says what else it writes there).
CONFIG_HEADER = "# mnemo: the resolved config of this run (written by `mnemo train` at each start)"


def wrote_run_config(path: Path) -> bool:
    """Whether ``path`` (a run's config.yaml) is one mnemo wrote: ``CONFIG_HEADER`` first, or (written before
    that header) a dump of the whole config tree, which a hand-written config is not."""
    try:
        # open_regular: a FIFO there would block the open for ever, /dev/zero's one endless line fill memory.
        with open_regular(path) as f:
            first = f.readline(len(CONFIG_HEADER) + 2)
            if first.rstrip(b"\n") == CONFIG_HEADER.encode():
                return True
            if os.fstat(f.fileno()).st_size > 1 << 20:  # no full dump is this big
                return False
            text = (first + f.read(1 << 20)).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    try:  # the config loader's reading: an alias bomb or deep nesting is refused at once, not expanded
        tree = _load_yaml(text, file=True)
    except (yaml.YAMLError, ConfigError, RecursionError):
        return False
    # A dump (dataclasses.asdict) has init_from at the top, which hand-written configs leave out, and
    # (allowing for keys added since) most of today's keys ...
    if not isinstance(tree, dict) or "init_from" not in tree:
        return False
    keys = set(flatten(to_dict(Config())))
    if len(keys & set(flatten(tree))) >= 0.8 * len(keys):
        return True
    # ... or, from an older mnemo with far fewer keys than today's, the very config that a checkpoint of
    # this run recorded (mnemo wrote both from one resolved config).
    from mnemo.train.rundir import complete_checkpoints, read_checkpoint_meta

    for ckpt in complete_checkpoints(path.parent / "checkpoints"):
        try:
            if read_checkpoint_meta(ckpt).get("config") == tree:
                return True
        except UserError:
            continue
    return False


def check_paths(cfg: Config) -> Path | None:
    """Checks that need the filesystem (data dir, tokenizer, init_from and its tokenizer) or the environment
    (``check_tracking``).

    Run by `mnemo train` and `mnemo launch` before any rank is spawned (train/resume.py check_before_start). A
    path that cannot even be looked at (a name too long, no permission) is a ConfigError naming its key
    (``path_errors``), as a missing one is. Returns the checkpoint this run would resume (None: none found here).
    """
    check_tracking(cfg)
    # Path("") is the working directory: `checkpoint.resume=` resumed from wherever mnemo ran. Checked here,
    # not in validate(), so that a checkpoint whose saved config holds it still loads for eval or export.
    # (Every other path key means something by empty: "not set" or a default its comment names.)
    if not cfg.checkpoint.resume:
        raise ConfigError("checkpoint.resume: empty; use auto, never or a path")
    if not cfg.data.path and not cfg.data.sources:
        raise ConfigError("data.path: not set (a data dir written by `mnemo prepare`)")
    for key, path in _local_path_keys(cfg):
        refuse_tilde(key, path)
        if path and (why := not_utf8(path)) is not None:
            raise ConfigError(f"{key}: {why}")
    for key, path in (("run.dir", cfg.run.dir), ("data.cache_dir", cfg.data.cache_dir)):  # what the run writes
        if why := remote_output_problem(path):
            raise ConfigError(f"{key}: {_clip(path)}: {why}")
    for i, (key, path) in enumerate(data_paths(cfg)):
        if is_remote(path):  # streamed shard by shard at train time; the first dataset must be local
            try:  # a URL streaming cannot split ("s3://[b/x") was its traceback when the ranks opened it
                parse_url(path, key, hide=redact_uri)
            except DataError as e:
                raise ConfigError(str(e)) from None
            if i == 0:
                _refuse_remote_first_dataset(cfg, key, path)
            if why := unstreamed_scheme(path):  # was a ValueError traceback in every rank at start-up
                raise ConfigError(f"{key}: {_clip(path)}: {why}")
            continue
        with path_errors(key, ConfigError):
            local = Path(local_path(path, key))
            why = not_a_dataset_dir(local)
            if why:
                raise ConfigError(f"{key}: {why}")
            check_shards(key, local)
    if cfg.data.cache_dir:  # made by each rank at start-up (<cache_dir>/node-<host>): a file there was a traceback
        from mnemo.train.rundir import folder_unwritable

        with path_errors("data.cache_dir", ConfigError):
            why = folder_unwritable(Path(cfg.data.cache_dir))
        if why:
            # Cut longer than _clip's 120: the reason comes after the path (two paths when under a file).
            raise ConfigError(f"data.cache_dir: {clip(redact_uri(why), 600)}")
    if cfg.data.sources:
        from mnemo.data_pipeline.mixture import check_same_tokenizer

        try:
            check_same_tokenizer([p for _, p in data_paths(cfg)])
        except DataError as e:
            raise ConfigError(f"data.sources: {e}") from None
    with path_errors("data.tokenizer", ConfigError):
        tok = tokenizer_path(cfg)
        if is_remote(tok):
            raise ConfigError(f"data.tokenizer: {_clip(tok)}: give a local file (a tokenizer is not downloaded)")
        why = not_a_regular_file(tok)  # a FIFO, a device (/dev/zero) or a folder was "no such file"
        if why is not None:
            raise ConfigError(f"data.tokenizer: {why}: {_clip(tok)}")
        if cfg.data.tokenizer:  # one found in the data dir was checked by `mnemo prepare`
            from mnemo.data_pipeline.tokenizer import Tokenizer

            try:
                Tokenizer(tok)
            except DataError as e:
                raise ConfigError(f"data.tokenizer: {e}") from None
    check_manifest_vocab(cfg, tok)
    check_episode_fit(cfg, tok)
    check_passkey_eval_fit(cfg, tok)
    from mnemo.train.rundir import (
        RESUME_META_KEYS,
        check_checkpoint_files,
        check_run_dir,
        find_checkpoint,
        foreign_run_files,
        read_checkpoint_meta,
    )

    if cfg.init_from:
        with path_errors("init_from", ConfigError):
            src = Path(cfg.init_from)
            if not src.exists():
                raise ConfigError(f"init_from: no such file or directory: {cfg.init_from}")
            weights = src if (src / "model.safetensors").is_file() else find_checkpoint(src)
            if weights is None:
                raise ConfigError(f"init_from: {src} is not a mnemo checkpoint, run directory or export directory")
        check_init_from_tokenizer(cfg, weights, tok)

    r = cfg.checkpoint.resume
    resume = None
    if r not in ("auto", "never"):
        with path_errors("checkpoint.resume", ConfigError):
            if not Path(r).is_dir():
                raise ConfigError(f"checkpoint.resume: no such checkpoint directory: {r}")
            # An export holds the weights alone (no optimizer, streams, step or meta.json): a resume from one
            # passed here and failed in the ranks, minutes later, on its missing meta.json.
            if (Path(r) / "model.safetensors").is_file():
                raise ConfigError(
                    f"checkpoint.resume: {r} is an export (weights only), not a checkpoint; use init_from={r}"
                )
            resume = find_checkpoint(Path(r))
        if resume is None:
            raise ConfigError(f"checkpoint.resume: {r} is not a mnemo checkpoint or run directory")
    with path_errors("run.dir", ConfigError):
        conf = Path(cfg.run.dir) / "config.yaml"
        exists = conf.exists()
        why = not_a_regular_file(conf) if exists else None  # a FIFO blocked the start, /dev/zero filled memory
        if why and why != "permission denied":  # one that cannot be read is refused below, as not mnemo's
            raise ConfigError(f"run.dir: {_clip(str(conf))}: {why}")
        if exists and not wrote_run_config(conf):
            raise ConfigError(
                f"run.dir: {conf} exists and mnemo did not write it (mnemo keeps each run's resolved config "
                "there); use another run.dir or move that file (a resume does not need it)"
            )
        for path, what in foreign_run_files(Path(cfg.run.dir)):  # mnemo replaces them too, at the run's end
            raise ConfigError(
                f"run.dir: {path} exists and mnemo did not write it (mnemo writes {what} there); "
                "use another run.dir or move that file"
            )
        try:  # what this run would write over, or mix its checkpoints with (train/rundir.py)
            start, _ = check_run_dir(Path(cfg.run.dir), r, resume)
        except ValueError as e:
            raise ConfigError(f"run.dir: {e}") from None
    if start is not None:  # what the resume will read, checked before any rank starts
        with path_errors("checkpoint.resume", ConfigError):
            check_checkpoint_files(start)
            read_checkpoint_meta(start, RESUME_META_KEYS)
    return start


def check_memory_fit(cfg: Config, ranks: int = 1) -> None:
    """ConfigError naming the key that needs the most memory when ``ranks`` ranks of ``cfg`` cannot fit on this
    machine: run where the ranks will run on this machine (`mnemo train` alone, `mnemo launch` for its local
    ranks), before any starts.

    Per rank it counts what one training step must hold at once and no more (a lower bound, so a refusal is
    never wrong; ``training_step_parts``). On the CPU the ranks share the host's available memory; on CUDA
    each has a device, of which the whole memory counts (a launcher reads it without taking any). It uses the
    "available" that `mnemo eval` and `mnemo generate` use (evaluation/inference.py). Without it a
    memory.long.capacity of 10**11 failed in each rank with an allocation traceback, a model.segment_len of
    10**9 was killed silently, and segments and a short-term memory of 4096 tokens at train.batch_size 64
    were an allocation traceback from the attention scores (32 GiB) at the first step.
    """
    from mnemo.evaluation.inference import memory_shortfall
    from mnemo.train.rankenv import uses_cuda

    cuda = uses_cuda(cfg.train.device)
    B = cfg.train.batch_size
    parts, blame, host = training_step_parts(cfg, manifest_vocab(cfg))
    per_rank = sum(parts.values())
    needs = {f"cuda:{i}": per_rank for i in range(ranks)} if cuda else {}
    needs["cpu"] = ranks * (host if cuda else per_rank)
    miss = memory_shortfall(needs, total=True)
    if miss is None:
        return
    where, need, free = miss
    # On the host of a CUDA run only the token ids count: the segments' key.
    worst = max(parts, key=parts.__getitem__) if where != "cpu" or not cuda else "model.segment_len"
    key = blame.get(worst, worst)
    gib = ", ".join(f"{name} {b / 2**30:.1f} GiB" for name, b in parts.items() if b)
    each = f"{ranks} ranks x " if ranks > 1 and where == "cpu" else ""
    raise ConfigError(
        f"{key}: training needs at least {need / 2**30:.1f} GiB of memory on {where.split(':')[0]} ({each}"
        f"train.batch_size {B} slots: {gib}), more than the {free / 2**30:.1f} GiB available: lower {key} or "
        "train.batch_size"
    )


def check_partitions_fit(cfg: Config, groups: int) -> None:
    """ConfigError naming the dataset (data.path, data.sources[i]) that has fewer training documents than the
    job's ``groups`` partitions (world size x accumulation micro-steps: train/slots.py), as each rank's streams
    would find (data_pipeline/partition.py check_partitions); a dataset not readable here (remote, or only on
    the nodes) is left to the ranks."""
    from mnemo.data_pipeline.partition import check_partitions
    from mnemo.data_pipeline.verify import dataset_train_documents

    named = [(f"data.sources[{i}]", s.path) for i, s in enumerate(cfg.data.sources)] or [("data.path", cfg.data.path)]
    for label, path in named:
        if is_remote(path):
            continue
        try:
            n_train = dataset_train_documents(local_path(path, label), cfg.data.val_fraction)
        except (DataError, OSError, ValueError):  # check_paths names what is wrong with a dataset it can see
            continue
        try:
            check_partitions(label, n_train, groups)
        except DataError as e:
            raise ConfigError(str(e)) from None


def manifest_vocab(cfg: Config) -> int:
    """The vocab_size of the first dataset's manifest (the model's vocabulary); 0 when it cannot be read
    (check_paths names the problem; a memory estimate then leaves the logits out)."""
    from mnemo.data_pipeline.verify import read_manifest

    key, path = data_paths(cfg)[0]
    if is_remote(path):
        return 0
    try:
        vocab = read_manifest(local_path(path, key))["vocab_size"]
    except (DataError, ConfigError, OSError, ValueError):
        return 0
    return vocab if type(vocab) is int and vocab > 0 else 0


def training_step_parts(cfg: Config, vocab: int) -> tuple[dict[str, int], dict[str, str], int]:
    """A lower bound of the bytes one rank holds at once in a training step of ``cfg``, in parts:
    (bytes by part, the config key that sizes each part not named by one, bytes of it on the host).

    What the model's forward (model/transformer.py) and the loss (train/losses.py) must hold, with B slots of
    T tokens, M short-term entries, H heads, k = memory.bptt_segments segments in one backward
    (train/bptt.py), d_model d, MLP width h, L layers:
    - the memory state: per slot, the short-term stores of every layer and the long-term stores of the
      long-term layers (entries x 2 (key, value) x d x dtype bytes);
    - the k segments' int64 token ids (on the host);
    - the activations autograd keeps for the backward of each of the k segments, per token of every block:
      its input, the attention norm's output, q, k, v, the attention output and the copy the output
      projection reads, the MLP norm's input and output (9 d), the MLP's hidden activations (2 h for GELU,
      4 h for SwiGLU), the keys and values over [memory ; segment] SDPA keeps (2 d x M/T more), a gated
      long-term layer's top-k retrieved keys and values, its queries and its read (2 d x topk + 2 d), and
      the final norm's input and output (2 d). Measured (torch 2.14, CPU) autograd keeps about 1.2 to 1.5
      times this: SDPA's flash kernel (with a mask or causal) holds no B x H x T x (M+T) scores, forward or
      backward, so the activations grow with B x T, not with T squared;
    - the mask over [memory ; segment] (B x T x (M+T), or T x T): SDPA keeps it for the backward, one per
      segment of the window;
    - attention scores: a joint long-term layer (``_joint``) scores every query against [memory ; segment]
      in fp32, B x H x T x (M+T) x 4 bytes, and its softmax holds input and output at once; without
      activation checkpointing each segment's probabilities stay for the backward;
    - the loss: fp32 log-probabilities B x T x V per segment, kept for the backward, beside the logits.
    The peak is when the last segment of the window computes the larger of its softmax and its loss, with
    what the earlier segments keep. With activation checkpointing only the blocks' inputs are kept (the
    activations of one block are recomputed at a time). The optimizer and gradients are not counted.
    """
    from mnemo.model.sizes import SIZES, kv_bytes, ltm_layer_indices, mlp_hidden
    from mnemo.train.rankenv import uses_bf16, uses_cuda

    size, lm = SIZES[cfg.model.size], cfg.memory.long
    width = 2 if uses_bf16(cfg.model.dtype, uses_cuda(cfg.train.device)) else 4
    B, T, k, d, L = cfg.train.batch_size, cfg.model.segment_len, cfg.memory.bptt_segments, size.d_model, size.n_layers
    M, H = cfg.memory.short.length, size.n_heads
    n_ltm = len(ltm_layer_indices(L, lm.layers)) if lm.kind != "none" else 0
    n_joint = n_ltm if lm.mix == "joint" else 0
    tokens = B * k * (T + 1) * 8  # the k batches of int64 token ids, on the host
    segments = "memory.bptt_segments" if k > T else "model.segment_len"
    stm_copies = 0  # the keys and values over [memory ; segment] SDPA keeps: the short-term part
    if cfg.model.activation_checkpointing:
        kept_acts = B * T * d * L * width  # the blocks' inputs
    else:
        hidden = mlp_hidden(dataclasses.replace(size, mlp=cfg.model.mlp)) * (2 if cfg.model.mlp == "gelu" else 4)
        per_layer = B * T * (9 * d + hidden)
        stm_copies = k * L * B * 2 * M * d * width
        gated = (n_ltm - n_joint) * B * T * d * (2 * lm.topk + 2)
        kept_acts = (L * per_layer + gated + B * T * 2 * d) * width
    scores = B * H * T * (M + T) * 4 if n_joint else 0  # one joint layer's fp32 scores of one segment
    mask = B * T * (M + T) * width if M else (T * T * width if n_joint else 0)  # kept by SDPA for the backward
    kept = 0 if cfg.model.activation_checkpointing else n_joint * scores  # a segment's probabilities, kept
    log_probs = B * T * vocab * 4
    softmax, loss = 2 * scores, log_probs + B * T * vocab * width  # the last segment's two peaks
    parts = {
        "memory.short.length": B * kv_bytes(M, d, L, width) + stm_copies,
        "memory.long.capacity": B * kv_bytes(lm.capacity, d, n_ltm, width),
        segments: tokens + k * kept_acts,
        "attention scores": k * mask + (k - 1) * kept + (softmax if softmax >= loss else 0),
        "logits": (k - 1) * log_probs + (loss if loss > softmax else 0),
    }
    # What lowers a part most: the window's length where what it keeps dominates, else the longer of the
    # short-term memory and the segment.
    longer = "memory.short.length" if M > T else "model.segment_len"
    blame = {"attention scores": segments if (k - 1) * (kept + mask) > softmax + mask else longer, "logits": segments}
    return parts, blame, tokens


def check_tracking(cfg: Config) -> None:
    """tracking.uri and tracking.experiment, or the $MLFLOW_TRACKING_URI / $MLFLOW_EXPERIMENT_NAME they default
    to: a store MLflow can open and a usable experiment name (train/tracking/common.py uri_problem,
    experiment_problem), from the values alone. Otherwise only rank 0's tracker found out, after the engine and
    data were built, and the other ranks died of it in their next collective. Here, not in validate(): it reads
    the environment ($MLFLOW_ALLOW_FILE_STORE too), and a checkpoint's saved config must load for eval anywhere.
    """
    if not cfg.tracking.enabled:
        return
    # Not at module level: the tracking package imports this module.
    from mnemo.train.tracking.common import experiment_problem, resolve_uri, sqlite_path_problem, uri_problem

    for key, env, value, problem, hide in (
        # The URI is shown as one: alice:PASS@host (no http://) hides its password too.
        ("tracking.uri", "MLFLOW_TRACKING_URI", cfg.tracking.uri, uri_problem, redact_uri_value),
        ("tracking.experiment", "MLFLOW_EXPERIMENT_NAME", cfg.tracking.experiment, experiment_problem, redact_uri),
    ):
        where = key if value else f"{key} (empty: ${env})"
        value = value or os.environ.get(env, "")
        if value and (why := problem(value)):
            raise ConfigError(f"{where}: {brief(value, hide=hide)}: {why}")
        # sqlite:///~/m.db: SQLAlchemy and MLflow take ~/m.db relative to the working directory (a folder "~")
        if key == "tracking.uri" and (m := re.match(r"(sqlite(?:\+\w+)?:///)(?!/)", value)):
            refuse_tilde(where, value[m.end() :], m[1])
    # The default store, sqlite:///<run.dir>/mlflow.db: a run.dir too long for SQLite failed at start-up ("unable to
    # open database file"), after config.yaml, run.lock and the data cache were written.
    if cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return
    try:
        why = sqlite_path_problem(resolve_uri(cfg.tracking.uri, cfg.run.dir))
    except (OSError, RuntimeError):  # a run.dir that cannot be resolved (a loop of links): the run.dir checks name it
        return
    if why:
        raise ConfigError(
            f"run.dir: {_clip(cfg.run.dir)}: the default tracking store <run.dir>/mlflow.db: {why}; use a shorter "
            "run.dir, set tracking.uri to a store elsewhere, or tracking.enabled=false"
        )


def check_shards(key: str, data_dir: Path) -> None:
    """ConfigError naming ``key`` unless ``data_dir``/index.json passes verify.check_index (shard names a
    reader may open) and every shard it lists is there (its zip_data file, or its raw_data one).

    Checked before any rank starts: a missing shard was streaming's "path to remote dataset must be
    provided" traceback in every rank. And each shard holds the sample count index.json records
    (verify.check_shard_header: its header, 4 bytes, one block decompressed): training trusted it. And the
    samples index.json records add up to manifest.json's num_documents (verify.check_sample_total: a shard
    listed twice was read twice per epoch). No hashing (`mnemo data verify` hashes).
    """
    from mnemo.data_pipeline.verify import check_index, check_sample_total, check_shard_header

    # A shard's header is a read (a block of a compressed one, up to ~128 KB): once per host, not per rank (the
    # launcher's pre-flight, a lone rank and each node's local rank 0; a launcher whose host cannot see the
    # data leaves it to the nodes). A large dataset's 10,000 shards x 8 ranks per node were 10 GB read per node.
    headers = os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")

    try:
        shards = check_index(str(data_dir))
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    for shard in shards:
        names = [info["basename"] for info in (shard.get("zip_data"), shard["raw_data"]) if info is not None]
        if not any((data_dir / name).is_file() for name in names):
            # A FIFO or a folder in its place is named as such (as `mnemo data verify` does), not "missing".
            why = next((w for w in (not_a_regular_file(data_dir / n) for n in names) if w != "no such file"), None)
            raise ConfigError(f"{key}: shard {names[0]}: {why or 'missing'} (listed in {data_dir / 'index.json'})")
        if headers:
            try:
                check_shard_header(str(data_dir), shard, str(data_dir / "index.json"))
            except DataError as e:
                raise ConfigError(f"{key}: {e}") from None
    try:  # after each shard's own count: a shard listed twice agrees with its header
        check_sample_total(str(data_dir), shards)
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_manifest_vocab(cfg: Config, tok: str) -> None:
    """ConfigError unless the first dataset's manifest.json vocab_size (the model's vocabulary: the trainer
    sizes its embedding by it) is a positive whole number equal to the vocab size of ``tok``, the tokenizer
    this run uses, and the manifest holds every field the trainer reads (verify.read_manifest: a manifest
    without one was refused by every rank, under torchrun's traceback).

    Trusted, "abc" was a ValueError in every rank, 0 a RuntimeError, one below the tokens' ids an
    IndexError, 10000000 a model of a billion parameters.
    """
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.data_pipeline.verify import check_vocab_size, read_manifest

    key, path = data_paths(cfg)[0]
    if is_remote(path):
        return  # refused above: the first dataset must be local
    with path_errors(key, ConfigError):
        data_dir = local_path(path, key)
        try:
            manifest = read_manifest(data_dir)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None
        try:
            theirs = Tokenizer(tok).vocab_size
        except DataError as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
        try:
            check_vocab_size(manifest, os.path.join(data_dir, "manifest.json"), theirs, tok)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None


def check_episode_fit(cfg: Config, tok: str) -> None:
    """ConfigError naming model.segment_len unless the episodes of train.passkey (fraction > 0) fit its segments
    with the tokenizer ``tok``: task_sizes.check_fit, the check each rank's episode source runs, here with
    stand-in filler (``task_sizes.stand_in_filler``: the fit does not depend on the filler's words).

    Before, only the ranks found out, after the run dir's config.yaml, run.lock and data cache were written.
    """
    pk = cfg.train.passkey
    if pk.fraction <= 0:
        return
    from mnemo.data_pipeline.passkey import RoundTripError
    from mnemo.data_pipeline.task_sizes import check_fit, stand_in_filler
    from mnemo.data_pipeline.tasks import parse_tasks
    from mnemo.data_pipeline.tokenizer import Tokenizer

    T = cfg.model.segment_len
    try:
        tokenizer = Tokenizer(tok)
        check_fit(parse_tasks(",".join(pk.tasks)), tokenizer, T, stand_in_filler(tokenizer, T), pk.max_keys)
    except RoundTripError as e:  # no segment length helps: its message says what does
        raise ConfigError(f"train.passkey: {str(e).removeprefix('passkey: ')}") from None
    except DataError as e:
        keys = "train.passkey.tasks" + (", train.passkey.max_keys" if pk.max_keys > 1 else "")
        why = str(e).removeprefix("passkey: ")  # "train.passkey: passkey: ..." said it twice
        raise ConfigError(
            f"train.passkey: {why}; model.segment_len is {T} (a D = 0 episode holds the facts and the question in"
            f" one segment): raise model.segment_len, or change {keys} (train.passkey.fraction=0: no episodes)"
        ) from None


def check_passkey_eval_fit(cfg: Config, tok: str) -> None:
    """ConfigError naming eval.passkey_trials unless the in-run passkey evaluation (eval.passkey_trials > 0) can
    build its documents with the tokenizer ``tok`` and model.segment_len: one sample at the smallest and the
    largest of eval.passkey_distances, with stand-in filler (the fit does not depend on the filler's words).

    Before, a question longer than a segment (a non-Latin tokenizer spells the English sentences in bytes)
    or a tokenizer that does not round-trip passed here and stopped the run at its first evaluation, before
    the checkpoint of that step, and again after every relaunch.
    """
    ev = cfg.eval
    if ev.passkey_trials <= 0 or not ev.passkey_distances:
        return
    import numpy as np

    from mnemo.data_pipeline.passkey import RoundTripError, make_passkey_sample
    from mnemo.data_pipeline.task_sizes import stand_in_filler
    from mnemo.data_pipeline.tokenizer import Tokenizer

    T = cfg.model.segment_len
    D = min(ev.passkey_distances)
    try:
        tokenizer = Tokenizer(tok)
        filler = stand_in_filler(tokenizer, T)  # a lossy tokenizer is told of the pass-key sentences, not of it
        for D in sorted({min(ev.passkey_distances), max(ev.passkey_distances)}):
            make_passkey_sample(tokenizer, filler, D, "start", T, np.random.default_rng(0))
    except RoundTripError as e:  # no segment length helps: its message says what does
        raise ConfigError(f"eval.passkey_trials: {str(e).removeprefix('passkey: ')}") from None
    except DataError as e:
        why = str(e).removeprefix("passkey: ")
        raise ConfigError(
            f"eval.passkey_trials: {why} (eval.passkey_distances D={D}, model.segment_len {T}): raise "
            "model.segment_len, or eval.passkey_trials=0 (no passkey evaluation)"
        ) from None


def check_init_from_tokenizer(cfg: Config, weights: Path, tok: str) -> None:
    """ConfigError unless the weights of init_from (``weights``: the export or checkpoint folder it names) were
    trained with this run's tokenizer ``tok``, compared by sha256 as a resume compares them (train/resume.py).

    Another tokenizer of the same vocabulary size loads without a shape error and trains from embeddings
    that mean other tokens. The tokenizer file an export or checkpoint keeps is compared (else a checkpoint's
    meta.json tokenizer_sha256); a folder that records neither is refused too, saying so, since nothing
    shows its weights fit this tokenizer.
    """
    import json

    from mnemo.data_pipeline.tokenizer import TOKENIZER_FILES, file_sha256, find_tokenizer_file

    with path_errors("init_from", ConfigError):
        stored = Path(find_tokenizer_file(weights))
        theirs = file_sha256(stored) if stored.is_file() else ""
        if not theirs and (weights / "meta.json").is_file():
            try:
                theirs = str(json.loads((weights / "meta.json").read_text()).get("tokenizer_sha256") or "")
            except (ValueError, AttributeError, RecursionError):  # not JSON (or nested too deep), or not a mapping
                theirs = ""
    if not theirs:
        where = "" if weights == Path(cfg.init_from) else f" in {weights}"
        raise ConfigError(
            f"init_from: {cfg.init_from} records no tokenizer (no {' or '.join(TOKENIZER_FILES)}{where}), so its "
            "weights cannot be checked against this run's tokenizer; put the tokenizer they were trained with there"
        )
    with path_errors("data.tokenizer", ConfigError):
        ours = file_sha256(tok)
    if theirs != ours:
        which = "data.tokenizer" if cfg.data.tokenizer else f"{data_paths(cfg)[0][0]}'s"
        raise ConfigError(
            f"init_from: {cfg.init_from} was trained with another tokenizer "
            f"(sha256 {theirs[:12]} != {ours[:12]} of {which} {tok})"
        )


def _refuse_remote_first_dataset(cfg: Config, key: str, path: str) -> None:
    """ConfigError: data.path (or the first of data.sources) is a remote URL.

    The trainer reads that dataset's manifest.json (vocabulary size, the tokenizer's hash) and, without
    data.tokenizer, its tokenizer as local files before any shard streams; nothing downloads them. So
    the URL is refused here, naming its key, before any rank starts (as a local path, pathlib would
    make ``s3:/bucket/ds/manifest.json`` of it, which also escapes redact_uri's ``scheme://``).
    """
    first = "; list a local source first (the others may be remote)" if cfg.data.sources else ""
    raise ConfigError(
        f"{key}: {_clip(path)} is remote; training reads the manifest.json and tokenizer of this dataset from a "
        f"local directory: give a local copy (what `mnemo prepare --out` wrote){first}"
    )


def tokenizer_path(cfg: Config) -> str:
    """The tokenizer file of the run: data.tokenizer (a file:// URL read as its path), else the (first) dataset's."""
    if cfg.data.tokenizer:
        return local_path(cfg.data.tokenizer, "data.tokenizer")
    from mnemo.data_pipeline.tokenizer import find_tokenizer_file

    return find_tokenizer_file(local_path(data_paths(cfg)[0][1]))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The YAML written into run directories: credentials in URIs (tracking.uri) redacted."""
    from mnemo.data_pipeline.redact import redact_tree

    return yaml.safe_dump(redact_tree(to_dict(cfg)), sort_keys=False)


def from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def flatten(cfg: Config | dict, prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 1e-3, ...}: the form MLflow params and diffs use."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
