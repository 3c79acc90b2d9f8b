"""Episodic passkey training: a second batch source beside the corpus streams.

Why episodes and not passkey documents in the stream. Retrieval is learned
suddenly: the answer loss sits at chance until a copy circuit forms, and
whether it forms within a few hundred steps depends on what each batch asks
(docs/demo.md has the measurements). Passkey documents mixed into the
document stream did not get there in 700 steps, in eight variants. What did
is the episode below, measured by benchmarks/passkey_click.py:

- every row of the batch is one fresh passkey document of D + 1 segments
  (key in segment 0, question at the end of segment D, filler drawn anew
  from training documents), so every row ends in a question;
- segments 0..D-1 only fill the memory, without gradient (the memory is
  detached between steps anyway); the loss is the LM loss of segment D with
  the answer weighted ``train.answer_weight``;
- an adaptive curriculum on D: max D starts at ``start_distance``; every
  other episode step uses D = max D, the others a uniform D in [0, max D]
  (D = 0 and 1 give the shared projections a full gradient); max D grows by
  one when the exact match of the max-D steps, averaged over the last
  ``promote_window`` of them, passes ``promote_exact``.

A ``train.passkey.fraction`` of the optimizer steps are episode steps; the
rest read the corpus streams, whose memory state is not touched by episodes.

Every rank must run the same number of forwards per step (ZeRO-3 gathers
parameters collectively), so D comes from a generator that is identical on
all ranks and the curriculum decides on the exact match averaged over ranks.
The documents themselves come from a per-rank generator. Both generators and
the curriculum are part of the checkpoint (``state_dict``).

A mixture of tasks (``train.passkey.tasks``: data_pipeline/tasks.py specs,
default just ``passkey``, which is the episode above bit for bit). Each task
has its own curriculum: its max D as above, and its number of facts (k of
niah_multikey, v, q of niah_multivalue/multiquery, n of mqar, h of
variable_tracking; task_sizes.FACTS), which starts at 1 and doubles (capped at the
spec's value) at each promotion, together with max D + 1. A max-D batch
uses the current count in every row, the other batches a count uniform in
[1, current] per row. On an episode step the task is drawn from a generator
seeded by (train.seed, step) with ``train.passkey.task_weights``, and D from
that task's curriculum (seeded by train.seed and the task's place): no rank
in either, so every rank draws the same task and D. The number of segments
of a task's document is S + D + 1 with S = task_sizes.fact_segments (a bound from
the task's parameters, D and the segment length; fewer facts are
spread over the same S + 1 segments), so it never depends on the words drawn
and every rank runs the same forwards. The loss weights every trained answer
of a document (``answer_spans``: MQAR weights each query's value), exact
match scores the last answer only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mnemo.data_pipeline.passkey import DEPTHS, filler_stream, make_multikey_sample, make_passkey_sample
from mnemo.data_pipeline.task_sizes import FACTS, check_fit, corpus_passkey, fact_segments, with_facts
from mnemo.data_pipeline.tasks import TaskSpec, make_sample, parse_tasks
from mnemo.evaluation.task_eval import metric_name


def is_episode_step(step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (0-based) is an episode step.

    Spreads the episode steps evenly: step s is one when floor((s+1) f)
    exceeds floor(s f); fraction 0.5 alternates corpus, episode, corpus, ...
    """
    if fraction <= 0:
        return False
    return int((step + 1) * fraction + 1e-9) > int(step * fraction + 1e-9)


@dataclass
class EpisodeBatch:
    tokens: torch.Tensor  # [B, (D+1)T + 1] int64: D+1 segments and the EOS
    weight: torch.Tensor  # [B, T] float32: loss weight of segment D's targets
    answer: torch.Tensor  # [B, T] bool: the target is an answer digit
    distance: int  # D: segments between the key (segment S) and the question (segment S + D)
    at_max: bool  # a max-D batch: its exact match drives the curriculum
    task: int = 0  # the task's place in EpisodeSource.tasks
    facts: int = 1  # the curriculum's fact count of this batch (rows of a non-max batch draw 1..facts)
    segments: int = 0  # S + D + 1 segments per row (0: D + 1)

    @property
    def n_segments(self) -> int:
        return self.segments or self.distance + 1


