"""What mnemo's memory costs, measured side by side in one run (CPU).

1. Training step (forward + backward + AdamW) at T=512, B=4, size `debug`
   (``--size small --batch 1`` for the 125M model):
   no memory, short-term memory (M=512) and short+long-term memory
   (N=8192, k=32, one LTM layer) with both memories full, as in the steady
   state of long documents. Ratios of median step times.
2. The no-memory model next to Hugging Face `GPT2LMHeadModel` with the same
   layers, width, heads, vocabulary, T and B (plain PyTorch loop, same AdamW,
   same loss code): tokens/s ratio.
3. Reading one long document segment by segment (T=512, B=1, inference mode,
   loss computed per segment as evaluation does) with STM (M=512) and LTM
   (N=8192, FIFO: the store keeps the newest 8192 tokens, so per-segment cost
   is bounded) for L = 4k, 16k and 64k tokens: time ratios. A 4k document
   never fills the store; past 8k tokens every segment searches all N keys.

Arms alternate inside each round (order rotated every round) so machine noise
hits all of them alike; medians over rounds are compared. Wall-clock times
are the result; process CPU times (all threads) are printed beside them
because on a shared machine they are the steadier figure.

    .venv/bin/python benchmarks/memory_cost.py [--vocab 4096 32000] [--rounds 5] [--doc-rounds 2]
        [--size debug|small] [--batch 4] [--skip train gpt2 doc]

At the `debug` width (d=128) one exact kNN search over 8192 keys costs about
as much as the rest of a layer stack's step, so the LTM ratios are the
worst case; at `small` (d=768, 12 layers) the same search is a small share.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mnemo.model import MemoryState, MemoryTransformer, ModelArgs, SIZES  # noqa: E402

SIZE, T, B = "debug", 512, 4
M, N, TOPK = 512, 8192, 32


def build(vocab: int, **memory) -> MemoryTransformer:
    torch.manual_seed(0)
    return MemoryTransformer(ModelArgs.from_size(SIZE, vocab, **memory))


def full_state(model: MemoryTransformer, batch: int) -> MemoryState:
    """A memory state whose short- and long-term memories are full of unit-norm keys."""
    empty = model.init_state(batch)
    g = torch.Generator().manual_seed(1)

    def fill(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else F.normalize(torch.randn(t.shape, generator=g), dim=-1)

    layers = tuple(m._map(fill) for m in empty.layers)
    full = torch.ones(batch, dtype=torch.long)
    return MemoryState(
        layers=layers, stm_len=full * empty.stm_capacity, ltm_len=full * empty.ltm_capacity, pos=full * 100_000
    )


def train_step_fn(forward: Callable[[torch.Tensor], torch.Tensor], params, tokens: torch.Tensor):
    """One optimizer step: logits of tokens[:, :-1], CE against tokens[:, 1:], backward, AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        logits = forward(tokens[:, :-1])  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(arms: dict[str, Callable[[], None]], rounds: int, warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Median (wall s, CPU s) per arm; arms alternate inside each round, order rotated per round."""
    names = list(arms)
    for _ in range(warmup):
        for n in names:
            arms[n]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            arms[n]()
            cpu[n].append(time.process_time() - c0)
            wall[n].append(time.perf_counter() - w0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def bench_training(vocab: int, rounds: int) -> None:
    tokens = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(2))
    arms = {}
    for name, memory in (
        ("none", {}),
        ("stm", dict(stm_length=M)),
        ("stm+ltm", dict(stm_length=M, ltm_kind="knn", ltm_capacity=N, ltm_topk=TOPK)),
    ):
        model = build(vocab, **memory)
        state = full_state(model, B)
        arms[name] = train_step_fn(lambda x, m=model, s=state: m(x, s)[0], model.parameters(), tokens)
    res = interleaved(arms, rounds)
    w0, c0 = res["none"]
    print(
        f"train step {SIZE} T={T} B={B} vocab={vocab}: none {w0:.3f}s, stm(M={M}) {res['stm'][0]:.3f}s, "
        f"stm+ltm(N={N},k={TOPK}) {res['stm+ltm'][0]:.3f}s (medians of {rounds})"
    )
    for name, target in (("stm", 1.3), ("stm+ltm", 1.6)):
        w, c = res[name]
        print(f"  {name}/none step time: {w / w0:.2f}x wall, {c / c0:.2f}x cpu (target <= {target}x)")


def bench_gpt2(vocab: int, rounds: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SIZES[SIZE]
    tokens = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(3))
    ours = build(vocab)
    state = ours.init_state(B)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=T,
        n_embd=s.d_model,
        n_layer=s.n_layers,
        n_head=s.n_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    gpt2 = GPT2LMHeadModel(cfg)
    arms = {
        "mnemo": train_step_fn(lambda x: ours(x, state)[0], ours.parameters(), tokens),
        "gpt2": train_step_fn(lambda x: gpt2(input_ids=x).logits, gpt2.parameters(), tokens),
    }
    res = interleaved(arms, rounds)
    (wm, cm), (wg, cg) = res["mnemo"], res["gpt2"]
    n_ours, n_gpt2 = ours.num_params(), sum(p.numel() for p in gpt2.parameters())
    print(
        f"vs GPT2LMHeadModel ({s.n_layers} layers, d={s.d_model}, {s.n_heads} heads, T={T}, B={B}, vocab={vocab}; "
        f"params {n_ours} vs {n_gpt2}): mnemo {B * T / wm:.0f} tok/s, gpt2 {B * T / wg:.0f} tok/s"
    )
    print(f"  mnemo/gpt2 tokens/s: {wg / wm:.2f}x wall, {cg / cm:.2f}x cpu (target >= 1.0x)")


def bench_long_document(vocab: int, rounds: int, lengths: tuple[int, ...]) -> None:
    model = build(vocab, stm_length=M, ltm_kind="knn", ltm_capacity=N, ltm_topk=TOPK).eval()
    doc = torch.randint(0, vocab, (1, max(lengths) + 1), generator=torch.Generator().manual_seed(4))

    @torch.inference_mode()
    def read(L: int) -> None:
        state = model.init_state(1)
        for s0 in range(0, L, T):
            logits, state = model(doc[:, s0 : s0 + T], state)
            F.cross_entropy(logits[0], doc[0, s0 + 1 : s0 + T + 1])

    read(lengths[0])  # warm-up: first-call costs (allocator, kernels) stay out of the timings
    res = interleaved({L: (lambda L=L: read(L)) for L in lengths}, rounds, warmup=0)
    parts = ", ".join(f"{L // 1024}k {w:.2f}s ({w / L * 1e6:.0f} us/token)" for L, (w, _) in res.items())
    print(f"long document, segment by segment (T={T}, M={M}, LTM N={N} FIFO, k={TOPK}, B=1): {parts}")
    for short, long in [*zip(lengths, lengths[1:]), (lengths[0], lengths[-1])]:
        (ws, cs), (wl, cl) = res[short], res[long]
        target = " (target <= 18, quadratic would be 256)" if long == 16 * short else ""
        print(
            f"  time({long // 1024}k)/time({short // 1024}k): {wl / ws:.1f} wall, {cl / cs:.1f} cpu "
            f"(tokens x{long // short}){target}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=[4096, 32000],
        help="vocabulary sizes: 4096 (the demo tokenizer, `debug`'s own), 32000 (the sizes' reference); "
        "the long-document test uses the first",
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the training-step arms")
    ap.add_argument("--doc-rounds", type=int, default=2, help="interleaved rounds of the long-document arms")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine, two threads spin against other "
        "processes and the ratios drift; 0 = torch's default)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["train", "gpt2", "doc"])
    ap.add_argument("--size", default="debug", choices=sorted(SIZES), help="model size of every arm (default debug)")
    ap.add_argument("--batch", type=int, default=4, help="training batch size B (default 4)")
    args = ap.parse_args(argv)
    global SIZE, B
    SIZE, B = args.size, args.batch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for vocab in args.vocab:
        if "train" not in args.skip:
            bench_training(vocab, args.rounds)
        if "gpt2" not in args.skip:
            bench_gpt2(vocab, args.rounds)
    if "doc" not in args.skip:
        bench_long_document(args.vocab[0], args.doc_rounds, (4096, 16384, 65536))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
