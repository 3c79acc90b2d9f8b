"""What evaluation and generation share about the model they run.

The model is a MemoryTransformer, or a DeepSpeed engine wrapping one (all
ranks of a ZeRO-3 job evaluate together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import torch

from mnemo.data_pipeline.errors import host_memory_advice, out_of_host_memory
from mnemo.evaluation.errors import EvalError


def core_model(model: Any) -> Any:
    """The MemoryTransformer behind a possible DeepSpeed engine (it owns init_state/args)."""
    return getattr(model, "module", model)


def model_device(model: Any) -> torch.device:
    try:
        return next(core_model(model).parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def torch_seed(seed: int) -> int:
    """The seed to give torch for a seed in [0, 2**64): torch's CPU generator reads only its low 32 bits,
    so seeds that differed above them (1 and 2**32 + 1) drew the same numbers. Seeds below 2**32 are
    given as they are (the streams they always drew); larger ones are hashed to 32 bits."""
    if seed < 1 << 32:
        return seed
    return int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")


def resolve_device(name: str) -> str:
    """The torch device name for --device auto|cpu|cuda; EvalError when CUDA is asked for and absent."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device available")
    return name


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """model.eval() for the block, then training mode again if it was training (evaluation runs mid-training).

    Works on the core model of an engine; a stand-in without eval()/train() is left alone.
    """
    m = core_model(model)
    was_training = bool(getattr(m, "training", False))
    if hasattr(m, "eval"):
        m.eval()
    try:
        yield
    finally:
        if was_training and hasattr(m, "train"):
            m.train()


def with_ltm_capacity(model: Any, capacity: int | None) -> Any:
    """Size the long-term store of ``model`` for ``capacity`` entries per slot and layer.

    The capacity is not a weight: only ``init_state`` reads it, so a model
    trained with a small store can read a whole long document (passkey at
    D segments needs D * T entries). None, or a model without long-term
    memory: unchanged. Returns the model.
    """
    core = core_model(model)
    args = getattr(core, "args", None)
    if capacity is None or args is None or args.ltm_kind == "none" or capacity == args.ltm_capacity:
        return model
    if capacity < args.ltm_topk:
        raise EvalError(f"--ltm-capacity {capacity}: must be >= the model's top-k ({args.ltm_topk})")
    core.args = dataclasses.replace(args, ltm_capacity=int(capacity))
    return model


@contextlib.contextmanager
def sized_ltm(model: Any, capacity: int | None) -> Iterator[None]:
    """``with_ltm_capacity`` for the block, then the store size it had (evaluation mid-training must not resize it)."""
    core = core_model(model)
    before = getattr(core, "args", None)
    with_ltm_capacity(model, capacity)
    try:
        yield
    finally:
        if before is not None:
            core.args = before


def with_ltm_search(model: Any, search: str | None, ivf_probe: int | None = None) -> Any:
    """Switch how ``model``'s long-term stores are searched ("exact" | "blocks" | "ivf", model/retrieval.py).

    Not a weight: every long-term layer's search function is rebuilt and the
    model's args record the choice. None, or a model without long-term memory:
    unchanged. ivf_probe: lists an ``ivf`` query searches (None: as the model
    has it). Returns the model.
    """
    from mnemo.model.retrieval import searcher
    from mnemo.model.transformer import Attention, knn_retrieve

    core = core_model(model)
    args = getattr(core, "args", None)
    if search is None or args is None or args.ltm_kind == "none":
        return model
    probe = args.ltm_ivf_probe if ivf_probe is None else ivf_probe
    core.args = dataclasses.replace(args, ltm_search=search, ltm_ivf_probe=probe)  # validates the probe
    for m in core.modules():
        if isinstance(m, Attention) and m.has_ltm:
            m.search = searcher(search, knn_retrieve, probe)
    return model