class PasskeyCurriculum:
    """Max distance D of the episodes, raised as retrieval succeeds. Same on every rank."""

    def __init__(
        self,
        start_distance: int,
        max_distance: int,
        promote_exact: float,
        promote_window: int,
        seed: int,
        max_facts: int = 1,
        stream: int = 0,
    ):
        """max_facts  the task's fact count (1: none to grow); stream  the task's place (0 keeps the old draws)."""
        self.max_distance, self.promote_exact, self.promote_window = max_distance, promote_exact, promote_window
        self.current = min(start_distance, max_distance)  # max D the episodes use now
        self.max_facts = int(max_facts)
        self.facts = 1  # the fact count the episodes use now (doubles at each promotion up to max_facts)
        self.history: list[float] = []  # exact match of the max-D batches since the last promotion
        self.episodes = 0
        self.clicked_at = 0  # optimizer step of the first promotion (0 = not yet)
        # No rank in the seed: identical on all ranks.
        self.rng = np.random.default_rng([int(seed), 0x9A55] + ([int(stream)] if stream else []))

    @property
    def finished(self) -> bool:
        """Whether it has nothing left to raise: max D at max_distance and all the task's facts."""
        return self.current >= self.max_distance and self.facts >= self.max_facts

    def next_distance(self) -> tuple[int, bool]:
        """(D of the next episode batch, whether it is a max-D batch)."""
        self.episodes += 1
        if self.episodes % 2 == 1:
            return self.current, True
        return int(self.rng.integers(0, self.current + 1)), False

    def update(self, exact: float, step: int) -> bool:
        """Record a max-D batch's exact match (mean over ranks); True when max D was raised."""
        self.history.append(float(exact))
        recent = self.history[-self.promote_window :]
        if len(recent) < self.promote_window or sum(recent) / len(recent) <= self.promote_exact:
            return False
        self.clicked_at = self.clicked_at or step
        if self.finished:
            return False
        self.current = min(self.current + 1, self.max_distance)
        self.facts = min(2 * self.facts, self.max_facts)
        self.history = []
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "history": list(self.history),
            "episodes": self.episodes,
            "clicked_at": self.clicked_at,
            "facts": self.facts,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.current, self.history = int(sd["current"]), [float(x) for x in sd["history"]]
        self.episodes, self.clicked_at = int(sd["episodes"]), int(sd["clicked_at"])
        self.facts = min(int(sd.get("facts", 1)), self.max_facts)  # a passkey-only checkpoint has none
        self.rng.bit_generator.state = sd["rng"]


def task_specs(tasks: Any) -> list[TaskSpec]:
    """``train.passkey.tasks`` (a list of parse_tasks items, or one string) -> TaskSpecs.

    The items are read as one comma-joined list, so a YAML flow list that split
    ``mqar:n=16,q=8`` at its comma still reads as one task.
    """
    items = [tasks] if isinstance(tasks, (str, TaskSpec)) else list(tasks)
    specs = [x for x in items if isinstance(x, TaskSpec)]
    if specs and len(specs) == len(items):
        return specs
    return parse_tasks(",".join(x.name if isinstance(x, TaskSpec) else str(x) for x in items))


def task_weights(weights: Any, n: int) -> np.ndarray:
    """Probabilities of n tasks: ``weights`` normalized (empty = equal). ValueError when not n of them > 0."""
    w = np.ones(n) if not weights else np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.shape != (n,) or not bool(np.all(w > 0)) or not bool(np.all(np.isfinite(w))):
        raise ValueError(f"{n} weights > 0 needed (one per task), got {list(weights)}")
    return w / w.sum()


