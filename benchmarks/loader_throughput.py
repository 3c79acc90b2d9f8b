"""Tokens/s delivered by the document-stream loader next to tokens/s consumed by training.

One run, side by side, on the built-in corpus (stdlib sources):
  (a) DocumentStreams over the MDS shards: T=512, B=8, one rank;
  (m) the same loader over a 3-source mixture (data.sources, weights 0.5/0.3/0.2):
      by default the same dataset opened as three sources (each its own MDSSource
      and order), so the data is equal and only the mixture machinery differs;
      --sources A B C mixes three datasets of your own. (a) and (m) alternate in
      --rounds rounds of the same batch count so that a busy machine slows both
      alike; tokens per CPU second (process time, prefetch threads included) is
      printed beside wall tokens/s, as the wall figure swings with other load;
  (b) a training step (forward + backward + AdamW) of the `debug` memory model
      (STM M=512, LTM kNN N=8192, k=32) at the same T and B, one process.
Targets: loader >= 20x training, >= 1M tokens/s; mixture >= 0.95x the single source.

    .venv/bin/python benchmarks/loader_throughput.py [--data DIR] [--sources A B C] [--limit-mb 8]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_corpus(limit_mb: float, out: Path) -> Path:
    """Copy stdlib .py files (largest last) up to limit_mb into a corpus dir."""
    src = out / "corpus"
    src.mkdir(parents=True)
    total = 0
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        size = os.path.getsize(f)
        if total + size > limit_mb * 1e6:
            break
        shutil.copy(f, src / f"{total:010d}_{os.path.basename(f)}")
        total += size
    return src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="an MDS dir from `mnemo prepare` (default: prepare a stdlib subset)")
    ap.add_argument("--limit-mb", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="loader measuring time")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--sources", nargs=3, metavar="DIR", help="three MDS dirs (one tokenizer) for the mixture")
    ap.add_argument("--rounds", type=int, default=10, help="alternating single/mixture measurements")
    ap.add_argument("--no-train", action="store_true", help="skip (b), the training step")
    ap.add_argument("--num-workers", type=int, default=2, help="prefetch threads of (a) and (m) (data.num_workers)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="mnemo-loader-bench-"))
    try:
        data = args.data
        if not data:
            from mnemo.data_pipeline.prepare import prepare

            data = str(tmp / "data")
            prepare(
                [str(build_corpus(args.limit_mb, tmp))], data, vocab_size=4096, workers=os.cpu_count(), progress=False
            )
        from streaming.base.util import clean_stale_shared_memory

        from mnemo.data_pipeline.streams import DocumentStreams, MDSSource

        clean_stale_shared_memory()
        T, B = 512, 8
        src = MDSSource(data, cache_dir=str(tmp / "cache"))
        vocab = int(__import__("json").loads((Path(data) / "manifest.json").read_text())["vocab_size"])

        # (a) single source and (m) 3-source mixture, alternating; padded tokens/s (what a step consumes)
        from mnemo.data_pipeline.mixture import WeightedSource

        paths = args.sources or [data] * 3
        mix = [
            WeightedSource(MDSSource(p, cache_dir=str(tmp / f"cache{i}")), weight=w, name=f"s{i}")
            for i, (p, w) in enumerate(zip(paths, (0.5, 0.3, 0.2)))
        ]
        single = DocumentStreams(src, batch_size=B, segment_len=T, seed=0, num_workers=args.num_workers)
        mixed = DocumentStreams(mix, batch_size=B, segment_len=T, seed=0, num_workers=args.num_workers)
        for s in (single, mixed):
            next(s)  # first shard access (decompression) is a one-off

        def measure(s, n: int = 0, seconds: float = 0.0) -> list[float]:
            """n batches (or as many as fit in seconds): [batches, real target tokens, padded tokens, wall s,
            process CPU s (prefetch threads included)]."""
            w0, c0, real, k = time.perf_counter(), time.process_time(), 0, 0
            while k < n or (not n and time.perf_counter() - w0 < seconds):
                real += int(next(s).mask.sum())  # real (unpadded) target tokens, like training counts
                k += 1
            return [k, real, k * B * T, time.perf_counter() - w0, time.process_time() - c0]

        acc = {"single": [0.0] * 5, "mixture": [0.0] * 5}
        per_round: list[float] = []  # mixture/single wall tokens/s of each round
        for _ in range(args.rounds):  # alternating, the same batch count each: a busy machine slows both alike
            got = {"single": measure(single, seconds=args.seconds / (2 * args.rounds))}
            got["mixture"] = measure(mixed, n=int(got["single"][0]))
            per_round.append(got["single"][3] / got["mixture"][3])
            for name, g in got.items():
                acc[name] = [x + y for x, y in zip(acc[name], g)]
        single.close()
        mixed.close()
        n_batches, real, padded, loader_s, loader_cpu = acc["single"]
        loader_tps = padded / loader_s
        _, mix_real, mix_padded, mix_s, mix_cpu = acc["mixture"]
        mix_tps = mix_padded / mix_s
        cpu_ratio = (mix_padded / mix_cpu) / (padded / loader_cpu)
        shares = [t / max(1, sum(mixed.source_tokens)) for t in mixed.source_tokens]
        print(
            f"single   : {loader_tps:,.0f} tokens/s  ({n_batches:.0f} batches of {B}x{T} in {loader_s:.1f}s, "
            f"{1 - real / max(1, padded):.1%} padding; {padded / loader_cpu:,.0f} tokens per CPU second)"
        )
        print(
            f"mixture  : {mix_tps:,.0f} tokens/s  ({n_batches:.0f} batches in {mix_s:.1f}s, "
            f"{1 - mix_real / max(1, mix_padded):.1%} padding; {mix_padded / mix_cpu:,.0f} tokens per CPU second; "
            "3 sources "
            f"{'(--sources)' if args.sources else '(one dataset opened 3 times)'}, weights 0.5/0.3/0.2, "
            f"realized token shares {'/'.join(f'{x:.3f}' for x in shares)})"
        )
        median = sorted(per_round)[len(per_round) // 2]
        print(
            f"ratio mixture/single = {mix_tps / loader_tps:.3f}x wall overall, {median:.3f}x median of {args.rounds} "
            f"alternating rounds, {cpu_ratio:.3f}x per CPU second (target >= 0.95x)"
        )
        if args.no_train:
            return

        # (b) training step of the debug memory model on the same batches
        from mnemo.model import MemoryTransformer, ModelArgs

        margs = ModelArgs.from_size(
            "debug", vocab, stm_length=512, ltm_kind="knn", ltm_capacity=8192, ltm_topk=32, ltm_layers=(2,)
        )
        model = MemoryTransformer(margs)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        streams = DocumentStreams(src, batch_size=B, segment_len=T, seed=1)
        state = model.init_state(B)
        batches = [next(streams) for _ in range(args.train_steps + 1)]

        def step(bt, state):
            state = state.reset(bt.reset)
            logits, state = model(bt.tokens[:, :-1], state)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), bt.tokens[:, 1:].flatten(), reduction="none")
            loss = (loss * bt.weight.flatten()).sum() / bt.mask.sum().clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return state.detach()

        state = step(batches[0], state)  # warm-up
        t0 = time.perf_counter()
        for bt in batches[1:]:
            state = step(bt, state)
        train_s = time.perf_counter() - t0
        train_tps = args.train_steps * B * T / train_s

        print(
            f"training : {train_tps:,.0f} tokens/s  (debug size, STM 512 + LTM 8192/k32, {args.train_steps} steps, "
            f"{torch.get_num_threads()} threads)"
        )
        ratio = loader_tps / train_tps
        print(
            f"ratio loader/training = {ratio:.1f}x (target >= 20x); loader >= 1M tokens/s: "
            f"{'yes' if loader_tps >= 1e6 else 'NO'}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
