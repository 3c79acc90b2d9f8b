"""Stream slots under gradient accumulation: which slots a rank reads at which micro-step, and their state.

A job of W ranks with ``train.batch_size`` B and A accumulation micro-steps
(train/schedule.py ``batching``) has G = W x A *slot groups* of B slots each,
G x B = the global batch. The mapping is fixed:

    group g = rank x A + i     (rank r reads groups rA .. rA + A - 1; micro-step i reads group rA + i)

Each group is one DocumentStreams partition (``rank`` g of ``world_size`` G in
data_pipeline/streams.py): the data a group reads depends on g and G only,
not on how the groups are spread over ranks. So 2 ranks x 1 micro-step and
1 rank x 2 micro-steps read the same documents in the same slots, and a
resume on another world size with the same global batch (and B) is exact:
group g's stream state and memory rows move to whichever rank now holds g.
With A = 1 a group is a rank (g = rank, G = W): the streams, the memory and
the rank file are exactly those of a run without accumulation.

What a rank file holds (keys unchanged, content grows with A):
  streams   one group's stream state (A = 1) or {"groups": [A stream states]}
  memory    one MemoryState state dict of A x B slots: group rA + i is rows
            [iB, (i+1)B) (every tensor has the slot dimension first)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def group_states(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream states of the groups in one rank file's ``streams`` entry, in group order."""
    return list(entry["groups"]) if "groups" in entry else [entry]


def check_saved_groups(entry: dict[str, Any], rank: int, world_size: int, accum: int, batch_size: int | None) -> None:
    """ValueError ``FIELD: what is wrong`` unless the ``streams`` entry of old rank ``rank``'s file is that of
    the slot groups its checkpoint says that rank read: world size ``world_size``, ``accum`` groups a rank of
    ``batch_size`` slots (None: not compared), group ``rank x accum + i`` of ``world_size x accum``. A rank
    file copied, swapped or renamed into another's place, or of another run or step, was taken as that rank's
    (documents read twice or never, memory in another group's slots). A field a state does not hold is the
    loader's to refuse."""
    states = group_states(entry)
    if len(states) != accum:
        raise ValueError(f"groups: {len(states)} slot groups, not the checkpoint's {accum} a rank")
    for i, st in enumerate(states):
        at = f"groups[{i}]." if "groups" in entry else ""
        for key, want in (("rank", rank * accum + i), ("world_size", world_size * accum), ("batch_size", batch_size)):
            if key in st and want is not None and st[key] != want:
                raise ValueError(f"{at}{key}: {st[key]!r}, not {want}: not this rank's state in this checkpoint")


def check_slot_rows(sd: dict[str, Any], rows: int) -> None:
    """ValueError ``KEY: what is wrong`` unless every tensor of the memory state dict ``sd`` holds ``rows`` slots
    (its first dimension): an old rank file's memory at a resume on another world size, whose rows are taken
    by offset across files (concat_rows), so a longer tensor gave the next group another group's rows."""
    for k, t in sd.items():
        n = len(t) if isinstance(t, torch.Tensor) and t.dim() > 0 else None
        if n != rows:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{k}: shape {shape} does not hold the rank file's {rows} slots")


