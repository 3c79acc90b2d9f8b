"""Truncated backpropagation through time over memory-carrying segments.

The rule the trainer follows (``memory.bptt_segments`` = k): one optimizer
step reads k consecutive segments of every stream slot, carrying the memory
state from each segment to the next (reset where a slot starts a new
document), sums their losses (each divided by k), runs ONE backward, and
detaches the state. Gradients therefore flow through the short- and long-term
memory across the k segments of a window and never into an earlier window:
the loss at the last segment t of a window reaches the inputs of segments
t-k+1..t and nothing before.

This module holds that rule as a pure function so that tests can pin it;
the model itself never detaches anything (``model/`` is pure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor


def bptt_window_loss(
    model: Any,
    segments: Sequence[Tensor],
    state: Any,
    loss_fn: Callable[[Tensor, int], Tensor],
    resets: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Any]:
    """Loss of one truncated-BPTT window and the memory state after it, detached.

    model     ``model(tokens [B, T], state) -> (logits [B, T, V], state)`` (a
              MemoryTransformer or a DeepSpeed engine wrapping one)
    segments  k input segments [B, T] of the same stream slots, in reading order
    state     the MemoryState before the first segment
    loss_fn   ``loss_fn(logits, i)``: scalar loss of segment i (the caller knows
              its targets and weights)
    resets    optional k bool masks [B]: slots that start a new document at
              segment i (their memory is emptied before reading it)

    Returns (sum of loss_fn(logits_i, i) / k, state after the last segment,
    detached). The loss keeps the graph through the whole window: call
    backward on it once. The returned state starts the next window with no
    graph attached, which is what truncates the backpropagation.
    """
    k = len(segments)
    if k == 0:
        raise ValueError("bptt_window_loss: no segments")
    if resets is not None and len(resets) != k:
        raise ValueError(f"bptt_window_loss: {len(resets)} reset masks for {k} segments")
    total: Tensor | None = None
    for i, tokens in enumerate(segments):
        if resets is not None:
            state = state.reset(resets[i])
        logits, state = model(tokens, state)
        loss = loss_fn(logits, i) / k
        total = loss if total is None else total + loss
    assert total is not None
    return total, state.detach()


__all__ = ["bptt_window_loss"]
