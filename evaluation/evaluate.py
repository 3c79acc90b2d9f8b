"""The evaluation of one model: loss by position with memory ablations, and passkey retrieval.

`mnemo eval`, the trainer's in-run evaluation (``train.eval_hook``) and the
demo run this; ``report`` prints and plots what it returns. It makes the same
forward calls on every rank for the same inputs (ZeRO-3 gathers parameters
collectively).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.inference import eval_mode
from mnemo.evaluation.report import passkey_result
from mnemo.evaluation.scoring import ABLATIONS, ablation_table


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
) -> dict[str, Any]:
    """The evaluation of one model, as a JSON-ready dict.

    heldout_docs: held-out corpus documents (no passkey documents); the
    first ``max_docs`` (default cfg.eval.max_docs), cut to
    cfg.eval.max_doc_tokens, are read for loss by position; all of them serve
    as passkey filler. Defaults come from cfg.eval; cfg.model.segment_len is T.
    Keys: segment_len, num_docs, loss_by_position {bucket: loss},
    tokens_by_position, loss, bits_per_token, ablations {name: {...}},
    passkey {D: acc}, passkey_by_depth, passkey_digit_accuracy,
    passkey_answer_loss, passkey_trials, passkey_multikey (when multikey > 0), seconds.
    """
    T = int(cfg.model.segment_len)
    B = int(batch_size or max(cfg.train.batch_size, 1))
    max_docs = cfg.eval.max_docs if max_docs is None else max_docs
    docs = [np.asarray(d, dtype=np.int64)[: cfg.eval.max_doc_tokens] for d in list(heldout_docs)[:max_docs]]
    trials = cfg.eval.passkey_trials if passkey_trials is None else passkey_trials
    dists = list(cfg.eval.passkey_distances if distances is None else distances)
    result: dict[str, Any] = {"segment_len": T, "num_docs": len(docs)}
    seconds: dict[str, float] = {}
    with eval_mode(model):
        t0 = time.perf_counter()
        names = list(ABLATIONS) if ablations else ["memory"]
        table = ablation_table(model, docs, T, B, names, progress=progress)
        seconds["loss_by_position"] = time.perf_counter() - t0
        main = table["memory"]
        result.update(
            loss_by_position=main["loss_by_position"],
            tokens_by_position=main["tokens_by_position"],
            loss=main["loss"],
            bits_per_token=main["bits_per_token"],
            num_tokens=main["tokens"],
        )
        result["ablations"] = {
            k: {kk: v[kk] for kk in ("loss_by_position", "loss", "bits_per_token")} for k, v in table.items()
        }
        if passkey and trials > 0 and dists:
            if not heldout_docs:
                raise EvalError("passkey evaluation needs held-out documents for filler; none given")
            result.update(
                passkey_result(
                    model,
                    tokenizer,
                    list(heldout_docs),
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
    result["seconds"] = seconds
    return result
