"""The language-model loss of one segment, shared by the training loop and the passkey episodes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(optimized loss, plain mean CE, number of real targets) of one segment.

    logits [B, T, V]; targets, weight, mask [B, T] (mask: the target is a
    document token, SegmentBatch.mask). Both losses are normalized by the
    number of real targets, so answer weights only re-weight tokens, and the
    plain loss covers every real target, weighted 0 or not.
    """
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(weight)
    mask = mask.float()
    n = mask.sum()
    denom = n.clamp(min=1.0)
    return (ce * weight).sum() / denom, (ce * mask).sum() / denom, n
