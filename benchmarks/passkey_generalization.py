"""Length generalization of passkey retrieval: a model trained at D <= 8 segments, asked at D up to 1024.

    python benchmarks/passkey_generalization.py [CHECKPOINT] [--data DATA_DIR]
        [--distances 8,32,256,1024] [--trials 6] [--multikey 4] [--multikey-distances 8,32]

CHECKPOINT defaults to the demo's memory model (runs/demo/memory), DATA_DIR to
runs/demo/data. For each distance D the long-term store is sized to hold the
whole document (D * T entries per slot and layer), so what is measured is the
learned retrieval among D * T candidates, not the FIFO. The passkey documents
are built on held-out filler (``evaluation.scoring.passkey_report``; the same
documents for a given seed). The multi-key variant hides K facts
"The pass key of door N is NNNNN." and asks for one of them.

Prints one table (exact match of greedy decoding, per-digit accuracy, answer
loss, seconds) and writes it as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def measure(model, tok, filler, T: int, D: int, trials: int, batch: int, n_keys: int, seed: int) -> dict:
    """One row: passkey at distance D with the store sized for the whole document."""
    from mnemo.evaluation.inference import with_ltm_capacity
    from mnemo.evaluation.scoring import passkey_report

    with_ltm_capacity(model, max(D * T, model.args.ltm_topk))
    t0 = time.perf_counter()
    rep = passkey_report(model, tok, filler, T, [D], trials=trials, seed=seed, batch_size=batch, n_keys=n_keys)
    k = str(D)
    return {
        "D": D,
        "tokens": D * T,
        "keys": n_keys,
        "trials": trials,
        "exact": rep["accuracy"][k],
        "by_depth": rep["by_depth"][k],
        "digits": rep["digit_accuracy"][k],
        "answer_nll": rep["answer_loss"][k],
        "ltm_capacity": model.args.ltm_capacity,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default="runs/demo/memory")
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--distances", type=_ints, default=[8, 32, 256, 1024])
    p.add_argument("--trials", type=int, default=6, help="documents per distance (depths start/middle/end in turn)")
    p.add_argument("--multikey", type=int, default=4, metavar="K", help="facts per document of the harder variant")
    p.add_argument("--multikey-distances", type=_ints, default=[8, 32])
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    import torch

    from mnemo.train.checkpoint import load_for_inference
    from mnemo.evaluation.heldout import FILLER_TOKENS, read_heldout_docs

    torch.set_num_threads(args.threads)
    model, tok, cfg = load_for_inference(args.checkpoint)
    if model.args.ltm_kind == "none":
        print(f"{args.checkpoint}: the model has no long-term memory; nothing to generalize", file=sys.stderr)
        return 2
    T = cfg.model.segment_len
    filler = read_heldout_docs(args.data, cfg.data.val_fraction, None, min_tokens=FILLER_TOKENS)
    trained = cfg.memory.long.capacity
    print(
        f"passkey length generalization: {args.checkpoint} (T={T}, long-term store trained with {trained} "
        f"entries, top-k {model.args.ltm_topk}); store sized D*T at each D; {sum(len(d) for d in filler):,} "
        f"held-out filler tokens"
    )
    head = (
        f"{'keys':>4} {'D':>6} {'tokens':>8} {'trials':>6} {'exact':>6} {'start':>6} {'middle':>6} {'end':>6} "
        f"{'digits':>6} {'ans nll':>8} {'seconds':>8}"
    )
    print(head, flush=True)
    rows = []
    plan = [(1, D) for D in args.distances]
    if args.multikey > 1:
        plan += [(args.multikey, D) for D in args.multikey_distances]
    for n_keys, D in plan:
        r = measure(model, tok, filler, T, D, args.trials, args.batch_size, n_keys, args.seed)
        rows.append(r)
        bd = r["by_depth"]
        print(
            f"{n_keys:>4} {D:>6} {r['tokens']:>8} {r['trials']:>6} {r['exact']:>6.3f} "
            + " ".join(f"{bd.get(d, float('nan')):>6.3f}" for d in ("start", "middle", "end"))
            + f" {r['digits']:>6.3f} {r['answer_nll']:>8.3f} {r['seconds']:>8.1f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"checkpoint": args.checkpoint, "segment_len": T, "rows": rows}, indent=1) + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
