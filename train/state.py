"""The parts of a rank's state a checkpoint holds, as Stateful objects (``state_dict`` / ``load_state_dict``).

The stream loader (DocumentStreams) and the passkey episodes (Episodes) are
Stateful themselves; these adapters hold the rest: the memory state the loop
carries, the RNG states and the step/token counters. CheckpointManager.restore
(train/checkpoint.py) decides which of them a resume restores.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import torch

import numpy as np


def rng_state(device: torch.device | str = "cpu") -> dict[str, Any]:
    """This rank's RNG states; on a GPU that of its own device only (``cuda``: a CPU ByteTensor).

    Each rank drives one device: reading or setting every visible device's
    generator would create a CUDA context on each of them, in every rank.
    """
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    device = torch.device(device)
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device | str = "cpu") -> None:
    """Set this rank's RNG states from ``st`` (rng_state); ValueError ``KEY: what is wrong`` for one that is
    missing or that its generator refuses (a crafted or damaged rank file), before any is set."""
    for key in ("python", "numpy", "torch"):
        if key not in st:
            raise ValueError(f"{key}: missing")
    if not (isinstance(st["torch"], torch.Tensor) and st["torch"].dtype == torch.uint8):
        raise ValueError(f"torch: a {type(st['torch']).__name__}, not a byte tensor")
    want = torch.get_rng_state().numel()
    if st["torch"].numel() != want:
        raise ValueError(f"torch: {st['torch'].numel()} bytes, not {want}")
    was = random.getstate(), np.random.get_state()
    for key, setter in (("python", random.setstate), ("numpy", np.random.set_state)):
        try:
            setter(st[key])
        except (TypeError, ValueError, IndexError, KeyError) as e:
            random.setstate(was[0])
            np.random.set_state(was[1])
            raise ValueError(f"{key}: not a state of its generator ({e})") from None
    torch.set_rng_state(st["torch"])
    device = torch.device(device)
    cuda = st.get("cuda")
    if device.type == "cuda" and cuda is not None:
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible device's state
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


class MemoryPart:
    """The MemoryState the loop carries from step to step (``state``); restored onto ``device``."""

    def __init__(self, state, device: torch.device | str = "cpu"):
        self.state = state
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state = self.state.load_state_dict(sd).to(self.device)


class RNGState:
    """Python, numpy and torch RNG states of this rank (on a GPU: of its own device)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_rng_state(sd, self.device)


@dataclasses.dataclass
class Counters:
    """Optimizer steps done and tokens trained on (all ranks): ``step`` and ``tokens_seen`` of a rank file."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(sd["step"]), int(sd["tokens_seen"])
