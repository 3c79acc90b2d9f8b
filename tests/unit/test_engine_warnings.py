"""torch.distributed's deprecation notices, raised inside DeepSpeed's ZeRO-3 every step, stay out of the logs."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist

from mnemo.train.engine import quiet_library_deprecations


def _deprecated_calls() -> list[str]:
    """Messages of the warnings two deprecated collectives raise (before they fail: no process group here)."""
    out = torch.zeros(2)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        quiet_library_deprecations()
        for fn in (dist.all_gather_into_tensor, dist.reduce_scatter_tensor):
            with pytest.raises((ValueError, RuntimeError)):
                fn(out, torch.ones(2))
        subprocess.run([sys.executable, "-c", "pass"], check=True)  # what DeepSpeed's CPU accelerator does each step
        warnings.warn("another library's FutureWarning", FutureWarning, stacklevel=1)
    return [str(w.message) for w in got]


def test_torch_distributed_deprecations_are_quiet_and_other_warnings_are_not():
    """Before: 2 FutureWarnings per rank and step in a ZeRO-3 run (4 lines each), every step, since the
    subprocess DeepSpeed starts per step resets the registry that shows a warning once."""
    for _ in range(2):
        messages = _deprecated_calls()
        assert not [m for m in messages if "torch.distributed" in m], messages
        assert "another library's FutureWarning" in messages
