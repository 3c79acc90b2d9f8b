"""Throughput of `mnemo prepare` against raw SentencePiece encoding, side by side in one run.

On the built-in corpus (the running Python's stdlib .py files, the first
--limit-mb of them in sorted order) it trains a tokenizer once, then measures

  (a) raw: ``SentencePieceProcessor.encode(list_of_docs, num_threads=1,
      return_type="numpy")`` (its fastest call) on the documents already in
      memory, one process, one thread;
  (b) ``prepare(...)`` end to end (plan, read files, encode, write zstd MDS
      shards, merge the index, manifest) with each --workers value.

Rates are tokens per second, EOS excluded on both sides; the import of
streaming/torch (seconds, once per process) is outside the timings. Targets:
1 worker >= 0.85x raw; 2 workers >= 1.6x raw on 2 cores.

    .venv/bin/python benchmarks/prepare_throughput.py [--limit-mb 20] [--workers 1 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGETS = {1: 0.85, 2: 1.6}


def stdlib_files(limit_bytes: int) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                p = os.path.join(dirpath, name)
                files.append(p)
                total += os.path.getsize(p)
                if total >= limit_bytes:
                    return files
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-mb", type=float, default=20.0, help="MB of stdlib source to use (default 20)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each rate is the best of them (default 3)")
    args = ap.parse_args(argv)

    import sentencepiece as spm
    import streaming  # noqa: F401  (imports torch: seconds, a fixed cost outside the measured pipeline)

    from mnemo.data_pipeline.prepare import prepare
    from mnemo.data_pipeline.tokenizer import train_tokenizer

    files = stdlib_files(int(args.limit_mb * (1 << 20)))
    size = sum(os.path.getsize(f) for f in files)
    print(f"corpus: {len(files)} stdlib .py files, {size / 1e6:.1f} MB; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-") as tmp:
        model = os.path.join(tmp, "tokenizer.model")
        t = time.perf_counter()
        train_tokenizer(files, model, args.vocab_size, sample_docs=2000)
        print(f"tokenizer: vocab {args.vocab_size} trained in {time.perf_counter() - t:.1f} s")

        texts = []
        for f in files:
            with open(f, "rb") as fh:
                text = fh.read().decode("utf-8", errors="replace")
            if text and not text.isspace():
                texts.append(text)
        sp = spm.SentencePieceProcessor(model_file=model)

        def cpu_seconds() -> float:
            """CPU time of this process and its finished children (the prepare workers)."""
            me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

        def raw() -> tuple[int, float, float]:
            t, c = time.perf_counter(), cpu_seconds()
            ids = sp.encode(texts, num_threads=1, return_type="numpy")
            return sum(len(a) for a in ids), time.perf_counter() - t, cpu_seconds() - c

        def pipeline(w: int, r: int) -> tuple[int, float, float]:
            out = os.path.join(tmp, f"out-w{w}-{r}")
            t, c = time.perf_counter(), cpu_seconds()
            m = prepare(files, out, tokenizer=model, workers=w, progress=False)
            dt, dc = time.perf_counter() - t, cpu_seconds() - c
            return m["num_tokens"] - m["num_documents"], dt, dc  # EOS excluded, as in the raw count

        # Rounds interleave the measurements so that load from other processes hits them alike;
        # each rate is the best of its rounds. CPU time per token does not depend on that load.
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}
        raw_tokens = 0
        for r in range(args.repeat):
            raw_tokens, dt, dc = raw()
            best["raw"] = max(best.get("raw", 0.0), raw_tokens / dt)
            cpu["raw"] = min(cpu.get("raw", float("inf")), dc)
            for w in args.workers:
                tokens, dt, dc = pipeline(w, r)
                assert tokens == raw_tokens, f"prepare wrote {tokens} tokens, raw encode gave {raw_tokens}"
                best[f"w{w}"] = max(best.get(f"w{w}", 0.0), tokens / dt)
                cpu[f"w{w}"] = min(cpu.get(f"w{w}", float("inf")), dc)
        print(
            f"raw SentencePieceProcessor.encode (1 process, 1 thread): {raw_tokens:,} tokens, "
            f"{best['raw']:,.0f} tokens/s (best of {args.repeat}), {1e9 * cpu['raw'] / raw_tokens:.0f} CPU-ns/token"
        )
        for w in args.workers:
            ratio = best[f"w{w}"] / best["raw"]
            target = TARGETS.get(w)
            verdict = "" if target is None else f" (target >= {target}x: {'met' if ratio >= target else 'NOT met'})"
            print(
                f"mnemo prepare --workers {w}: {best[f'w{w}']:,.0f} tokens/s = {ratio:.2f}x raw{verdict}; "
                f"{1e9 * cpu[f'w{w}'] / raw_tokens:.0f} CPU-ns/token = {cpu['raw'] / cpu[f'w{w}']:.2f} of raw's "
                f"CPU efficiency"
            )
        print(f"load average during the run: {os.getloadavg()[0]:.2f} (1 min); wall-clock ratios need idle cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