class EpisodeSource:
    """Fresh task documents for one rank: ``batch(D, at_max, task, facts)`` -> EpisodeBatch."""

    def __init__(
        self,
        tokenizer: Any,
        filler: Any,
        segment_len: int,
        batch_size: int,
        answer_weight: float,
        context_weight: float,
        seed: int,
        rank: int,
        max_keys: int = 1,
        tasks: Any = ("passkey",),
    ):
        """max_keys  facts of the passkey task's documents (below); tasks  train.passkey.tasks (``task_specs``)."""
        self.tokenizer, self.T, self.B = tokenizer, int(segment_len), int(batch_size)
        self.answer_weight, self.context_weight = float(answer_weight), float(context_weight)
        self.filler = filler_stream(filler)
        self.depths = list(DEPTHS)
        self.max_keys = int(max_keys)
        self.tasks = task_specs(tasks)
        self._fact_segment: dict[tuple[TaskSpec, int], int] = {}
        self.rng = np.random.default_rng([int(seed), int(rank), 0xE915])
        # Fail at start-up, not mid-run, when the segment cannot hold a key or a question (the pre-flight,
        # train/config.py, ran the same check with stand-in filler before anything was written).
        check_fit(self.tasks, tokenizer, self.T, self.filler, self.max_keys)

    def max_facts(self, task: int) -> int:
        """The fact count the task's curriculum grows to (1: the task has none to grow)."""
        spec = self.tasks[task]
        return int(spec[FACTS[spec.family]]) if spec.family in FACTS else 1

    def fact_segment(self, spec: TaskSpec, distance: int) -> int:
        """S of every document of ``spec`` at D: fixed by the task's parameters (tasks.fact_segments)."""
        key = (spec, distance)
        if key not in self._fact_segment:
            self._fact_segment[key] = fact_segments(spec, self.tokenizer, self.T, distance)
        return self._fact_segment[key]

    def segments(self, task: int, distance: int) -> int:
        """Segments of a document of task ``task`` at D: S + D + 1, whatever words are drawn."""
        return self.fact_segment(self.tasks[task], distance) + distance + 1

    def _row(self, distance: int, task: int = 0, facts: int = 1, at_max: bool = False) -> dict:
        """One document: with max_keys > 1, 1..max_keys door facts ("The pass key of door N is ...")."""
        depth = self.depths[int(self.rng.integers(0, len(self.depths)))]
        spec = self.tasks[task]
        if corpus_passkey(spec):
            if self.max_keys == 1:
                return make_passkey_sample(self.tokenizer, self.filler, distance, depth, self.T, self.rng)
            keys = int(self.rng.integers(1, self.max_keys + 1))
            return make_multikey_sample(self.tokenizer, self.filler, distance, keys, self.T, self.rng, depth=depth)
        count = facts if at_max else int(self.rng.integers(1, facts + 1))
        S = self.fact_segment(spec, distance)  # of the full spec: fewer facts spread over the same segments
        return make_sample(
            with_facts(spec, count), self.tokenizer, self.filler, self.T, distance, self.rng, depth, fact_segment=S
        )

    def batch(self, distance: int, at_max: bool = False, task: int = 0, facts: int = 1) -> EpisodeBatch:
        T = self.T
        rows = [self._row(distance, task, facts, at_max) for _ in range(self.B)]
        n_seg = self.segments(task, distance)
        if any(len(r["tokens"]) != n_seg * T + 1 for r in rows):
            raise RuntimeError(f"{self.tasks[task].name}: a document not of {n_seg} segments at D={distance}")
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))  # [B, n_seg T + 1]
        last = (n_seg - 1) * T  # the last segment's first token: its targets are tokens last + 1 .. last + T
        answer = torch.zeros(self.B, T, dtype=torch.bool)
        trained = torch.zeros(self.B, T, dtype=torch.bool)
        for i, r in enumerate(rows):
            # The scored answer is the last tokens of the last segment (before EOS); as targets of its
            # inputs they sit at T-1-len .. T-2. Every trained answer (MQAR's queries) is weighted.
            answer[i, T - 1 - r["answer_len"] : T - 1] = True
            for a, n in r.get("answer_spans", [(r["answer_start"], r["answer_len"])]):
                trained[i, a - last - 1 : a - last - 1 + n] = True
        weight = torch.where(trained, self.answer_weight, self.context_weight).float()
        return EpisodeBatch(
            tokens=tokens,
            weight=weight,
            answer=answer,
            distance=distance,
            at_max=at_max,
            task=task,
            facts=facts,
            segments=n_seg,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.rng.bit_generator.state = sd["rng"]


@dataclass
class EpisodeResult:
    loss: torch.Tensor  # the loss to optimize (answer weighted), with graph
    plain_sum: torch.Tensor  # sum of the plain CE over segment D's targets (detached)
    n: torch.Tensor  # number of those targets
    exact: torch.Tensor  # rows whose answer is right at every digit (greedy = argmax)
    batch: EpisodeBatch


class Episodes:
    """What the trainer holds: this rank's document source, the shared curricula (one per task), the schedule."""

    def __init__(
        self,
        source: EpisodeSource,
        curriculum: PasskeyCurriculum | list[PasskeyCurriculum],
        fraction: float,
        ltm_only_at_max: bool = False,
        seed: int = 0,
        weights: Any = (),
        done_weight: float = 1.0,
    ):
        """curriculum  one per task of ``source.tasks``; seed, weights  the task draw (train.seed, task_weights);
        done_weight  the factor on a finished curriculum's weight (train.passkey.done_weight)."""
        self.source, self.fraction = source, fraction
        self.curricula = list(curriculum) if isinstance(curriculum, (list, tuple)) else [curriculum]
        if len(self.curricula) != len(source.tasks):
            raise ValueError(f"{len(source.tasks)} tasks but {len(self.curricula)} curricula")
        self.ltm_only_at_max = ltm_only_at_max
        self.seed = int(seed)
        self.weights = task_weights(weights, len(source.tasks))
        self.done_weight = float(done_weight)
        self.names = [metric_name(t.name) for t in source.tasks]  # as in the eval/task/<name>/... metrics

    @property
    def curriculum(self) -> PasskeyCurriculum:
        """The first task's curriculum (the pass key's with the default tasks)."""
        return self.curricula[0]

    def is_step(self, step: int) -> bool:
        return is_episode_step(step, self.fraction)

    def pick(self, step: int | None) -> int:
        """The task of optimizer step ``step``: drawn from (train.seed, step) only, so the same on every rank."""
        if len(self.curricula) == 1:
            return 0  # no draw: the single-task episodes are those of before, draw for draw
        if step is None:
            raise ValueError("Episodes.forward: a mixture of tasks needs the optimizer step")
        rng = np.random.default_rng([self.seed, int(step), 0x7A5C])
        p = self.weights
        if self.done_weight != 1.0 and any(c.finished for c in self.curricula):
            # The curricula are the same on every rank (they decide on rank means), so is p.
            p = p * np.array([self.done_weight if c.finished else 1.0 for c in self.curricula])
            p = p / p.sum()
        return int(rng.choice(len(self.curricula), p=p))

    def promotion_message(self, task: int, step: int, exact: float, distance: int, window: int) -> str:
        """The log line of task ``task``'s promotion at ``step`` (its curriculum already raised): what passed
        (``exact`` over ``window`` max-D steps at ``distance``), where it goes, and whether it has now ended."""
        cur = self.curricula[task]
        msg = (
            f"step {step}: {self.names[task]} exact match {exact:.2f} at D={distance} (mean of the last {window} "
            f"max-D steps); curriculum max D -> {cur.current}"
        )
        if cur.max_facts > 1:
            msg += f", facts -> {cur.facts}"
        if cur.finished and len(self.curricula) > 1 and self.done_weight != 1.0:
            msg += f"; finished: drawn x{self.done_weight:g} from now (train.passkey.done_weight)"
        return msg

    def forward(
        self, model: Any, device: torch.device, dtype: torch.dtype, has_memory: bool, step: int | None = None
    ) -> EpisodeResult:
        """Draw the step's task, a batch at its curriculum's next D, and run it: all segments but the last without
        gradient, then the last (the question's).

        model  ``model(tokens [B, T], state, logits=True) -> (logits [B, T, V] or None, state)``, with ``init_state``
               on it or on its ``.module`` (a DeepSpeed engine)
        has_memory  False: the earlier segments cannot reach the last one, so they are not run.
        step  the optimizer step (0-based), which draws the task of a mixture.
        A max-D batch runs without the short-term memory when ``ltm_only_at_max``
        (a model with long-term memory only): its key can then only come from the
        long-term store, so retrieval is learned from D = 1 on instead of after
        the short-term cache has solved D = 1 (docs/demo.md).
        """
        from mnemo.train.losses import lm_loss

        k = self.pick(step)
        cur = self.curricula[k]
        D, at_max = cur.next_distance()
        eb = self.source.batch(D, at_max, task=k, facts=cur.facts)
        T, B, last = self.source.T, self.source.B, eb.n_segments - 1
        tokens = eb.tokens.to(device)
        core = getattr(model, "module", model)
        has_ltm = getattr(getattr(core, "args", None), "ltm_kind", "none") != "none"
        if self.ltm_only_at_max and at_max and has_ltm:
            state = core.init_state(B, stm=False, device=device, dtype=dtype)
        else:
            state = core.init_state(B, device=device, dtype=dtype)
        if has_memory:
            with torch.no_grad():
                for i in range(last):
                    _, state = model(tokens[:, i * T : (i + 1) * T], state, logits=False)
        logits, _ = model(tokens[:, last * T : (last + 1) * T], state)  # [B, T, V]
        targets = tokens[:, last * T + 1 : (last + 1) * T + 1]  # [B, T]
        answer = eb.answer.to(device)
        loss, plain, n = lm_loss(logits, targets, eb.weight.to(device), torch.ones_like(answer))
        right = (logits.detach().argmax(-1) == targets) | ~answer
        return EpisodeResult(loss=loss, plain_sum=plain.detach() * n, n=n, exact=right.all(1).sum().float(), batch=eb)

    def summary(self) -> dict[str, Any]:
        c = self.curriculum
        out: dict[str, Any] = {"max_distance": c.current, "clicked_at": c.clicked_at, "episode_steps": c.episodes}
        if len(self.curricula) > 1 or self.source.tasks[0].family != "passkey":
            out["tasks"] = {
                name: {
                    "max_distance": c.current,
                    "facts": c.facts,
                    "clicked_at": c.clicked_at,
                    "episode_steps": c.episodes,
                }
                for name, c in zip(self.names, self.curricula)
            }
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "tasks": [t.name for t in self.source.tasks],
            "curricula": [c.state_dict() for c in self.curricula],
        }

    def load_state_dict(self, sd: dict[str, Any], own_rank: bool = True) -> None:
        """Each task's curriculum from the checkpoint's task of that name (a new task starts afresh); a
        checkpoint of before the mixtures holds the pass key's curriculum only."""
        if "curricula" in sd:
            saved = dict(zip(sd["tasks"], sd["curricula"]))
            for spec, c in zip(self.source.tasks, self.curricula):
                if spec.name in saved:
                    c.load_state_dict(saved[spec.name])
        else:
            for spec, c in zip(self.source.tasks, self.curricula):
                if spec.family == "passkey":
                    c.load_state_dict(sd["curriculum"])
                    break
        if own_rank:
            self.source.load_state_dict(sd["source"])