def available_bytes(device: Any, total: bool = False) -> int | None:
    """Bytes that new tensors can still take on ``device``; None when unknown.

    CUDA: the device's free memory plus what PyTorch's caching allocator holds unused; ``total``: the device's
    whole memory instead, read without creating a CUDA context (a launcher must not hold memory on the device
    its ranks will use). CPU: the host's MemAvailable, lowered to what the cgroup (a container, a SLURM job)
    still allows.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and total:
        return int(torch.cuda.get_device_properties(dev).total_memory)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type != "cpu":
        return None
    found = []
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            found.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return max(0, min(found)) if found else None


def memory_shortfall(needs: dict[str, int], total: bool = False) -> tuple[str, int, int] | None:
    """The first (device, bytes needed, bytes available) of ``needs`` (bytes per device name, e.g. "cpu",
    "cuda:0") that the device cannot hold (``available_bytes``); None when all fit or the memory is unknown."""
    for where, need in needs.items():
        free = available_bytes(where, total=total)
        if free is not None and need > free:
            return where, need, free
    return None


def store_bytes(model: Any, slots: int, capacity: int, segment_len: int) -> int:
    """Bytes the long-term stores of ``slots`` slots of ``capacity`` entries take at most while the model reads
    segments of ``segment_len`` tokens without gradients (evaluation, generation).

    Not the stores once (what ``init_state`` allocates): ``fifo_append`` grows a full store into a fresh
    buffer while the input state still holds the old one (``memory.fifo_peak_entries``: 2.5 N + 2 T entries
    of keys and values), and with the ivf search the index fields (``retrieval.ivf_index_bytes``) are held
    twice at a rebuild (the old state's and the rebuilt copies) and their list ids grow as the keys do.
    Counting the stores once let a capacity needing 40-100% of the memory through, to be killed at the
    first forward (measured: 2.0x the estimate for exact, 2.55x for ivf).
    """
    from mnemo.model.memory import fifo_peak_entries
    from mnemo.model.retrieval import ivf_index_bytes, store_bytes_per_token

    core = core_model(model)
    args = getattr(core, "args", None)
    if args is None or getattr(args, "ltm_kind", "none") == "none" or not hasattr(core, "parameters"):
        return 0
    try:
        dtype = next(core.parameters()).dtype
    except StopIteration:
        return 0
    N, layers = int(capacity), len(args.active_ltm_layers)
    peak = fifo_peak_entries(N, int(segment_len))
    per_slot = peak * store_bytes_per_token(args.n_heads, args.head_dim, layers, dtype)
    if getattr(args, "ltm_search", "exact") == "ivf":
        # ltm_c (int32 list ids) grows as the keys do and a rebuild clones it: peak + N entries, 2 N of them in
        # the index fields counted twice below.
        list_ids = (peak - N) * args.n_heads * 4
        per_slot += layers * (2 * ivf_index_bytes(args.n_heads, args.head_dim, N, dtype) + list_ids)
    return int(slots) * per_slot


def check_memory(model: Any, store: int, host: int, what: str, advice: str) -> None:
    """EvalError when ``store`` bytes (long-term stores, on the model's device) and ``host`` bytes (documents
    made on the host) exceed the memory available, before any of it is allocated.

    ``store`` is what the stores hold at their peak (``store_bytes``), ``host`` a lower bound: the model, the
    activations and the rest are not counted, so a refusal is never wrong: an evaluation asked
    for D = 10**9 used to fail after the model load, in numpy (hundreds of GiB) or torch, with a traceback.
    ``what`` says what needs the memory, ``advice`` which flags lower it.
    """
    dev = model_device(model)
    needs = {str(dev): store}  # "cpu" on the CPU: the host's share is added to it
    needs["cpu"] = needs.get("cpu", 0) + host
    miss = memory_shortfall(needs)
    if miss:
        where, need, free = miss
        raise EvalError(
            f"{what} needs at least {need / 2**30:.1f} GiB of memory on {torch.device(where).type}, more than the "
            f"{free / 2**30:.1f} GiB available: {advice}"
        )


# RuntimeErrors that are no fault of a file or of the user's input: out of memory, an accelerator's fault, a
# collective's failure (train/checkpoint.py: not blamed on a checkpoint; harness.py: not on a task file).
DEVICE_ERRORS: tuple[type[BaseException], ...] = tuple(
    t
    for t in (
        torch.OutOfMemoryError,
        getattr(torch, "AcceleratorError", None),
        getattr(torch.distributed, "DistError", None),
    )
    if t is not None
)


@contextlib.contextmanager
def memory_errors(advice: str, error: type[Exception] = EvalError, where: str = "") -> Iterator[None]:
    """Running out of memory inside (numpy's MemoryError, torch's CPU or CUDA allocation error) as one ``error``:
    "out of memory{where} (the allocator's first line): {advice}", ``where`` saying when (" at step 3").

    ``check_memory`` refuses what cannot fit up front; this catches what its lower bound did not foresee.
    A MemoryError while a module was imported (a library's lazy import under `ulimit -v`) is not the
    evaluation's size: its advice is the general one, not ``advice``'s flags.
    Training (train/trainer.py) runs its set-up and steps in it too, with its own error class.
    """
    try:
        yield
    except MemoryError as e:
        raise error(out_of_host_memory(e, host_memory_advice() if _while_importing(e) else advice, where)) from None
    except RuntimeError as e:
        text = str(e)
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text
        if not oom:
            raise
        first = text.splitlines()[0][:160] if text else type(e).__name__
        raise error(f"out of memory{where} ({first}): {advice}") from None


def _while_importing(e: BaseException) -> bool:
    """Whether ``e`` was raised while a module was being imported: a module's body (``<module>``) among the
    frames of its traceback (importlib takes its own frames out of it)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "<module>":
            return True
        tb = tb.tb_next
    return False


def ltm_capacity_of(model: Any) -> int:
    """Entries per slot and layer of the model's long-term store; 0 without long-term memory."""
    args = getattr(core_model(model), "args", None)
    if args is None or getattr(args, "ltm_kind", "none") == "none":
        return 0
    return int(args.ltm_capacity)
