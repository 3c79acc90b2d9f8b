"""The evaluation of one model: loss by position with memory ablations, passkey retrieval and long-context tasks.

`mnemo eval` (``evaluate_data_dir``), the trainer's in-run evaluation
(``train.eval_hook``) and the demo run ``evaluate``; ``report`` prints and
plots what it returns. It makes the same forward calls on every rank for the
same inputs (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import visible
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.heldout import filler_docs
from mnemo.evaluation.outputs import write_then_show
from mnemo.evaluation.inference import (
    check_memory,
    eval_mode,
    ltm_capacity_of,
    sized_ltm,
    store_bytes,
    with_ltm_capacity,
)
from mnemo.evaluation.report import format_table, json_ready, passkey_result, plots
from mnemo.evaluation.scoring import ABLATIONS, ablation_table, passkey_samples
from mnemo.evaluation.stats import NO_INTERVAL, bootstrap_ratio_interval
from mnemo.evaluation.task_eval import longest_document, score_tasks, store_warnings, task_samples

# Resamples of the documents behind each bootstrap interval of a loss (fixed seed: the same result every run).
N_BOOT = 1000


def _ratio_interval(sums: Any, counts: Any) -> tuple[float, float]:
    """bootstrap_ratio_interval of per-document loss sums over token counts; (nan, nan) when a sum is NaN or
    infinite (a diverged model's loss: the loss itself is reported NaN/inf, no interval), where the interval
    code, strict about its input, raised and ended a training run's final evaluation with a traceback."""
    if not np.isfinite(np.asarray(sums, dtype=np.float64)).all():
        return NO_INTERVAL
    return bootstrap_ratio_interval(sums, counts, n_boot=N_BOOT)


def loss_intervals(entry: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """({bucket: lo}, {bucket: hi}): 95 % bootstrap interval of each bucket's loss, resampling documents;
    NaN bounds (no interval) for a bucket with fewer than ``stats.MIN_BOOTSTRAP_UNITS`` documents or a loss
    that is not finite."""
    lo, hi = {}, {}
    for k, sums in entry.get("doc_loss_sums", {}).items():
        lo[k], hi[k] = _ratio_interval(sums, entry["doc_token_counts"][k])
    return lo, hi


def docs_by_position(entry: dict[str, Any]) -> dict[str, int]:
    """{bucket: documents with a token in it}: how many documents each bucket's interval resamples."""
    return {k: int(np.count_nonzero(v)) for k, v in entry.get("doc_token_counts", {}).items()}


def pooled_buckets(entry: dict[str, Any], min_tokens: int, key: str) -> dict[str, Any]:
    """``entry``'s per-document losses of the buckets at or above ``min_tokens`` pooled into one bucket ``key``
    (e.g. every token with >= 4T preceding tokens), for ``loss_intervals`` or ``paired_difference``."""
    sums = [np.asarray(v, dtype=np.float64) for k, v in entry.get("doc_loss_sums", {}).items() if int(k) >= min_tokens]
    counts = [
        np.asarray(v, dtype=np.float64) for k, v in entry.get("doc_token_counts", {}).items() if int(k) >= min_tokens
    ]
    if not sums:
        return {"doc_loss_sums": {}, "doc_token_counts": {}}
    return {"doc_loss_sums": {key: np.sum(sums, axis=0)}, "doc_token_counts": {key: np.sum(counts, axis=0)}}


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{bucket: {diff, lo, hi, docs}}: loss of ``a`` minus loss of ``b`` on the same documents, with a paired
    bootstrap interval (the same resampled documents for both); negative = ``a`` predicts better. ``docs``:
    the documents in the bucket; lo and hi are NaN (no interval) below ``stats.MIN_BOOTSTRAP_UNITS``."""
    out = {}
    for k, sums in a.get("doc_loss_sums", {}).items():
        sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(a["doc_token_counts"][k], dtype=np.float64)
        other = b.get("doc_loss_sums", {}).get(k)
        other = None if other is None else np.asarray(other, dtype=np.float64)
        if other is None or other.shape != sums.shape or not np.array_equal(counts, b["doc_token_counts"][k]):
            continue  # not the same tokens in this bucket: no pairing
        diff = sums - other
        lo, hi = _ratio_interval(diff, counts)
        out[k] = {"diff": float(diff.sum() / counts.sum()), "lo": lo, "hi": hi, "docs": int(np.count_nonzero(counts))}
    return out


def memory_advice(tasks: bool, models: Sequence[Any]) -> str:
    """What lowers the memory an evaluation needs (check_eval_memory, the CLI's memory_errors): --tasks only
    where tasks are scored, --ltm-capacity only where one of ``models`` (None: not read) has a long-term store."""
    flags = ["--distances", "--trials", *(["--tasks"] if tasks else []), "--batch-size"]
    flags += ["--ltm-capacity"] if any(m is not None and ltm_capacity_of(m) for m in models) else []
    return f"lower {', '.join(flags[:-1])} or {flags[-1]}"


def check_eval_memory(
    model: Any,
    baseline: Any,
    T: int,
    B: int,
    distances: Sequence[int],
    trials: int,
    task_distances: Sequence[int],
    task_docs: int,
    grow_ltm: bool,
) -> None:
    """EvalError, before anything is made, when the passkey and task documents (all of them are made
    first: ``trials`` per passkey distance, ``task_docs`` per task distance, (D + 1) * T int64 tokens each)
    and the long-term store (grown to the longest document's D * T entries with ``grow_ltm``) cannot fit
    in the memory available (``inference.check_memory``).

    A lower bound: the documents of one distance are read together in at most ``B`` slots, so the longest
    ones take min(B, their number) slots (counting B refused `--distances 6000 --trials 1` for 32 slots
    where one is used); the held-out documents' store is not counted."""
    host = 8 * T * (trials * sum(D + 1 for D in distances) + task_docs * sum(D + 1 for D in task_distances))
    longest = max([0, *distances, *task_distances])
    slots = max(1, min(B, max(trials if distances else 0, task_docs if task_distances else 0)))
    store = 0
    for m in (model, baseline):
        if m is not None and ltm_capacity_of(m):
            cap = max(ltm_capacity_of(m), longest * T) if grow_ltm else ltm_capacity_of(m)
            store = max(store, store_bytes(m, slots, cap, T))
    what = f"the evaluation ({slots} slot(s); documents of up to {(longest + 1) * T:,} tokens)"
    check_memory(model, store, host, what, memory_advice(bool(task_distances), (model, baseline)))


def evaluate(
    model: Any,
    tokenizer: Any,
    heldout_docs: Sequence[np.ndarray],
    cfg: Any,
    *,
    ablations: bool = True,
    passkey: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    max_docs: int | None = None,
    passkey_trials: int | None = None,
    distances: Sequence[int] | None = None,
    multikey: int = 0,
    progress: bool = False,
    tasks: Sequence[Any] = (),
    task_distances: Sequence[int] | None = None,
    task_trials: int | None = None,
    grow_ltm: bool = False,
    baseline: Any = None,
    baseline_segment_len: int | None = None,
    doc_losses: bool = False,
    skip_unfit_tasks: bool = False,
    capacity_key: str = "--ltm-capacity",
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The evaluation of one model, as a JSON-ready dict.

    heldout_docs: held-out corpus documents (no passkey documents); the
    first ``max_docs`` (default cfg.eval.max_docs), cut to
    cfg.eval.max_doc_tokens, are read for loss by position; the first ones
    holding heldout.FILLER_TOKENS tokens (heldout.filler_docs, whatever
    max_docs) serve as passkey and task filler. Defaults come from cfg.eval; cfg.model.segment_len is T.
    tasks: ``data_pipeline.tasks.TaskSpec``s scored at ``task_distances``
    (default cfg.eval.task_distances) with ``task_trials`` documents each
    (default cfg.eval.task_trials). grow_ltm: size the long-term store for
    the longest passkey or task document for the evaluation (D * T entries for
    a passkey at D) when the trained size is smaller; the size is restored after.
    baseline: a second model (e.g. without memory, segment length
    ``baseline_segment_len``, default T) read on the same documents; its
    losses are bucketed by T (the memory model's buckets), whatever its own
    segment length.
    Keys: segment_len, num_docs, loss_by_position {bucket: loss},
    loss_by_position_lo/_hi (bootstrap over documents; NaN with fewer than 2
    documents in the bucket), docs_by_position, tokens_by_position,
    loss, bits_per_token, ablations {name: {...}}, memory_minus {"no_ltm" |
    "baseline": {bucket: {diff, lo, hi, docs}}}, passkey {D: acc}, passkey_lo,
    passkey_hi (Wilson), passkey_by_depth, passkey_digit_accuracy,
    passkey_answer_loss, passkey_trials, passkey_multikey (when multikey > 0),
    tasks {name: {D: {exact, lo, hi, trials, token_acc, tokens}}}, baseline
    {loss_by_position, loss, bits_per_token, segment_len, tasks} (with a baseline),
    ltm_capacity, seconds; with ``doc_losses`` also doc_loss_sums and
    doc_token_counts {bucket: [per document]} of the memory column (lists:
    for a paired difference against a model evaluated elsewhere). With
    ``skip_unfit_tasks`` a task that does not fit T (EvalError otherwise) is
    left out, its reason in tasks_skipped {name: message}. A task document longer than the long-term store is
    one line to ``warn`` (default: `mnemo eval: warning: ...` on stderr) naming ``capacity_key``, what sized the
    store (the in-run evaluation: memory.long.capacity).
    """
    T = int(cfg.model.segment_len)
    B = int(cfg.train.batch_size if batch_size is None else batch_size)
    max_docs = cfg.eval.max_docs if max_docs is None else max_docs
    if B < 1:
        raise EvalError(f"--batch-size: must be >= 1, got {B}")
    if max_docs < 0:  # a negative slice bound would drop documents from the end
        raise EvalError(f"--max-docs: must be >= 0, got {max_docs}")
    docs = [np.asarray(d, dtype=np.int64)[: cfg.eval.max_doc_tokens] for d in list(heldout_docs)[:max_docs]]
    filler = filler_docs(heldout_docs)
    trials = cfg.eval.passkey_trials if passkey_trials is None else passkey_trials
    dists = list(cfg.eval.passkey_distances if distances is None else distances)
    result: dict[str, Any] = {"segment_len": T, "num_docs": len(docs)}
    seconds: dict[str, float] = {}
    samples: dict[str, dict[str, list[dict]]] = {}
    skipped: dict[str, str] | None = {} if skip_unfit_tasks else None
    run_passkey = passkey and trials > 0 and bool(dists)
    t_dists = list(getattr(cfg.eval, "task_distances", [1, 8]) if task_distances is None else task_distances)
    t_trials = int(getattr(cfg.eval, "task_trials", 100) if task_trials is None else task_trials)
    check_eval_memory(
        model,
        baseline,
        T,
        B,
        dists if run_passkey else [],
        trials,
        t_dists if tasks else [],
        t_trials * len(tasks),
        grow_ltm,
    )
    if tasks:
        if not heldout_docs:
            raise EvalError("task evaluation needs held-out documents for filler; none given")
        t0 = time.perf_counter()
        samples = task_samples(tasks, tokenizer, filler, T, t_dists, t_trials, seed, skipped)
        seconds["task_documents"] = time.perf_counter() - t0
        if skipped:
            result["tasks_skipped"] = skipped
    if run_passkey:
        if not heldout_docs:
            raise EvalError("passkey evaluation needs held-out documents for filler; none given")
        # Fit-checked before anything is scored: passkey_report makes its documents after the loss by
        # position (and the multi-key ones after the single-key pass key), so K facts that cannot fit in
        # D + 1 segments were refused minutes (at long D, hours) in. One document per distance and key
        # count (documents depend only on seed, D and the key count).
        from mnemo.data_pipeline.errors import DataError
        from mnemo.data_pipeline.passkey import RoundTripError

        try:
            for n_keys in (1, multikey) if multikey > 0 else (1,):
                for D in sorted(set(dists)):
                    passkey_samples(tokenizer, filler, T, D, trials=1, seed=seed, n_keys=n_keys)
        except RoundTripError:
            raise  # says its own way out
        except DataError as e:  # a pass key too long for the segment: the rest of the evaluation can still run
            # Still a DataError: a run's evaluation hook skips (not stops on) documents that cannot be built.
            raise DataError(f"{e}; without a pass key: --passkey-trials 0 (eval.passkey_trials=0 in a run)") from None
    # A fact D segments back needs D * T entries: a store of the trained size would have dropped
    # it before the question comes (FIFO), which tests the size, not retrieval.
    need = max((max(dists) * T) if run_passkey else 0, longest_document(samples))
    capacity = max(ltm_capacity_of(model), need) if grow_ltm and ltm_capacity_of(model) else None
    with eval_mode(model), sized_ltm(model, capacity):
        result["ltm_capacity"] = ltm_capacity_of(model)
        t0 = time.perf_counter()
        names = list(ABLATIONS) if ablations else ["memory"]
        table = ablation_table(model, docs, T, B, names, progress=progress)
        seconds["loss_by_position"] = time.perf_counter() - t0
        main = table["memory"]
        lo, hi = loss_intervals(main)
        result.update(
            loss_by_position=main["loss_by_position"],
            loss_by_position_lo=lo,
            loss_by_position_hi=hi,
            docs_by_position=docs_by_position(main),
            tokens_by_position=main["tokens_by_position"],
            loss=main["loss"],
            bits_per_token=main["bits_per_token"],
            num_tokens=main["tokens"],
        )
        if doc_losses:
            for key in ("doc_loss_sums", "doc_token_counts"):
                result[key] = {k: v.tolist() for k, v in main[key].items()}
        result["ablations"] = {
            k: {kk: v[kk] for kk in ("loss_by_position", "loss", "bits_per_token")} for k, v in table.items()
        }
        if "no_ltm" in table:
            result["memory_minus"] = {"no_ltm": paired_difference(main, table["no_ltm"])}
        if run_passkey:  # held-out documents (the filler) checked above
            result.update(
                passkey_result(
                    model,
                    tokenizer,
                    filler,
                    T,
                    dists,
                    trials=trials,
                    seed=seed,
                    batch_size=B,
                    multikey=multikey,
                    progress=progress,
                    seconds=seconds,
                )
            )
        if samples:
            for line in store_warnings(samples, ltm_capacity_of(model), capacity_key):  # a store smaller than the tasks
                if warn is None:
                    print(f"mnemo eval: warning: {line}", file=sys.stderr, flush=True)
                else:
                    warn(line)
            t0 = time.perf_counter()
            result["tasks"] = score_tasks(model, samples, T, B, progress=progress)
            seconds["tasks"] = time.perf_counter() - t0
    if baseline is not None:
        Tb = int(baseline_segment_len or T)
        t0 = time.perf_counter()
        base_cap = max(ltm_capacity_of(baseline), need) if grow_ltm and ltm_capacity_of(baseline) else None
        with eval_mode(baseline), sized_ltm(baseline, base_cap):
            # Read in its own segments but bucketed by T: its bucket "0" is then the memory model's
            # [0, T) too (bucketed by Tb it was [0, Tb), printed in the row of [0, T)).
            base = ablation_table(baseline, docs, Tb, B, ["memory"], progress=progress, bucket_len=T)["memory"]
            result["baseline"] = {k: base[k] for k in ("loss_by_position", "loss", "bits_per_token")}
            result["baseline"]["segment_len"] = Tb
            # The same documents in the same buckets: a paired difference per bucket, whatever Tb.
            result.setdefault("memory_minus", {})["baseline"] = paired_difference(main, base)
            if samples:
                result["baseline"]["tasks"] = score_tasks(baseline, samples, Tb, B, progress=progress)
        seconds["baseline"] = time.perf_counter() - t0
    result["seconds"] = seconds
    return result


def evaluate_data_dir(
    model: Any,
    tokenizer: Any,
    cfg: Any,
    data_dir: str,
    *,
    max_docs: int | None = None,
    passkey_trials: int | None = None,
    distances: Sequence[int] = (1, 2, 4, 8, 16, 32),
    multikey: int = 0,
    tasks: Sequence[Any] = (),
    batch_size: int = 32,
    ablations: bool = True,
    seed: int = 0,
    ltm_capacity: int | None = None,
    baseline: tuple[Any, Any, Any] | None = None,
    task_trials: int | None = None,
    json_out: str | None = None,
    plots_dir: str | None = None,
    labels: dict[str, str] | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """`mnemo eval`: evaluate a loaded model on the held-out documents of an MDS dir; print, write JSON and plots.

    passkey_trials: passkey documents per distance (None: cfg.eval.passkey_trials
    or 30; 0 skips the passkey), also the documents per (task, distance)
    (None: cfg.eval.task_trials) unless ``task_trials`` counts those. ltm_capacity: the long-term store size
    (None: the trained size, grown for the longest passkey or task document).
    baseline: (model, tokenizer, cfg) of a second checkpoint read on the same documents
    and task samples. labels: extra string keys of the JSON (checkpoint,
    data). Returns the result (``evaluate``'s keys plus labels).
    """
    from mnemo.evaluation.heldout import FILLER_TOKENS, check_data_tokenizer, read_heldout_docs

    check_data_tokenizer(data_dir, tokenizer)
    base_model, base_tok, base_cfg = baseline if baseline is not None else (None, None, None)
    if base_model is not None and getattr(base_tok, "sha256", None) != getattr(tokenizer, "sha256", None):
        raise EvalError("--baseline: its tokenizer is not the checkpoint's (the same documents need the same tokens)")
    max_docs = cfg.eval.max_docs if max_docs is None else max_docs
    docs = read_heldout_docs(
        data_dir, cfg.data.val_fraction, max_docs, min_tokens=FILLER_TOKENS, vocab_size=tokenizer.vocab_size
    )
    trials = passkey_trials
    if trials is None:
        trials = cfg.eval.passkey_trials or 30
    n_task = cfg.eval.task_trials if passkey_trials is None else passkey_trials
    n_task = n_task if task_trials is None else task_trials
    if tasks and n_task < 1:
        raise EvalError(
            f"--{'task-' if task_trials is not None else ''}trials: must be >= 1 with --tasks, got {n_task}"
        )
    with_ltm_capacity(model, ltm_capacity)
    if base_model is not None:
        with_ltm_capacity(base_model, ltm_capacity)
    t0 = time.perf_counter()
    result = evaluate(
        model,
        tokenizer,
        docs,
        cfg,
        ablations=ablations,
        passkey=trials > 0,
        seed=seed,
        batch_size=batch_size,
        max_docs=max_docs,
        passkey_trials=trials,
        distances=distances,
        multikey=multikey,
        progress=True,
        tasks=tasks,
        task_distances=distances,
        task_trials=n_task,
        grow_ltm=ltm_capacity is None,
        baseline=base_model,
        baseline_segment_len=int(base_cfg.model.segment_len) if base_cfg is not None else None,
    )
    result.update(labels or {})
    seconds = time.perf_counter() - t0

    def show() -> None:
        echo(format_table(result))
        echo(f"\n(evaluated in {seconds:.1f} s)")

    # The JSON first (a table or plot that fails must not lose the evaluation); on a full disk, the table anyway.
    write_then_show(json_out or None, lambda: json_ready(result), show)
    # The names come from --json / --plots: an escape sequence or a byte that is not UTF-8 is shown escaped.
    if json_out:
        echo(visible(f"wrote {json_out}"))
    if plots_dir:
        for p in plots(result, plots_dir):
            echo(visible(f"wrote {p}"))
    return result