def build_episodes(
    pk: Any,
    tokenizer: Any,
    filler: Any,
    segment_len: int,
    batch_size: int,
    answer_weight: float,
    context_weight: float,
    seed: int,
    rank: int,
) -> Episodes:
    """The episodes of ``train.passkey`` (a PasskeyTrainConfig) for one rank: a source and a curriculum per task."""
    src = EpisodeSource(
        tokenizer,
        filler,
        segment_len,
        batch_size,
        answer_weight,
        context_weight,
        seed,
        rank,
        max_keys=pk.max_keys,
        tasks=pk.tasks,
    )
    curricula = [
        PasskeyCurriculum(
            pk.start_distance, pk.max_distance, pk.promote_exact, pk.promote_window, seed, src.max_facts(i), stream=i
        )
        for i in range(len(src.tasks))
    ]
    return Episodes(
        src,
        curricula,
        pk.fraction,
        ltm_only_at_max=pk.ltm_only_at_max,
        seed=seed,
        weights=pk.task_weights,
        done_weight=pk.done_weight,
    )


def training_filler(source: Any, val_fraction: float, max_docs: int, seed: int) -> np.ndarray:
    """Filler tokens for training episodes: up to ``max_docs`` training (not held-out) corpus documents.

    Held-out documents are the evaluation's filler, so they are never used
    here; synthetic passkey documents are skipped. The documents are a fixed
    function of (dataset, seed), the same on every rank.
    """
    from mnemo.evaluation.heldout import read_docs

    order = np.random.default_rng([int(seed), 0xF111]).permutation(source.num_samples)
    docs = read_docs(source, val_fraction, heldout=False, order=order, max_docs=max_docs)
    if not docs:
        from mnemo.train.errors import UserError

        raise UserError(
            "train.passkey.fraction: the dataset has no training corpus documents to draw passkey filler from"
        )
    return np.concatenate(docs)


__all__ = [
    "build_episodes",
    "EpisodeBatch",
    "EpisodeResult",
    "EpisodeSource",
    "Episodes",
    "PasskeyCurriculum",
    "is_episode_step",
    "task_specs",
    "task_weights",
    "training_filler",
]
