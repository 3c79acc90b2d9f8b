"""Test seams: faults the integration and unit tests inject into a real run through the environment.

Each variable is ``STEP:RANK`` (a 1-based optimizer step, a global rank); unset, nothing happens.

MNEMO_FAULT_CRASH_IN_SAVE   that rank SIGKILLs itself while saving the checkpoint of that step, after its
                            rank file is written and before the commit (the checkpoint stays incomplete).
MNEMO_FAULT_INF_GRAD        that rank's loss of that step keeps its value, but every gradient behind it is
                            NaN/inf (the gradient-norm check under train.nan_policy, with a finite loss).
MNEMO_FAULT_SPIKE_AT_STEP   that rank's loss of that corpus step (once per process), as optimized and as reported, is
                            multiplied by SPIKE_FACTOR (its gradients too): a spike for train.spike (train/spikes.py).
"""

from __future__ import annotations

import os
import signal

import torch

CRASH_IN_SAVE = "MNEMO_FAULT_CRASH_IN_SAVE"
INF_GRAD = "MNEMO_FAULT_INF_GRAD"
SPIKE = "MNEMO_FAULT_SPIKE_AT_STEP"
SPIKE_FACTOR = 10.0


def fault_step(var: str, rank: int) -> int:
    """The optimizer step (1-based) named by ``var``=STEP:RANK for this rank, else 0."""
    spec = os.environ.get(var, "")
    step, _, r = spec.partition(":")
    return int(step) if spec and r == str(rank) else 0


def maybe_crash_in_save(step: int, rank: int) -> None:
    """MNEMO_FAULT_CRASH_IN_SAVE: kill this rank mid-save."""
    if fault_step(CRASH_IN_SAVE, rank) == step:
        os.kill(os.getpid(), signal.SIGKILL)


class InfGradient(torch.autograd.Function):
    """MNEMO_FAULT_INF_GRAD: the loss unchanged, every gradient behind it NaN/inf."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")
