"""DeepSpeed universal checkpoints: resume on another world size or ZeRO stage.

``make_universal(step_dir)`` converts a checkpoint's engine state once (rank 0)
with ``deepspeed.checkpoint.ds_to_universal --inject_missing_state`` into
``<step_dir>/ds/universal_state`` and returns the tag to load with
``"checkpoint": {"load_universal": true}``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from train.checkpoint import COMPLETE, DS_TAG
from train.errors import UserError

UNIVERSAL_TAG = "universal_" + DS_TAG


def make_universal(path: Path) -> str:
    """Convert a checkpoint's engine state to DeepSpeed's universal format (rank 0), once.

    Returns the tag to load. Plain-engine checkpoints need --inject_missing_state.
    """
    import subprocess
    import sys

    ds_dir = Path(path) / "ds"
    tag = UNIVERSAL_TAG
    out = ds_dir / tag
    if (out / COMPLETE).is_file():
        return tag
    tmp = ds_dir / f".tmp-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ds_dir / DS_TAG),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
        raise UserError(f"checkpoint {path}: conversion to a universal checkpoint failed: {tail[0]}")
    # DeepSpeed names the model-states file after the *loading* engine's stage
    # (ZeRO-3: zero_pp_rank_0_mp_rank_XX_..., else mp_rank_XX_...) while the
    # converter keeps the writer's names: provide both so any stage can load.
    for f in list(tmp.glob("*_model_states.pt")):
        m = re.match(r"^(?:zero_pp_rank_0_)?(mp_rank_\d+_model_states\.pt)$", f.name)
        if m:
            for alias in (m.group(1), "zero_pp_rank_0_" + m.group(1)):
                if not (tmp / alias).exists():
                    os.link(f, tmp / alias)
    # A ZeRO-3 writer leaves no ds_version in the global optimizer state, which
    # ZeRO-1/2 loaders require: record the converting DeepSpeed version.
    opt_state = tmp / "zero" / "optimizer_state.pt"
    if opt_state.is_file():
        import deepspeed

        sd = torch.load(opt_state, map_location="cpu", weights_only=False)
        if not sd.get("ds_version"):
            sd["ds_version"] = deepspeed.__version__
            torch.save(sd, opt_state)
    (tmp / COMPLETE).write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return tag
