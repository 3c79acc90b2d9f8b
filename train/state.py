"""The parts of a rank's state a checkpoint holds, as Stateful objects (``state_dict`` / ``load_state_dict``).

The stream loader (DocumentStreams) and the passkey episodes (Episodes) are
Stateful themselves; these adapters hold the rest: the memory state the loop
carries, the RNG states and the step/token counters. CheckpointManager.restore
(train/checkpoint.py) decides which of them a resume restores.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mnemo.train.checkpoint import rng_state, set_rng_state


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
