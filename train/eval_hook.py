"""In-run evaluation: the held-out documents a run scores and the eval the trainer runs every ``eval.every`` steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mnemo.train.config import Config

log = logging.getLogger("mnemo.train")


def heldout_docs(source, cfg: Config, vocab_size: int = 0) -> list:
    """The held-out corpus documents a run scores: the first eval.max_docs, each cut to eval.max_doc_tokens;
    with ``vocab_size`` > 0 a token id outside the vocabulary is a DataError naming the shard (read_docs)."""
    from mnemo.evaluation.heldout import read_docs

    return read_docs(
        source,
        cfg.data.val_fraction,
        max_docs=cfg.eval.max_docs,
        max_doc_tokens=cfg.eval.max_doc_tokens,
        vocab_size=vocab_size,
    )


_warned_no_heldout = False  # one warning per process, not one per eval.interval


def warn_no_heldout(cfg: Config) -> None:
    """Say, once, that the evaluation the config asks for is skipped: there is no held-out document.

    The passkey and task evaluations take their filler text from the held-out documents
    (evaluation/evaluate.py), so they are skipped with the held-out loss rather than run on nothing.
    """
    global _warned_no_heldout
    if _warned_no_heldout:
        return
    _warned_no_heldout = True
    also = [k for k, on in (("eval.passkey_trials", cfg.eval.passkey_trials > 0), ("eval.tasks", cfg.eval.tasks)) if on]
    log.warning(
        "eval: no held-out documents (data.val_fraction %s%s): the held-out loss is skipped%s",
        cfg.data.val_fraction,
        ", eval.max_docs 0" if cfg.eval.max_docs == 0 else "",
        f", and so is the evaluation of {' and '.join(also)}, which takes its filler from them" if also else "",
    )


def run_eval(cfg: Config, module, source, tok_file: str, tracker, step: int, rank: int) -> dict[str, Any]:
    """Held-out evaluation on every rank (identical forwards, as ZeRO-3 needs), logged by rank 0."""
    from mnemo.data_pipeline.errors import DataError
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.data_pipeline.files import OutputTaken
    from mnemo.evaluation.evaluate import evaluate
    from mnemo.evaluation.outputs import write_eval_json
    from mnemo.evaluation.report import flat_metrics, json_ready, plots
    from mnemo.evaluation.task_eval import task_specs

    # Training checks each document it reads against the vocabulary; held-out ones it never reads. One past it
    # was torch's IndexError (a device-side assert on a GPU) in the middle of a run: the evaluation is skipped
    # instead, as for a passkey document that cannot be built below (the same documents on every rank).
    vocab = getattr(getattr(module, "args", None), "vocab_size", 0)
    try:
        docs = heldout_docs(source, cfg, vocab_size=vocab if isinstance(vocab, int) else 0)
    except DataError as e:
        if rank == 0:
            log.warning("eval at step %d skipped: %s", step, e)
        return {}
    if not docs:
        if rank == 0:
            warn_no_heldout(cfg)
        return {}
    # Validated with the config; eval.task_distances and eval.task_trials are evaluate()'s defaults.
    # The store keeps its trained size here (training goes on with it): a document longer than
    # memory.long.capacity loses its first facts, as in training; `mnemo eval` sizes it for the longest.
    tasks = task_specs(cfg.eval.tasks, "eval.tasks")
    # evaluate() runs the module in eval mode and restores training mode (evaluation.inference.eval_mode).
    try:
        result = evaluate(
            module,
            Tokenizer(tok_file),
            docs,
            cfg,
            ablations=False,
            passkey=cfg.eval.passkey_trials > 0,
            seed=cfg.train.seed,
            tasks=tasks,
            skip_unfit_tasks=True,  # a task too long for model.segment_len: a warning, not a failed run
            capacity_key="memory.long.capacity",  # the store keeps the trained size (above)
            warn=lambda line: log.warning("eval.tasks: %s", line) if rank == 0 else None,
        )
    except DataError as e:
        # A passkey document that cannot be built (the pre-flight, check_passkey_eval_fit, refuses the known
        # cases): raised here, it stopped the run before the checkpoint of this step, and a relaunch lost the
        # same steps again. Documents are a function of the config, tokenizer, held-out documents and seed,
        # the same on every rank, so every rank skips at the same point and none waits in a collective
        # (EvalError, e.g. memory, which may differ between ranks, still stops the run).
        if rank == 0:
            log.warning("eval at step %d skipped: %s", step, e)
        return {}
    metrics = flat_metrics(result)
    tracker.log_metrics(metrics, step)
    if rank == 0:
        for name, why in result.get("tasks_skipped", {}).items():
            log.warning("eval.tasks: %s left out: %s", name, why)
        out = Path(cfg.run.dir) / "eval" / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        # Strict JSON: a bucket with too few documents for an interval has NaN bounds (null here). Written whole,
        # never through a link put there, and only over an evaluation JSON mnemo wrote (a relaunch's same step).
        try:
            write_eval_json(out / "eval.json", json_ready(result))
        except OutputTaken as e:
            log.warning(
                "eval at step %d: %s exists and is not an evaluation JSON mnemo wrote; not replacing it (%s)",
                step,
                out / "eval.json",
                e.kept_note("evaluation JSON"),
            )
        else:
            tracker.log_artifact(str(out / "eval.json"), f"eval/step_{step:08d}")
        try:
            for png in plots(result, str(out)):
                tracker.log_artifact(png, f"eval/step_{step:08d}")
        except Exception as e:  # plots are a nicety; never fail training for them
            log.warning("eval plots failed: %s", e)
        log.info("eval at step %d: loss %.4f", step, metrics.get("eval/loss", float("nan")))
    return result
