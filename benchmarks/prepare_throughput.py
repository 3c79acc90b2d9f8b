"""Throughput of `mnemo prepare` against raw SentencePiece encoding, side by side in one run.

On any corpus (``--input PATH...``: files, directories, globs, as `mnemo
prepare --input` takes them; default: the running Python's stdlib .py files,
the first --limit-mb of them in sorted order) it takes a tokenizer
(``--tokenizer`` or one trained on the corpus once), then in each round measures

  (a) raw: ``SentencePieceProcessor.encode(list_of_docs, num_threads=1,
      return_type="numpy")`` (its fastest call) on the documents already in
      memory (the very documents prepare reads: mnemo's own readers), one
      process, one thread;
  (b) ``prepare(...)`` end to end (plan, read files, encode, write zstd MDS
      shards, merge the index, manifest) with each --workers value.

Rates are tokens per second, EOS excluded on both sides; the import of
streaming/torch (seconds, once per process) is outside the timings. Rounds
interleave (a) and (b) so that load from other processes hits them alike; the
ratios are printed per round with the 1-minute load average, then best and
median. Targets: 1 worker >= 0.85x raw; 2 workers >= 1.6x raw on 2 idle cores.

Wall-clock ratios need idle cores: with L other runnable processes on C cores
one process gets about C/(L+1) of a core and W workers W*C/(L+W), so load
squeezes every ratio towards 1. Each pipeline run therefore also reports its
CPU accounting, which load changes little: the main process's CPU seconds
(planning, start-up, merge, manifest: the serial part), each worker's, and
"idle-core estimate" = raw CPU seconds / (main CPU + the busiest worker's CPU),
the ratio the run would reach on idle cores, conservative: it counts the main
process as if none of it overlapped the workers; "to" gives the optimistic
end: the main process's CPU while the pool ran (fork, wait, and the writes of
split units) overlapped, and the workers' CPU shared evenly (the pool hands
out tasks as workers free up, so under load the worker that gets less of a
core does less, and the busiest worker's CPU overstates the imbalance).

    .venv/bin/python benchmarks/prepare_throughput.py --input DIR_OR_FILES... [--workers 1 2] [--repeat 3]
    .venv/bin/python benchmarks/prepare_throughput.py [--limit-mb 20]      # the stdlib corpus
"""

from __future__ import annotations