class SlotGroups:
    """The A DocumentStreams (slot groups) one rank reads in turn; Stateful as the rank file's ``streams``."""

    def __init__(self, make: Callable[[int, int], Any], rank: int, accum: int, world_size: int):
        """``make(group, num_groups)``: the DocumentStreams of group ``group`` of ``num_groups``."""
        self.accum = accum
        self.groups = [make(g, world_size * accum) for g in range(rank * accum, (rank + 1) * accum)]

    def group(self, i: int):
        """The streams of micro-step ``i``."""
        return self.groups[i]

    def __iter__(self):
        return self

    def __next__(self):
        """The next batch of the only group (A = 1): code that predates accumulation reads it like a loader."""
        if self.accum != 1:
            raise RuntimeError("SlotGroups: with gradient accumulation read each micro-step's group(i)")
        return next(self.groups[0])

    def __getattr__(self, name: str):
        # Other loader attributes (per-source token counts, ...) of the only group; with accumulation the
        # groups differ, so a reader must go through group(i).
        groups = self.__dict__.get("groups")
        if groups is not None and len(groups) == 1 and not name.startswith("__"):
            return getattr(groups[0], name)
        raise AttributeError(f"SlotGroups has no attribute {name!r} (with accumulation: read group(i).{name})")

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.groups)

    @property
    def used_up(self) -> bool:
        """Whether a group of this rank ran out of data (DocumentStreams.used_up: a mixture at its max_epochs)."""
        return any(s.used_up for s in self.groups)

    def close(self) -> None:
        for s in self.groups:
            s.close()

    def state_dict(self) -> dict[str, Any]:
        if self.accum == 1:
            return self.groups[0].state_dict()
        return {"groups": [s.state_dict() for s in self.groups]}

    def same_shape(self, entry: dict[str, Any]) -> bool:
        """Was this rank file's ``streams`` entry saved with these groups (count, G, B, T)?"""
        states = group_states(entry)
        return len(states) == self.accum and all(s.same_shape(st) for s, st in zip(self.groups, states))

    def load_state_dict(self, entries: dict[str, Any] | list[dict[str, Any]]) -> bool:
        """This rank's own entry (same shape), or every old rank's entry; True when every group resumes exactly.

        From all old entries each group finds its own old group (the same G,
        B and T: exact, wherever it was) or re-partitions from all of them
        (data_pipeline/streams.py: finished documents stay finished, those in
        flight restart).
        """
        if isinstance(entries, dict):
            own = group_states(entries)
            return all([s.load_state_dict(st) for s, st in zip(self.groups, own)])
        every = [st for e in entries for st in group_states(e)]
        return all([s.load_state_dict(every) for s in self.groups])


def concat_memory(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """MemoryState state dicts of consecutive slot groups as one (slot dimension first in every tensor)."""
    if len(sds) == 1:
        return sds[0]
    return {k: torch.cat([sd[k] for sd in sds]) for k in sds[0]}


class MemoryGroups:
    """The MemoryStates of a rank's A slot groups (``states[i]``: micro-step i, B slots); one state dict of A x B."""

    def __init__(self, states: list, device: torch.device | str = "cpu"):
        self.states = list(states)
        self.device = device

    @property
    def state(self):
        """The only group's state (A = 1): what code that predates accumulation reads and sets."""
        return self.states[0]

    @state.setter
    def state(self, value) -> None:
        self.states[0] = value

    def state_dict(self) -> dict[str, Any]:
        return concat_memory([s.state_dict() for s in self.states])

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        B = self.states[0].batch_size
        for i, s in enumerate(self.states):
            part = sd if len(self.states) == 1 else {k: v[i * B : (i + 1) * B] for k, v in sd.items()}
            self.states[i] = s.load_state_dict(part).to(self.device)

    def load_regrouped(self, old: list[dict[str, Any]], rank: int, rows: int | None = None) -> None:
        """This rank's groups from every old rank's memory (old rank files in rank order: groups in order).

        ``rows``: the slots of each old rank file (its batch size x accumulation steps), which every tensor
        of each must hold (check_slot_rows; ValueError ``old rank R: KEY: ...``).

        The rows of this rank's slots in concat_memory(old), copied from the old ranks that hold them only:
        the others' tensors are not read (from mapped rank files, CheckpointManager.rank_states, they are
        never read from disk), so a new rank holds its own slots' memory, not every old rank's.
        """
        for r, sd in enumerate(old if rows is not None else ()):
            try:
                check_slot_rows(sd, rows)
            except ValueError as e:
                raise ValueError(f"old rank {r}: {e}") from None
        n = sum(s.batch_size for s in self.states)
        self.load_state_dict({k: concat_rows([sd[k] for sd in old], rank * n, (rank + 1) * n) for k in old[0]})


def concat_rows(tensors: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Rows ``start .. stop - 1`` of ``torch.cat(tensors)`` (fewer where it has fewer), a new tensor made of
    those rows only: a tensor none of whose rows are taken is not read."""
    parts, at = [], 0
    for t in tensors:
        lo, hi = max(start, at), min(stop, at + len(t))
        if lo < hi:
            parts.append(t[lo - at : hi - at])
        at += len(t)
    return torch.cat(parts) if parts else tensors[0][:0].clone()
