"""Every collective of train/: the one place where ranks agree on something.

Why one place. On a GPU the process group is NCCL for CUDA tensors, and a
collective on a tensor of a device type the group has no backend for fails
("No backend type associated with device type cpu"). So:

- the group is initialized for both device types (``process_group_backend``:
  ``cpu:gloo,cuda:nccl`` when CUDA is used, gloo on CPU), which also lets the
  object collectives (``broadcast_object``) and barriers run where torch puts
  them;
- every tensor reduced here is created on the device passed in, the engine's
  device (``cuda:<local rank>`` on a GPU, ``cpu`` otherwise), and read back
  with one host copy (``.cpu()``).

The functions call ``torch.distributed`` directly (DeepSpeed's ``deepspeed.comm``
forwards to it on this group). Without an initialized process group (one
process, e.g. ``mnemo eval``) they are the identity: one rank agrees with itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def process_group_backend(use_cuda: bool) -> str:
    """The ``backend`` for init_process_group: both device types on a GPU, gloo on CPU."""
    return "cpu:gloo,cuda:nccl" if use_cuda else "gloo"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def any_true(flags: Sequence[bool], device: torch.device | str) -> list[bool]:
    """Per flag: whether it is set on any rank (one MAX all-reduce of a [len(flags)] tensor on ``device``)."""
    return [v > 0 for v in maxima([float(bool(f)) for f in flags], device)]


def maxima(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Per value: its largest over the ranks (one MAX all-reduce of a [len(values)] float32 tensor on ``device``)."""
    dist = _dist()
    if dist is None:
        return [float(v) for v in values]
    # Built on the host and copied: no device kernel per value, one transfer each way.
    t = torch.tensor(list(values), dtype=torch.float32).to(device)  # [n]
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def all_true(flags: Sequence[bool], device: torch.device | str) -> list[bool]:
    """Per flag: whether it is set on every rank."""
    return [not v for v in any_true([not f for f in flags], device)]


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it. ``t`` lives on the engine's device already (step statistics)."""
    dist = _dist()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


AGREE_PARTS = 3  # float32 digits per value that ``agreement_parts`` packs (the same count on every rank)


def agreement_parts(value: int, world: int) -> list[float]:
    """``value`` (an int >= 0 every rank should hold) as AGREE_PARTS float32 digits for a SUM all-reduce.

    A float32 sum is exact only below 2**24: summing ``value`` itself over the ranks rounds once
    value * world passes it, and ranks that agree would fail the check. Each digit has
    24 - world.bit_length() bits, so its sum over ``world`` ranks stays below 2**24 and is exact
    (values up to 2**60 on 8 ranks, 2**39 on 1024). ``agreed`` checks the summed digits.
    """
    bits = 24 - world.bit_length()
    base = 1 << bits
    digits = [(value >> (bits * i)) % base for i in range(AGREE_PARTS - 1)]
    return [float(d) for d in (*digits, value >> (bits * (AGREE_PARTS - 1)))]


def agreed(summed: Sequence[float], value: int, world: int) -> bool:
    """Whether ``summed`` (the SUM over ``world`` ranks of their ``agreement_parts``) is ``value``'s on every rank.

    A rank holding a larger digit than another's sees a sum below its own digit times ``world``: when
    the ranks disagree, at least the rank with the largest differing digit gets False.
    """
    mine = agreement_parts(value, world)
    return len(summed) == len(mine) and all(s == d * world for s, d in zip(summed, mine))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; torch sends it over the group's CPU backend)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decided_by_rank0(choose: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> Any:
    """What ``choose()`` returns on rank 0, on every rank (it runs on rank 0 only).

    For decisions read from a shared filesystem: each rank listing a folder itself may see another
    answer (NFS caches listings for up to about a minute). An exception of a type in ``errors``
    that ``choose`` raises is raised on every rank (the others would wait for the broadcast).
    """
    dist = _dist()
    result: tuple[Any, Exception | None] = (None, None)
    if dist is None or dist.get_rank() == 0:
        try:
            result = (choose(), None)
        except errors as e:
            result = (None, e)
    value, error = broadcast_object(result)
    if error is not None:
        raise error
    return value


def differences_from_rank0(values: Mapping[str, str], device: torch.device | str) -> tuple[dict[str, tuple], bool]:
    """Where this rank's ``values`` differ from rank 0's, ``{key: (this rank's, rank 0's)}`` (None: absent),
    and whether any rank found a difference. Every rank calls it: one broadcast, one reduction, so a rank
    that differs and the ranks that do not stop together instead of meeting in different collectives."""
    theirs = broadcast_object(dict(values))
    keys = sorted(set(values) | set(theirs))
    diff = {k: (values.get(k), theirs.get(k)) for k in keys if values.get(k) != theirs.get(k)}
    return diff, any_true([bool(diff)], device)[0]


def barrier() -> None:
    """Wait for every rank (torch picks the device: the one bound at init on a GPU, else the CPU backend)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


__all__ = [
    "AGREE_PARTS",
    "agreed",
    "agreement_parts",
    "all_true",
    "any_true",
    "barrier",
    "broadcast_object",
    "decided_by_rank0",
    "differences_from_rank0",
    "maxima",
    "process_group_backend",
    "sum_",
    "world_size",
]
