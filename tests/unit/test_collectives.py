"""The trainer's collectives on a process group that, like NCCL alone on a GPU, has no backend for CPU tensors.

The seam. CI has no GPU, so the test builds the situation of a GPU run on
CPU: a real gloo process group registered for the ``cuda`` device type only
(``init_process_group(backend="cuda:gloo")``), in a fresh subprocess per
case. A collective on a CPU tensor then fails inside c10d exactly as it does
under ``nccl``: "No backend type associated with device type cpu". For the
engine's device the test hands the code ``cuda:0``; tensors that claim to be
on it are stand-ins (``CudaStandIn``, a wrapper subclass holding CPU data,
created by a dispatch mode that catches factory calls with device=cuda and
copies ``.to(cuda)``). When a c10d op receives stand-ins, the mode asks the
op's process group for its backend of the stand-in's device type (the real
lookup, which raises for a device type it lacks) and runs that backend (gloo)
on the CPU data. Two ranks each run the real function the trainer calls
after every step (``schedule.stop_requests``: the stop flags), so a signal on
one rank only must stop both.

Flags built on the CPU (what the trainer's loop did) reach c10d as CPU
tensors and the group refuses them; each worker checks that too.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.unit.gloo_ranks import run_ranks

import pytest

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves, tree_map

    CUDA = torch.device("cuda", 0)


    class CudaStandIn(torch.Tensor):
        """Reports device cuda:0, holds its data on the CPU (.inner)."""

        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=CUDA,
                                                       strides=inner.stride())

        def __init__(self, inner):
            self.inner = inner

        __torch_function__ = torch._C._disabled_torch_function_impl

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            return run(func, args, kwargs)


    def unwrap(a):
        return a.inner if isinstance(a, CudaStandIn) else a


    def on_device_backend(a, dev):
        """The group's own backend for the stand-in's device type, behind a group the CPU data can go through."""
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            pg = dist.ProcessGroup.unbox(a)
            backend = pg._get_backend(dev)  # raises when the group has none for this device type
            cpu_pg = dist.ProcessGroup(dist.HashStore(), pg.rank(), pg.size())
            cpu_pg._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, backend)
            cpu_pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
            return cpu_pg.boxed()
        return unwrap(a)


    def run(func, args, kwargs):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            COLLECTIVES.append(str(func))
            dev = next((a.device for a in tree_leaves(args) if isinstance(a, CudaStandIn)), None)
            if dev is None:  # no stand-in: the real op on the real tensors (a CPU tensor is refused)
                return func(*args, **kwargs)
            out = func(*tree_map(lambda a: on_device_backend(a, dev), args), **tree_map(unwrap, kwargs))
            return tree_map(lambda o: CudaStandIn(o) if isinstance(o, torch.Tensor) else o, out)
        target = kwargs.get("device")
        if target is not None:
            wrap = torch.device(target).type == "cuda"
            if wrap:
                kwargs = dict(kwargs, device=torch.device("cpu"))
        else:
            wrap = any(isinstance(a, CudaStandIn) for a in tree_leaves((args, kwargs)))
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        if wrap:
            return tree_map(lambda o: CudaStandIn(o) if isinstance(o, torch.Tensor) else o, out)
        return out


    class StandInMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return run(func, args, kwargs)


    COLLECTIVES = []
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group(backend="cuda:gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=world)
    torch.cuda._lazy_init = lambda: None  # no driver needed: no tensor really lands on a GPU
    # What the trainer does after every step: rank 1 got SIGTERM, nobody is over the time limit.
    out = {}
    try:
        from mnemo.train import schedule
        from mnemo.train.config import Config

        class Preempt:
            signal = 15 if rank == 1 else None

        cfg = Config()
        with StandInMode():
            out["agreed"] = list(schedule.stop_requests(Preempt(), cfg, started=0.0, device=CUDA))
    except Exception as e:
        out["error"] = str(e).splitlines()[0]
    out["collectives"] = COLLECTIVES
    # The seam itself: flags built on the CPU (how the trainer used to build them) are refused.
    try:
        flags = torch.tensor([float(rank == 1), 0.0])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        out["cpu"] = "reduced"
    except RuntimeError as e:
        out["cpu"] = str(e).splitlines()[0]
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()
''')


def _run_ranks(tmp_path: Path, world: int = 2) -> list[dict]:
    return run_ranks(tmp_path, WORKER, world)


def test_stop_flags_agree_on_a_group_without_a_cpu_backend(tmp_path):
    results = _run_ranks(tmp_path)
    for r in results:
        assert "error" not in r, r["error"]  # the old trainer: "No backend type associated with device type cpu"
        assert r["agreed"] == [True, False]  # rank 1's stop request stops rank 0 too
        assert r["collectives"] == ["c10d.allreduce_.default"]
        # ... and the seam refuses what a GPU run's NCCL-only group refused: a collective on a CPU tensor.
        assert r["cpu"] == "No backend type associated with device type cpu"


@pytest.mark.parametrize("use_cuda,backend", [(True, "cpu:gloo,cuda:nccl"), (False, "gloo")])
def test_process_group_covers_both_device_types_on_a_gpu(use_cuda, backend):
    from mnemo.train.collectives import process_group_backend

    assert process_group_backend(use_cuda) == backend


@pytest.mark.parametrize("world", [1, 2, 64, 1000])
def test_episode_agreement_sums_exactly_in_float32(world):
    """The episode step's "same task on every rank" check: it summed n_segments * 1000 + task in float32, which
    rounds past 2**24 (300 segments on 64 ranks: 19.2M), so ranks that agreed failed it. Its digits sum exactly."""
    import torch

    from mnemo.train.collectives import AGREE_PARTS, agreed, agreement_parts

    def summed(values):  # a SUM all-reduce in float32, rank by rank
        s = torch.zeros(AGREE_PARTS, dtype=torch.float32)
        for v in values:
            s += torch.tensor(agreement_parts(v, world), dtype=torch.float32)
        return s.tolist()

    for drawn in (0, 7, 300 * 1000 + 3, 2**24 + 1, 123_456_789):
        assert agreed(summed([drawn] * world), drawn, world), drawn
        if world > 1:  # one rank off by one, high or low: some rank sees it
            for other in (drawn + 1, max(drawn - 1, 0)):
                if other != drawn:
                    values = [drawn] * (world - 1) + [other]
                    total = summed(values)
                    assert not all(agreed(total, v, world) for v in values), (drawn, other)
