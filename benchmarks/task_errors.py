"""Where the wrong answers of a long-context task go wrong first.

    python benchmarks/task_errors.py CHECKPOINT --data DATA [--task variable_tracking:h=2] [--distance 8]
        [--trials 200] [--seed 0]

The documents are those of ``mnemo eval CHECKPOINT --data DATA --tasks TASK --distances D`` (held-out filler,
seeded by (seed, D, task)), scored as it scores them: teacher-forced argmax at every answer token, exact when
all are right. A list answer ("QRXPU, VFBHH, WXAMV": variable tracking's names, multi-value NIAH's values) is
split into its items at the separator's tokens, and each wrong document is counted by the item and the token
within it where its first wrong argmax is. For a first token read wrong, it also counts whether the token the
model chose occurs anywhere in the document before the question (not at all: a blurred read, no copy of a
wrong token). For a later token of an item read wrong, whether the token before it (right: teacher-forced)
occurs elsewhere before the question followed by another token, and whether the model chose such a follower:
a copy that went on from the wrong occurrence (names that begin with the same token: "VEWPC" and "VEQKL" are
VE W P C and VE Q K L, and the window before the second token, " VAR VE", is the same in both facts).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def first_error(before, answer, pred, sep) -> tuple[int, int, str] | None:
    """Where a list answer's first wrong argmax is, and what kind of miss it is; None when all are right.

    before   [L] the document's tokens before the answer (facts, filler, question)
    answer   [A] the answer's tokens; pred [A] the model's argmax at each of them (teacher-forced)
    sep      [S] the separator's tokens between the answer's items (Pieces.separator())
    Returns (item, token within it, kind). A first token: "copied" (the model chose a token of ``before``) or
    "blurred" (one ``before`` does not hold). A later token: "went on" (the token before it occurs elsewhere in
    ``before`` followed by another, and the model chose that follower), "ambiguous" (such followers exist, the
    model chose none of them) or "unique" (the token before it is followed by the right token wherever it occurs).
    """
    import numpy as np

    wrong = np.flatnonzero(pred != answer)
    if wrong.size == 0:
        return None
    t = int(wrong[0])
    # Item starts: 0 and each token after a separator.
    n = sep.size
    starts = [0] + [i + n for i in range(answer.size - n + 1) if np.array_equal(answer[i : i + n], sep)]
    item = max(k for k, st in enumerate(starts) if st <= t)
    if t == starts[item]:
        return item, 0, "copied" if np.any(before == pred[t]) else "blurred"
    at = np.flatnonzero(before[:-1] == answer[t - 1]) + 1  # where the token before the wrong one is followed
    others = {int(x) for x in before[at]} - {int(answer[t])}
    kind = "unique" if not others else ("went on" if int(pred[t]) in others else "ambiguous")
    return item, t - starts[item], kind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="the prepared data dir (held-out documents give the filler)")
    p.add_argument("--task", default="variable_tracking:h=2")
    p.add_argument("--distance", type=int, default=8)
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the documents (mnemo eval's default: 0)")
    args = p.parse_args(argv)

    from mnemo.data_pipeline.task_layout import Pieces
    from mnemo.evaluation.heldout import FILLER_TOKENS, filler_docs, read_heldout_docs
    from mnemo.evaluation.inference import with_ltm_capacity
    from mnemo.evaluation.scoring import score_teacher_forced
    from mnemo.evaluation.stats import wilson_interval
    from mnemo.evaluation.task_eval import longest_document, task_samples, task_specs
    from mnemo.train.checkpoint import load_for_inference

    model, tok, cfg = load_for_inference(args.checkpoint, device="cpu")
    model.eval()
    T = cfg.model.segment_len
    docs = read_heldout_docs(args.data, cfg.data.val_fraction, min_tokens=FILLER_TOKENS, vocab_size=tok.vocab_size)
    spec = task_specs([args.task])[0]
    samples = task_samples([spec], tok, filler_docs(docs), T, [args.distance], args.trials, args.seed)
    with_ltm_capacity(model, max(cfg.memory.long.capacity, longest_document(samples)))
    ss = samples[spec.name][str(args.distance)]
    preds, _ = score_teacher_forced(model, ss, T, 16)

    sep = Pieces(tok).separator()  # the list answer's separator, as the generators encode it
    firsts: Counter = Counter()  # (item, token in it) -> documents
    kinds: Counter = Counter()
    for s, pred in zip(ss, preds):
        start = s["answer_start"]
        miss = first_error(s["tokens"][:start], s["tokens"][start : start + s["answer_len"]], pred, sep)
        if miss is not None:
            firsts[miss[:2]] += 1
            kinds[miss[2]] += 1
    n, k = len(ss), len(ss) - sum(firsts.values())
    lo, hi = wilson_interval(k, n)
    print(f"{spec.name} D={args.distance}: exact {k / n:.2f} [{lo:.2f}, {hi:.2f}] of {n} (teacher-forced)")
    print("first wrong token (item, token in item): documents")
    for (item, pos), c in sorted(firsts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  ({item}, {pos}): {c}")
    copied, blurred = kinds["copied"], kinds["blurred"]
    print(f"a first token read wrong: {copied} chose a token of the document, {blurred} one it does not hold")
    ambiguous = kinds["went on"] + kinds["ambiguous"]
    print(
        f"a later token read wrong: {ambiguous + kinds['unique']}; the token before it is followed elsewhere by "
        f"another in {ambiguous}, and the model chose that follower in {kinds['went on']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
