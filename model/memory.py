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
                                  and keys or values (S = the longer span > 1):
                                  the layer inputs of the last S-1 tokens read
  stm_len, ltm_len  [B]          valid entries; they are always the newest,
                                  i.e. the last ``len`` positions (right-aligned)
  pos            [B]             tokens of the current document already read
                                  (absolute RoPE position of the next token)
  With ``memory.long.search: ivf`` (model/retrieval.py), per long-term layer:
  ltm_c          [B, H, N] int32 inverted-file list of each stored key
                                  (FIFO with ltm_k)
  ltm_cen        [B, H, C, Dh]   the document's unit centroids, C = capacity //
                                  IVF_LIST_SIZE (at most IVF_MAX_LISTS); the
                                  first fill // IVF_LIST_SIZE in use after a fit
                                  at ``fill`` entries, the rest zero (all zero
                                  until the store first holds IVF_TRAIN_AT keys)
  ltm_inv        [B, H, N] int32 the index: ages (entries pushed after it, at
                                  the last build) of the indexed entries,
                                  grouped by list
  ltm_off        [B, H, C+1] int32 where each list starts in ltm_inv
  ltm_since      [B] long        entries pushed since the last build (they
                                  are searched exactly)
  ltm_kl         [B, H, N, Dh]   the indexed keys in index order (ltm_kl[j] is
                                  the key of ltm_inv[j], as of the last build):
                                  a list's keys are contiguous, so a query's
                                  candidates are read as a few runs of rows
  ltm_fit        [B] long        stored entries when the centroids were last
                                  fit (0: not yet; refit when the store doubles)
All methods return new objects; nothing is modified in place, so autograd
graphs through the state stay valid. One exception, for evaluation cost: a
forward with gradients off appends to a long-term store in place
(``fifo_append``) when the store is a view that an earlier such append made,
into spare room after the view's end. The input state still reads exactly
as before (its entries are not touched), but two forwards from the same
input state write the same room: a no-grad forward from a state invalidates
the states made by earlier no-grad forwards from it (and their successors).
Evaluation and the benchmarks read each state forward once, or branch from
it and drop the branches; code that keeps branches of a state under no_grad
must clone it first (``state.to`` does not; ``state_dict`` does).
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
    ltm_c: Tensor | None = None  # [B, H, N] int32
    ltm_cen: Tensor | None = None  # [B, H, C, Dh]
    ltm_inv: Tensor | None = None  # [B, H, N] int32
    ltm_off: Tensor | None = None  # [B, H, C+1] int32
    ltm_since: Tensor | None = None  # [B] long
    ltm_fit: Tensor | None = None  # [B] long
    ltm_kl: Tensor | None = None  # [B, H, N, Dh]

    def _map(self, fn) -> "LayerMemory":
        return LayerMemory(*(None if t is None else fn(t) for t in (getattr(self, f) for f in _FIELDS)))

    def ivf_index(self) -> tuple[Tensor, ...] | None:
        """(ltm_c, ltm_cen, ltm_inv, ltm_off, ltm_since, ltm_fit, ltm_kl) of an IVF store, or None."""
        return None if self.ltm_cen is None else tuple(getattr(self, f) for f in _IVF_FIELDS)