import argparse
import json
import multiprocessing.util
import os
import resource
import statistics
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


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process, and of its finished children (the prepare workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def record_worker_cpu(prep, log_dir: str) -> None:
    """Have each prepare worker process write its CPU seconds into ``log_dir`` when it exits.

    Wraps the pool initializer; multiprocessing runs Finalize callbacks with an
    exit priority when a worker process ends (the workers are forked: they
    inherit the wrapper).
    """
    init = prep._init_worker

    def wrapped(*args):
        init(*args)

        def write() -> None:
            with open(os.path.join(log_dir, f"{os.getpid()}.json"), "w") as f:
                json.dump({"cpu": time.process_time()}, f)

        multiprocessing.util.Finalize(None, write, exitpriority=100)

    prep._init_worker = wrapped


def time_run_units(prep) -> list[float]:
    """Wrap prepare's _run_units; the returned list holds the main process's CPU seconds in its last call.

    With a pool, that is the main process's share beside the workers (forking
    them, waiting, and writing the units of a split small corpus), which may
    overlap their work; the rest of the main process's CPU cannot.
    """
    last = [0.0]
    run = prep._run_units

    def wrapped(*args, **kwargs):
        c = time.process_time()
        try:
            return run(*args, **kwargs)
        finally:
            last[0] = time.process_time() - c

    prep._run_units = wrapped
    return last


def worker_cpus(log_dir: str) -> list[float]:
    out = []
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name)) as f:
            out.append(float(json.load(f)["cpu"]))
        os.remove(os.path.join(log_dir, name))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", nargs="+", help="files, directories or globs (default: stdlib .py files)")
    ap.add_argument("--limit-mb", type=float, default=20.0, help="MB of stdlib source when no --input (default 20)")
    ap.add_argument("--tokenizer", help="a SentencePiece model (default: train one on the corpus)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    args = ap.parse_args(argv)

    import sentencepiece as spm
    import streaming  # noqa: F401  (imports torch: seconds, a fixed cost outside the measured pipeline)

    import mnemo.data_pipeline.prepare as prep
    from mnemo.data_pipeline.inputs import ReadStats, plan_inputs, split_units
    from mnemo.data_pipeline.readers import iter_unit
    from mnemo.data_pipeline.tokenizer import train_tokenizer

    inputs = args.input or stdlib_files(int(args.limit_mb * (1 << 20)))
    corpus = plan_inputs(inputs)
    units = split_units(corpus.files)
    size = sum(f.size for f in corpus.files)
    what = " ".join(args.input) if args.input else "stdlib .py files"
    print(
        f"corpus: {what}: {len(corpus.files)} files, {size / 1e6:.1f} MB, {len(units)} work units; "
        f"cores: {len(os.sched_getaffinity(0))}"
    )
    with tempfile.TemporaryDirectory(prefix="mnemo-bench-") as tmp:
        model = args.tokenizer
        if model is None:
            model = os.path.join(tmp, "tokenizer.model")
            t = time.perf_counter()
            train_tokenizer(inputs, model, args.vocab_size, sample_docs=2000)
            print(f"tokenizer: vocab {args.vocab_size} trained in {time.perf_counter() - t:.1f} s")
        # The documents prepare reads (same readers, same order); reading is outside the raw timing.
        texts = [d.text for u in units for d in iter_unit(u, stats=ReadStats())]
        sp = spm.SentencePieceProcessor(model_file=model)
        log_dir = os.path.join(tmp, "cpu")
        os.makedirs(log_dir)
        record_worker_cpu(prep, log_dir)
        in_pool = time_run_units(prep)

        def raw() -> tuple[int, float, float]:
            t, (c, _) = time.perf_counter(), cpu_seconds()
            ids = sp.encode(texts, num_threads=1, return_type="numpy")
            return sum(len(a) for a in ids), time.perf_counter() - t, cpu_seconds()[0] - c

        def pipeline(w: int, r: int) -> tuple[int, float, float, float, list[float]]:
            out = os.path.join(tmp, f"out-w{w}-{r}")
            t, (c, k) = time.perf_counter(), cpu_seconds()
            m = prep.prepare(inputs, out, tokenizer=model, workers=w, progress=False)
            dt = time.perf_counter() - t
            c1, k1 = cpu_seconds()
            kids = worker_cpus(log_dir)
            pool_main = in_pool[0] if kids else 0.0  # main's CPU while the pool ran (none without a pool)
            if not kids and k1 - k > 0:
                kids = [k1 - k]
            # EOS excluded, as in the raw count
            return m["num_tokens"] - m["num_documents"], dt, c1 - c, pool_main, kids

        rates: dict[str, list[float]] = {}
        est: dict[str, list[float]] = {}
        est_hi: dict[str, list[float]] = {}
        raw_tokens = 0
        for r in range(args.repeat):
            load = os.getloadavg()[0]
            raw_tokens, dt, raw_cpu = raw()
            rates.setdefault("raw", []).append(raw_tokens / dt)
            line = [
                f"round {r + 1}: load {load:.2f}; raw {raw_tokens / dt:,.0f} tok/s ({dt:.2f} s, cpu {raw_cpu:.2f} s)"
            ]
            for w in args.workers:
                tokens, dt, main_cpu, pool_main, kids = pipeline(w, r)
                if tokens != raw_tokens:
                    line.append(f"(prepare wrote {tokens} tokens, raw encode {raw_tokens}: U+2581 documents)")
                rates.setdefault(f"w{w}", []).append(tokens / dt)
                path = main_cpu + max(kids, default=0.0)
                est.setdefault(f"w{w}", []).append(raw_cpu / path)
                # Optimistic end: the pool's main-process share overlapped and the workers' CPU evenly
                # shared (the pool hands out tasks as workers free up; under load a worker that gets less
                # of a core does less work, so the busiest worker's CPU overstates the imbalance).
                hi = raw_cpu / (main_cpu - pool_main + sum(kids) / max(len(kids), 1))
                est_hi.setdefault(f"w{w}", []).append(hi)
                upto = "" if not pool_main else f" to {hi:.2f}x"
                line.append(
                    f"w{w} {tokens / dt / rates['raw'][-1]:.2f}x ({dt:.2f} s; cpu main {main_cpu:.2f} s"
                    f"{f' of which {pool_main:.2f} s beside the pool' if pool_main else ''}, "
                    f"workers {'/'.join(f'{k:.2f}' for k in kids) or '-'} s; idle-core estimate "
                    f"{raw_cpu / path:.2f}x{upto})"
                )
            print("; ".join(line), flush=True)
        print(f"load average after the run: {os.getloadavg()[0]:.2f} (1 min)")
        rb = max(rates["raw"])
        print(f"raw SentencePieceProcessor.encode (1 process, 1 thread): {raw_tokens:,} tokens, best {rb:,.0f} tok/s")
        for w in args.workers:
            ratios = [p / q for p, q in zip(rates[f"w{w}"], rates["raw"])]
            best, med = max(rates[f"w{w}"]) / rb, statistics.median(ratios)
            target = TARGETS.get(w)
            verdict = "" if target is None else f" (target >= {target}x: best {'met' if best >= target else 'NOT met'})"
            print(
                f"mnemo prepare --workers {w}: best {best:.2f}x raw (best/best), median {med:.2f}x (per round)"
                f"{verdict}; idle-core estimate best {max(est[f'w{w}']):.2f}x, median "
                f"{statistics.median(est[f'w{w}']):.2f}x (optimistic end: best "
                f"{max(est_hi[f'w{w}']):.2f}x, median {statistics.median(est_hi[f'w{w}']):.2f}x)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
