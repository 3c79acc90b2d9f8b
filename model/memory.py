"""MemoryState: everything a memory transformer carries from one segment to the next.

It is data, not parameters: an explicit input to and output of
``MemoryTransformer.forward``. ZeRO never shards it; the trainer checkpoints
it per rank and detaches it at truncated-BPTT boundaries.

Layout (B = stream slots, H = heads, Dh = head dim):
  stm_k, stm_v   [B, H, M, Dh]   per layer: rotated keys / values of the last M
                                  tokens of the slot's current document (in a
                                  joint long-term layer, which has no RoPE: the
                                  unit-norm keys)
  ltm_k, ltm_v   [B, H, N, Dh]   per long-term layer: unit-norm, un-rotated keys
                                  and values of the document so far (FIFO)
  k_tail         [B, H, 1, Dh]   per long-term layer with smeared keys: the
                                  raw key of the last token read (the next
                                  segment's first key mixes it in)
  x_tail         [B, 1, S-1, D]  per long-term layer with multi-token queries
                                  and keys (span S > 1): the layer inputs of
                                  the last S-1 tokens read
  stm_len, ltm_len  [B]          valid entries; they are always the newest,
                                  i.e. the last ``len`` positions (right-aligned)
  pos            [B]             tokens of the current document already read
                                  (absolute RoPE position of the next token)
All methods return new objects; nothing is modified in place, so autograd
graphs through the state stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class LayerMemory:
    stm_k: Tensor | None = None  # [B, H, M, Dh]
    stm_v: Tensor | None = None  # [B, H, M, Dh]
    ltm_k: Tensor | None = None  # [B, H, N, Dh]
    ltm_v: Tensor | None = None  # [B, H, N, Dh]
    k_tail: Tensor | None = None  # [B, H, 1, Dh]
    x_tail: Tensor | None = None  # [B, 1, S-1, D]

    def _map(self, fn) -> "LayerMemory":
        return LayerMemory(*(None if t is None else fn(t) for t in (getattr(self, f) for f in _FIELDS)))


_FIELDS = ("stm_k", "stm_v", "ltm_k", "ltm_v", "k_tail", "x_tail")


@dataclass(frozen=True)
class MemoryState:
    layers: tuple[LayerMemory, ...]
    stm_len: Tensor  # [B] long
    ltm_len: Tensor  # [B] long
    pos: Tensor  # [B] long

    # ------------------------------------------------------------------ info
    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    @property
    def stm_capacity(self) -> int:
        t = self.layers[0].stm_k if self.layers else None
        return 0 if t is None else t.shape[2]

    @property
    def ltm_capacity(self) -> int:
        for layer in self.layers:
            if layer.ltm_k is not None:
                return layer.ltm_k.shape[2]
        return 0

    # ------------------------------------------------------------ transforms
    def reset(self, mask: Tensor) -> "MemoryState":
        """Empty the memory of the slots where ``mask`` [B] is True (new document).

        Stored tensors are zeroed too (not only the lengths) so that a reset
        slot is indistinguishable from a fresh one, bit for bit.
        """
        mask = mask.to(device=self.pos.device, dtype=torch.bool)
        if not bool(mask.any()):
            return self
        keep = (~mask).view(-1, 1, 1, 1)

        def clear(t: Tensor) -> Tensor:
            return t * keep.to(t.dtype)

        zero = torch.zeros_like(self.pos)
        return MemoryState(
            layers=tuple(layer._map(clear) for layer in self.layers),
            stm_len=torch.where(mask, zero, self.stm_len),
            ltm_len=torch.where(mask, zero, self.ltm_len),
            pos=torch.where(mask, zero, self.pos),
        )

    def detach(self) -> "MemoryState":
        return replace(self, layers=tuple(layer._map(Tensor.detach) for layer in self.layers))

    def to(self, device=None, dtype=None) -> "MemoryState":
        """Move to a device; ``dtype`` applies to the stored keys/values only."""
        return MemoryState(
            layers=tuple(layer._map(lambda t: t.to(device=device, dtype=dtype)) for layer in self.layers),
            stm_len=self.stm_len.to(device),
            ltm_len=self.ltm_len.to(device),
            pos=self.pos.to(device),
        )

    # -------------------------------------------------------- serialization
    def state_dict(self) -> dict[str, Tensor]:
        sd = {"stm_len": self.stm_len, "ltm_len": self.ltm_len, "pos": self.pos}
        for i, layer in enumerate(self.layers):
            for name in _FIELDS:
                t = getattr(layer, name)
                if t is not None:
                    sd[f"layers.{i}.{name}"] = t
        return {k: v.detach().clone() for k, v in sd.items()}

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], n_layers: int) -> "MemoryState":
        layers = tuple(LayerMemory(*(sd.get(f"layers.{i}.{name}") for name in _FIELDS)) for i in range(n_layers))
        return cls(layers=layers, stm_len=sd["stm_len"], ltm_len=sd["ltm_len"], pos=sd["pos"])

    def load_state_dict(self, sd: dict[str, Tensor]) -> "MemoryState":
        """Return a state holding ``sd`` with this state's structure, checking shapes."""
        other = MemoryState.from_state_dict(sd, len(self.layers))
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            for name in _FIELDS:
                ta, tb = getattr(a, name), getattr(b, name)
                if (ta is None) != (tb is None) or (ta is not None and ta.shape != tb.shape):
                    got = None if tb is None else tuple(tb.shape)
                    want = None if ta is None else tuple(ta.shape)
                    raise ValueError(f"memory state layers.{i}.{name}: shape {got} does not match {want}")
        if other.pos.shape != self.pos.shape:
            raise ValueError(f"memory state: batch size {other.pos.shape[0]} does not match {self.pos.shape[0]}")
        # Keys/values take this state's dtype: a bf16 run's state resumed in fp32 (or back) must
        # match the model's activations (exact for bf16 -> fp32; rounded for fp32 -> bf16).
        ref = next((t for layer in self.layers for t in (getattr(layer, f) for f in _FIELDS) if t is not None), None)
        return other.to(self.pos.device, None if ref is None else ref.dtype)

    def equal(self, other: "MemoryState") -> bool:
        a, b = self.state_dict(), other.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
