"""Training throughput and MFU of the memory transformer on one GPU, DeepSpeed ZeRO, bf16.

Synthetic tokens (no dataset): the same [B, T+1] batch every step, the memory
state carried from step to step and detached after each (bptt_segments = 1),
so after the warm-up steps the short-term memory and the long-term store are
full, as in the steady state of long documents. Arms:

  none      no memory
  memory    short-term memory M (default T) + long-term kNN store (N, k) in one layer

MFU = tokens/s x model FLOPs per token / peak (989 TFLOP/s: dense bf16 of an
H100/H200 SXM). Model FLOPs are ``MemoryTransformer.flops_per_token``:
6 x (weights + LM head) + causal attention over the segment and the
short-term memory + attention over the k retrieved keys; the kNN search
itself is not counted (a lookup, not model work).

    benchmarks/gpu_check.sh                           # medium, bf16, ZeRO 2, one GPU
    .venv/bin/python benchmarks/gpu_check.py --cpu --size debug --steps 2    # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mnemo.model import MemoryTransformer, ModelArgs  # noqa: E402
from mnemo.train.rankenv import use_own_op_cache  # noqa: E402

PEAK_BF16 = 989e12


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--segment-len", type=int, default=None, help="T (default 2048; 128 with --cpu)")
    ap.add_argument("--batch-size", type=int, default=None, help="B per GPU (default 8; 2 with --cpu)")
    ap.add_argument("--stm", type=int, default=None, help="M of the memory arm (default T)")
    ap.add_argument("--ltm-capacity", type=int, default=None, help="N (default 8192; 1024 with --cpu)")
    ap.add_argument("--ltm-topk", type=int, default=32)
    ap.add_argument("--arms", default="none,memory")
    ap.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per arm: fill the memory, warm kernels (default 5; 1 with --cpu)",
    )
    ap.add_argument("--peak", type=float, default=PEAK_BF16, help="peak FLOP/s of the device for MFU")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    ap.add_argument("--cpu", action="store_true", help="smoke run on CPU (fp32, gloo); no MFU")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the figures of every arm to FILE")
    a = ap.parse_args(argv)
    # A CPU smoke run checks the code path in seconds; a GPU run measures.
    for name, gpu, cpu in (
        ("segment_len", 2048, 128),
        ("batch_size", 8, 2),
        ("ltm_capacity", 8192, 1024),
        ("warmup", 5, 1),
    ):
        if getattr(a, name) is None:
            setattr(a, name, cpu if a.cpu else gpu)
    return a


def model_args(a: argparse.Namespace, arm: str) -> ModelArgs:
    if arm == "none":
        return ModelArgs.from_size(a.size, a.vocab)
    if arm == "memory":
        M = a.segment_len if a.stm is None else a.stm
        return ModelArgs.from_size(
            a.size, a.vocab, stm_length=M, ltm_kind="knn", ltm_capacity=a.ltm_capacity, ltm_topk=a.ltm_topk
        )
    raise SystemExit(f"gpu_check: unknown arm {arm!r} (none, memory)")


def run_arm(a: argparse.Namespace, arm: str, device: torch.device) -> dict:
    import deepspeed

    use_bf16 = not a.cpu
    margs = model_args(a, arm)
    torch.manual_seed(0)
    model = MemoryTransformer(margs)
    if a.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from mnemo.model.transformer import Block

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        fused=device.type == "cuda",
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": a.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": a.zero},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    if a.compile and device.type == "cuda":
        engine.compile()
    B, T = a.batch_size, a.segment_len
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    state = engine.module.init_state(B, device=device, dtype=dtype)
    tokens = torch.randint(0, a.vocab, (B, T + 1), generator=torch.Generator().manual_seed(1)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = 0.0
    loss = torch.zeros(())
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        logits, state = engine(tokens[:, :-1], state)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        engine.backward(loss)
        engine.step()
        state = state.detach()
    sync()
    dt = time.perf_counter() - t0
    tps = B * T * a.steps / dt
    fpt = model.flops_per_token(T)
    mfu = "n/a (CPU)" if a.cpu else f"{tps * fpt / a.peak:.1%}"
    mem = f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    mem_desc = (
        "no memory"
        if arm == "none"
        else (f"M={margs.stm_length}, LTM N={margs.ltm_capacity} k={margs.ltm_topk} layers {list(margs.ltm_layers)}")
    )
    print(
        f"gpu_check {a.size} ({model.num_params() / 1e6:.0f}M params) {arm} [{mem_desc}] "
        f"{'bf16' if use_bf16 else 'fp32'} ZeRO {a.zero} T={T} B={B}: {tps:,.0f} tokens/s, "
        f"{fpt / 1e9:.2f} GFLOP/token, MFU {mfu} vs {a.peak / 1e12:.0f} TFLOP/s{mem} "
        f"(loss {loss.item():.3f}, {a.steps} steps in {dt:.1f}s)",
        flush=True,
    )
    out = {
        "arm": arm,
        "size": a.size,
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "mfu": None if a.cpu else tps * fpt / a.peak,
        "peak_flops": a.peak,
        "loss": loss.item(),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    del engine, opt, model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    # A one-process "job": what a launcher would otherwise put in the environment.
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ):
        os.environ.setdefault(key, value)
    if a.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; not run (use --cpu for a smoke run)")
        return 1
    # DeepSpeed's JIT ops from the cache mnemo's ranks use: torch's shared default is rebuilt whenever another
    # environment (a second checkout, a CI clone) built it last (measured: 92 s of a 19 s CPU run).
    use_own_op_cache()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if a.cpu else "nccl")
    device = torch.device("cpu") if a.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    results = {arm.strip(): run_arm(a, arm.strip(), device) for arm in a.arms.split(",")}
    if "none" in results and "memory" in results:
        # What memory costs in throughput: tokens/s with STM + the kNN layer over tokens/s without.
        ratio = results["memory"]["tokens_per_s"] / results["none"]["tokens_per_s"]
        results["ratio_memory_to_none"] = ratio
        print(f"gpu_check {a.size} tokens/s memory/none: {ratio:.3f}", flush=True)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
