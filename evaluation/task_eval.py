"""Long-context tasks (``data_pipeline.tasks``) scored per (task, distance): exact match with a Wilson interval.

Each task draws its documents from its own generator, seeded by (seed, D,
crc32 of the task name): adding or removing a task never changes another's
documents, and a memory model and its baseline read the same ones. Exact
match is that of greedy decoding, computed teacher-forced in one pass
(``scoring.score_teacher_forced``); ``token_acc`` is each document's fraction
of answer tokens whose argmax is right, averaged over the documents (a
document counts once whatever its answer's length; not the pooled fraction
of all answer tokens).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from mnemo.data_pipeline.passkey import DEPTHS, filler_stream
from mnemo.data_pipeline.tasks import TaskSpec, make_sample, parse_tasks, repeated_task
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.progress import progress_bar, teacher_forced_segments
from mnemo.evaluation.scoring import cell_stats, score_teacher_forced
from mnemo.evaluation.stats import wilson_interval


def task_specs(names: Sequence[str], what: str = "--tasks") -> list[TaskSpec]:
    """TaskSpecs of task list items (each read by ``data_pipeline.tasks.parse_tasks``); EvalError naming ``what``."""
    from mnemo.data_pipeline.errors import DataError

    specs: list[TaskSpec] = []
    for item in names:
        try:
            specs += parse_tasks(item)
        except DataError as e:
            raise EvalError(f"{what}: {str(e).splitlines()[0]}") from None
    why = repeated_task(specs)
    if why:
        raise EvalError(f"{what}: {why}")
    return specs


def task_rng(seed: int, distance: int, name: str) -> np.random.Generator:
    """The generator of one task's documents at one distance: a function of (seed, D, task name) only."""
    return np.random.default_rng([int(seed), int(distance), zlib.crc32(name.encode("utf-8"))])


def task_samples(
    specs: Sequence[TaskSpec],
    tokenizer: Any,
    filler_docs: Any,
    segment_len: int,
    distances: Sequence[int],
    trials: int,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
) -> dict[str, dict[str, list[dict]]]:
    """{task name: {D: ``trials`` documents}}, the facts' depth taken in turn (start, middle, end).

    EvalError when a task does not fit the segment length (the message names
    the task), or with ``skipped`` given, the task is left out and the reason
    goes into ``skipped[name]``.
    """
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.task_sizes import refuse_unfit

    stream = filler_stream(filler_docs)
    depths = list(DEPTHS)
    out: dict[str, dict[str, list[dict]]] = {}
    for spec in specs:
        by_d: dict[str, list[dict]] = {}
        try:
            try:  # from the parameters alone, before anything is drawn (a huge v drew for minutes)
                refuse_unfit(spec, segment_len, max(distances, default=0))
            except DataError as e:
                raise EvalError(f"task {str(e).splitlines()[0]}") from None
            for D in distances:
                rng = task_rng(seed, D, spec.name)
                try:
                    by_d[str(D)] = [
                        make_sample(spec, tokenizer, stream, segment_len, D, rng, depth=depths[i % len(depths)])
                        for i in range(trials)
                    ]
                except DataError as e:
                    raise EvalError(f"task {spec.name} at D={D}: {str(e).splitlines()[0]}") from None
        except EvalError as e:
            if skipped is None:
                raise
            skipped[spec.name] = str(e)
            continue
        out[spec.name] = by_d
    return out


def longest_document(samples: dict[str, dict[str, list[dict]]]) -> int:
    """Tokens of the longest document of ``task_samples`` (0 when none): what the long-term store must hold."""
    return max((len(s["tokens"]) for by_d in samples.values() for ss in by_d.values() for s in ss), default=0)


def store_warnings(samples: dict[str, dict[str, list[dict]]], capacity: int, capacity_key: str) -> list[str]:
    """One line per task and distance whose longest document has more tokens than a long-term store of
    ``capacity`` entries holds (0: no long-term memory, none): its early facts are gone when the question
    comes, so the task scores ~0 for the store's size, not for retrieval (`--ltm-capacity 128` did so
    without a word). ``capacity_key`` names what set the size: `mnemo eval`'s flag, the run's config key."""
    out = []
    for name, by_d in samples.items():
        for D, ss in by_d.items():
            n = max((len(s["tokens"]) for s in ss), default=0)
            if capacity and n > capacity:
                out.append(
                    f"task {name} at D={D}: documents of up to {n:,} tokens, more than the {capacity_key}"
                    f" {capacity:,} entries the store holds: facts older than the store are forgotten"
                )
    return out


def score_tasks(
    model: Any, samples: dict[str, dict[str, list[dict]]], segment_len: int, batch_size: int, progress: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {D: {exact, lo, hi, trials, token_acc, tokens}}}.

    lo, hi: the 95 % Wilson interval of exact; token_acc: the mean over documents of each one's fraction of
    answer tokens right (``scoring.cell_stats``); tokens: the longest document. ``progress``: a bar over the
    segments to read (log lines when stderr is not a terminal).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    total = sum(teacher_forced_segments(ss, segment_len) for by_d in samples.values() for ss in by_d.values())
    bar = progress_bar(total, "tasks", progress)
    tick = bar.update if bar is not None else None
    for name, by_d in samples.items():
        out[name] = {}
        for D, ss in by_d.items():
            if not ss:
                continue
            preds, _ = score_teacher_forced(model, ss, segment_len, batch_size, tick=tick)
            exact, token_acc = cell_stats(ss, preds)
            k, n = int(exact.sum()), len(ss)
            lo, hi = wilson_interval(k, n)
            out[name][D] = {
                "exact": k / n,
                "lo": lo,
                "hi": hi,
                "trials": n,
                "token_acc": float(token_acc.mean()),
                "tokens": max(len(s["tokens"]) for s in ss),
            }
    if bar is not None:
        bar.close()
    return out


def metric_name(task_name: str) -> str:
    """A task's name as an MLflow metric path element: 'niah_multikey:k=4' -> 'niah_multikey_k4'
    (the rule of the training episodes' ``passkey/<task>/...`` metrics)."""
    return task_name.replace(":", "_").replace("=", "").replace(",", "_")