_IVF_FIELDS = ("ltm_c", "ltm_cen", "ltm_inv", "ltm_off", "ltm_since", "ltm_fit", "ltm_kl")
_FIELDS = ("stm_k", "stm_v", "ltm_k", "ltm_v", "k_tail", "x_tail", *_IVF_FIELDS)


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
        keep = ~mask

        def clear(t: Tensor) -> Tensor:  # t [B, ...], of any rank and dtype
            # A select, not t * keep: NaN * 0 is NaN, and a slot left NaN by an overflowed step
            # (train.nan_policy=skip resets it) would stay NaN for every later step.
            return torch.where(keep.view(-1, *(1,) * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype, device=t.device))

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
        """Move to a device; ``dtype`` applies to the stored keys/values only (not to integer fields)."""

        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return MemoryState(
            layers=tuple(layer._map(move) for layer in self.layers),
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
        """Return a state holding ``sd`` with this state's structure, checking shapes and the fills.

        ValueError ``FIELD: what is wrong`` (FIELD a key of ``sd``) for a missing or non-tensor entry, a
        shape other than this state's, or a fill (``stm_len``, ``ltm_len``) outside 0 .. the store's
        capacity or a negative ``pos``: the reads index the stores with them, so a crafted value was
        accepted and read other slots' entries or past the store.
        """
        for key in ("stm_len", "ltm_len", "pos"):
            if key not in sd:
                raise ValueError(f"{key}: missing")
        for key, t in sd.items():
            if not isinstance(t, Tensor):
                raise ValueError(f"{key}: a {type(t).__name__}, not a tensor")
        other = MemoryState.from_state_dict(sd, len(self.layers))
        # The search is not a weight (memory.long.search may change at resume): an IVF index this
        # state carries and ``sd`` lacks starts empty, all entries not yet indexed (ltm_since = the
        # fill: searched exactly until the next build); one ``sd`` carries and this state lacks is dropped.
        fixed = []
        for a, b in zip(self.layers, other.layers):
            if a.ltm_cen is None:
                b = replace(b, **dict.fromkeys(_IVF_FIELDS))
            elif b.ltm_k is not None and (b.ltm_cen is None or b.ltm_kl is None or b.ltm_cen.shape != a.ltm_cen.shape):
                # (another shape: an index of another list buffer, e.g. an earlier release's fixed count)
                fresh = {f: torch.zeros_like(getattr(a, f)) for f in _IVF_FIELDS}
                fresh["ltm_since"] = other.ltm_len.clone()
                b = replace(b, **fresh)
            fixed.append(b)
        other = replace(other, layers=tuple(fixed))
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            for name in _FIELDS:
                ta, tb = getattr(a, name), getattr(b, name)
                if (ta is None) != (tb is None) or (ta is not None and ta.shape != tb.shape):
                    got = None if tb is None else tuple(tb.shape)
                    want = None if ta is None else tuple(ta.shape)
                    raise ValueError(f"layers.{i}.{name}: shape {got} does not match {want}")
        if other.pos.shape != self.pos.shape:
            got = other.pos.shape[0] if other.pos.dim() == 1 else tuple(other.pos.shape)
            raise ValueError(f"pos: batch size {got} does not match {self.pos.shape[0]}")
        for key, cap in (("pos", None), ("stm_len", self.stm_capacity), ("ltm_len", self.ltm_capacity)):
            t = getattr(other, key)
            if t.shape != self.pos.shape or t.is_floating_point() or t.is_complex():
                raise ValueError(
                    f"{key}: {t.dtype} {tuple(t.shape)}, not whole numbers of shape {tuple(self.pos.shape)}"
                )
            bad = (t < 0) | (t > cap) if cap is not None else t < 0
            if bool(bad.any()):
                slot = int(bad.nonzero()[0, 0])
                allowed = "below 0" if cap is None else f"outside 0 to {cap}"
                raise ValueError(f"{key}: {int(t[slot])} (slot {slot}) is {allowed}")
        # Keys/values take this state's dtype: a bf16 run's state resumed in fp32 (or back) must
        # match the model's activations (exact for bf16 -> fp32; rounded for fp32 -> bf16).
        fields = (getattr(layer, f) for layer in self.layers for f in _FIELDS)
        ref = next((t for t in fields if t is not None and t.is_floating_point()), None)
        return other.to(self.pos.device, None if ref is None else ref.dtype)

    def equal(self, other: "MemoryState") -> bool:
        a, b = self.state_dict(), other.state_dict()
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fifo_append(store: Tensor, new: Tensor) -> Tensor:
    """The newest N entries of [store ; new] along dim 2: store [B, H, N, ...], new [B, H, T, ...].

    With gradients on (training) this is a copy of N entries, as always. With
    them off, the result is a view of a buffer with spare room after it: the
    next append writes its T entries into the room and moves the view by T,
    copying nothing, until the room is used up (then one copy into a fresh
    buffer with room N/4 + T). Only views that this function made (marked)
    are written after their end: any other tensor's storage is never touched.
    The input's entries are never modified (see the module docstring).
    Code that torch.compile traces always copies (the compiler fuses the copy).
    """
    N, T = store.shape[2], new.shape[2]
    if T >= N:
        return new[:, :, T - N :]
    # Under torch.compile the in-place path cannot be traced: functionalization turns the write
    # after the view's end into an as_strided_scatter bounded by the view's own storage, which
    # fails (and the ``_fifo_room`` mark does not survive the graph). The compiler fuses the copy.
    if torch.is_grad_enabled() or store.requires_grad or new.requires_grad or torch.compiler.is_compiling():
        return torch.cat((store[:, :, T:], new), dim=2)  # copies N entries, not N+T
    room = getattr(store, "_fifo_room", 0)  # entries of spare buffer after the view's end
    if room >= T and (torch.is_inference_mode_enabled() or not store.is_inference()):
        tail = torch.as_strided(store, new.shape, store.stride(), store.storage_offset() + N * store.stride(2))
        tail.copy_(new)
        out = torch.as_strided(store, store.shape, store.stride(), store.storage_offset() + T * store.stride(2))
        out._fifo_room = room - T
        return out
    B, H = store.shape[:2]
    spare = N // 4 + T
    buf = store.new_empty(B, H, N + spare, *store.shape[3:])
    buf[:, :, : N - T] = store[:, :, T:]
    buf[:, :, N - T : N] = new
    out = buf[:, :, :N]
    out._fifo_room = spare
    return out


def fifo_peak_entries(N: int, T: int) -> int:
    """Entries per slot and head that a store of N entries takes at most while a no-grad read appends
    T entries a segment (``fifo_append``), the input state being alive until the forward returns.

    When the room runs out the input's buffer (N + N // 4 + T entries, after an earlier growth) and the
    fresh one of the same size are both held: 2.5 N + 2 T, not N (the memory pre-flight of evaluation
    and generation counts this). T >= N: the input store and the T new entries it keeps a view of.
    """
    return N + T if T >= N else 2 * (N + N // 4 + T)


def gather_rows(store: Tensor, flat: Tensor) -> Tensor:
    """Rows store[b, h, n] [len(flat), Dh] for flat = (b H + h) N + n, store [B, H, N, Dh].

    A contiguous store is flattened (a view). A store that ``fifo_append`` made is a view of a
    buffer [B, H, R, Dh] with R > N: flattening it would copy the whole store, so the rows are
    read through a flat view of the buffer instead (row (b H + h) R + n).
    """
    B, H, N, Dh = store.shape
    s0, s1, s2, s3 = store.stride()
    # Compiled code never reads past a view's end (see fifo_append): a store it gets is flattened
    # (a copy only for a store an eager no-grad append made).
    if s3 != 1 or s2 != Dh or s0 != H * s1 or s1 % Dh or store.is_contiguous() or torch.compiler.is_compiling():
        return store.reshape(B * H * N, Dh).index_select(0, flat)
    R = s1 // Dh
    rows = torch.as_strided(store, ((B * H - 1) * R + N, Dh), (Dh, 1), store.storage_offset())
    return rows.index_select(0, flat // N * R + flat % N)
