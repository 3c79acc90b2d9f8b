"""DeepSpeed universal checkpoints: resume on another world size or ZeRO stage.

``make_universal(step_dir)`` converts a checkpoint's engine state once (rank 0)
with ``deepspeed.checkpoint.ds_to_universal --inject_missing_state`` into
``<step_dir>/ds/universal_state`` and returns the tag to load with
``"checkpoint": {"load_universal": true}``.

DeepSpeed 0.19's converter writes a layout that depends on the *writing*
stage, and its loaders expect a layout that depends on the *loading* stage:

=========================  ==============================  ==============================
                           written from ZeRO-1/2           written from ZeRO-3
=========================  ==============================  ==============================
zero/<param>/{fp32,...}.pt ``{"param": full shape, ...}``  bare flat 1-D tensor
zero/<param>/step.pt       present                         missing
zero/optimizer_state.pt    per-group ``param_groups``,     ``optimizer_state_dict`` (with
                           ``ds_version``                  the step), no ``ds_version``
model-states file          ``mp_rank_00_...``              ``zero_pp_rank_0_mp_rank_00_...``
=========================  ==============================  ==============================

The ZeRO-1/2 loader (``universal_checkpoint.load_hp_checkpoint_state``) needs
the dicts, full shapes, ``step.pt`` and ``ds_version``; the ZeRO-3 loader
(``DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
accepts dicts or tensors but needs ``optimizer_state_dict["state"][0]["step"]``.
``normalize_universal`` rewrites the converted folder into the union of both,
so one conversion loads on any stage and any world size.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mnemo.data_pipeline.files import atomic_write_text, fsync_path, fsync_tree
from mnemo.data_pipeline.processes import python_command
from mnemo.train.checkpoint import COMPLETE, DS_TAG, load_torch_file
from mnemo.train.rundir import UNIVERSAL_TAG
from mnemo.train.errors import UserError

log = logging.getLogger("mnemo.checkpoint")

# Written into COMPLETE. A conversion marked otherwise (by an older mnemo, which
# left a layout only some stages load) is redone instead of being trusted.
FORMAT = "mnemo-universal 2"
# Per-parameter tensors of the universal layout (besides step.pt).
_STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), spelled out here so
# this module imports without deepspeed.
_PARAM, _CAT_DIM, _PARAM_SHAPES = "param", "cat_dim", "param_shapes"
_OPT_SD, _PARAM_GROUPS, _DS_VERSION = "optimizer_state_dict", "param_groups", "ds_version"


def is_universal_complete(path: Path) -> bool:
    """True if ``<path>/ds/universal_state`` is a finished conversion in the current format."""
    marker = Path(path) / "ds" / UNIVERSAL_TAG / COMPLETE
    return marker.is_file() and marker.read_text().strip() == FORMAT


def make_universal(path: Path) -> str:
    """Convert a checkpoint's engine state to DeepSpeed's universal format (rank 0), once.

    Returns the tag to load (``UNIVERSAL_TAG``). The result loads on ZeRO stage
    1, 2 or 3 at any world size, whatever stage and world size wrote the
    checkpoint. Atomic (temporary directory, COMPLETE marker, rename) and
    idempotent: a finished conversion is reused.
    """
    ds_dir = Path(path) / "ds"
    src, out, tmp = ds_dir / DS_TAG, ds_dir / UNIVERSAL_TAG, ds_dir / f".tmp-{UNIVERSAL_TAG}"
    if is_universal_complete(path):
        return UNIVERSAL_TAG
    # Errors say what failed, not which checkpoint: universal_tag names it.
    if not src.is_dir():
        raise UserError(f"no DeepSpeed engine state in {src}")
    t0 = time.time()
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted conversion
    _run_converter(src, tmp)
    normalize_universal(tmp)
    fsync_tree(tmp)
    (tmp / COMPLETE).write_text(FORMAT + "\n")
    fsync_path(tmp / COMPLETE)
    shutil.rmtree(out, ignore_errors=True)  # an older-format conversion
    os.replace(tmp, out)
    fsync_path(ds_dir)
    # The converter points latest_universal at the folder it wrote (our temporary name).
    atomic_write_text(ds_dir / "latest_universal", UNIVERSAL_TAG + "\n")
    log.info("converted %s to a universal checkpoint in %.1fs", src, time.time() - t0)
    return UNIVERSAL_TAG


def finish_universal_load(engine) -> None:
    """Call on every rank right after ``engine.load_checkpoint(..., tag=UNIVERSAL_TAG)``.

    DeepSpeed 0.19's ZeRO-3 universal loader stores *one* step tensor in the
    Adam state of every parameter group; torch's Adam increments it in place
    once per group, so after the resume the bias correction ran ahead by the
    number of groups per step (measured: 6 resumed steps on 2 groups moved the
    step from 6 to 18, and the losses left the uninterrupted run's at the 3rd
    resumed step). Give each group its own copy. A no-op for ZeRO-1/2, whose
    loader reads one step.pt per parameter.
    """
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO
    for st in getattr(base, "state", {}).values():
        step = st.get("step")
        if torch.is_tensor(step):
            st["step"] = step.clone()


# argv: the DeepSpeed folder, then ds_to_universal's arguments with folders relative to it. The converter
# builds glob patterns and a regular expression (re.compile(f"{prefix_path}\\.([0-9]+)")) from its folders'
# paths unescaped: a run dir named "exp (1)" or "g[1]" failed with "Cannot parse dp_rank". It runs inside
# that folder on relative names, so no path of the user's reaches them. -P keeps the starting directory off
# sys.path (python_command: its yaml.py would be imported with deepspeed); the rest is made absolute first:
# a relative entry (of PYTHONPATH, or "" where -P is missing) would otherwise point into the checkpoint
# folder, whose files a later import could pick up.
_CONVERTER = """
import os, runpy, sys
sys.path[:] = [os.path.abspath(p) for p in sys.path]
folder = sys.argv.pop(1)
import deepspeed  # before weights_only_loads: its allowlist names DeepSpeed's types
from mnemo.train.checkpoint import weights_only_loads
from mnemo.train.errors import UserError
try:
    with weights_only_loads(os.path.join(folder, sys.argv[sys.argv.index("--input_folder") + 1])):
        os.chdir(folder)
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
except UserError as e:
    print(f"UserError: {e}", file=sys.stderr)
    sys.exit(2)
"""


def _run_converter(src: Path, dst: Path) -> None:
    """Run ds_to_universal from ``src`` (a DeepSpeed tag folder) into ``dst``, a sibling of it; UserError
    with the converter's reason (universal_tag names the checkpoint)."""
    # A subprocess: the converter holds every shard in memory at once and uses
    # module-level state; neither should outlive the conversion in a training rank.
    # The converter reads with weights_only=False: it runs inside weights_only_loads, so a
    # crafted file is refused instead of unpickled (one worker each: no process pool).
    cmd = [
        *python_command(sys.executable),
        "-c",
        _CONVERTER,
        str(src.parent.absolute()),
        "--input_folder",
        src.name,
        "--output_folder",
        dst.name,
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(dst, ignore_errors=True)
        lines = [ln.strip() for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
        # The exception line of the traceback, not the progress bars printed around it.
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        why = (errors or lines or [f"exit code {res.returncode}"])[-1]
        why = re.sub(r"^[\w.]*UserError: ", "", why)  # a refusal of _CONVERTER: the message alone
        raise UserError(f"ds_to_universal: {why}")


# ---------------------------------------------------------------------------- normalization


def normalize_universal(folder: Path) -> None:
    """Rewrite a ``ds_to_universal`` output folder so ZeRO-1, -2 and -3 engines all load it.

    Idempotent: running it on a normalized folder changes nothing.
    """
    import deepspeed  # noqa: F401  (load_torch_file allowlists DeepSpeed's types once it is imported)

    folder = Path(folder)
    zero_dir = folder / "zero"
    _alias_model_states(folder)
    groups = _param_shapes(folder)
    opt_file = zero_dir / "optimizer_state.pt"
    if not opt_file.is_file():
        raise UserError(f"universal checkpoint {folder}: missing {opt_file.name}")
    opt_sd: dict[str, Any] = load_torch_file(opt_file)
    steps = _group_steps(opt_sd, groups, zero_dir)
    for gi, shapes in enumerate(groups):
        for name, shape in shapes.items():
            _normalize_param(zero_dir / name, torch.Size(shape), steps[gi])
    torch.save(_normalize_optimizer_state(opt_sd, steps), opt_file)


def _alias_model_states(folder: Path) -> None:
    # DeepSpeed names the model-states file after the *loading* engine's stage
    # (ZeRO-3: zero_pp_rank_0_mp_rank_XX_..., else mp_rank_XX_...) while the
    # converter keeps the writer's names: provide both so any stage can load.
    for f in sorted(folder.glob("*_model_states.pt")):
        m = re.match(r"^(?:zero_pp_rank_0_)?(mp_rank_\d+_model_states\.pt)$", f.name)
        if not m:
            continue
        for alias in (m.group(1), "zero_pp_rank_0_" + m.group(1)):
            if not (folder / alias).exists():
                try:
                    os.link(f, folder / alias)
                except OSError:  # a file system without hard links
                    shutil.copyfile(f, folder / alias)


def _param_shapes(folder: Path) -> list[dict[str, torch.Size]]:
    """Full shape of every trained parameter, per optimizer (sub-)group, from the model-states file.

    ZeRO-1/2 and ZeRO-3 both record ``param_shapes`` (ZeRO-3: the unpartitioned
    ``ds_shape``), in the order of the optimizer's flat groups.
    """
    f = folder / "mp_rank_00_model_states.pt"
    if not f.is_file():
        raise UserError(f"universal checkpoint {folder}: no model-states file (mp_rank_00_model_states.pt)")
    sd = load_torch_file(f)
    shapes = sd.get(_PARAM_SHAPES)
    if not shapes:
        raise UserError(f"universal checkpoint {f}: no '{_PARAM_SHAPES}' (not a ZeRO checkpoint?)")
    if isinstance(shapes, dict):  # a single group, as some writers store it
        shapes = [shapes]
    return [dict(g) for g in shapes]


def _group_steps(opt_sd: dict[str, Any], groups: list[dict[str, torch.Size]], zero_dir: Path) -> list[Any]:
    """Adam's step count per group: ZeRO-3 keeps it in optimizer_state_dict, ZeRO-1/2 in step.pt files."""
    state = (opt_sd.get(_OPT_SD) or {}).get("state") or {}
    steps: list[Any] = []
    for gi, shapes in enumerate(groups):
        step = state.get(gi, {}).get("step")
        if step is None:
            for name in shapes:
                f = zero_dir / name / "step.pt"
                if f.is_file():
                    step = load_torch_file(f)
                    break
        steps.append(step)
    known = [float(s) for s in steps if s is not None]
    if known and any(s != known[0] for s in known):
        # The ZeRO-3 loader takes one step for every group; unequal ones cannot be restored.
        raise UserError(f"universal checkpoint {zero_dir}: optimizer groups disagree on the step: {known}")
    return steps


def _normalize_param(d: Path, shape: torch.Size, step: Any) -> None:
    """Make ``d``'s state files ``{"param": tensor of the full shape, "cat_dim": 0}`` and add step.pt."""
    fp32 = d / "fp32.pt"
    if not fp32.is_file():
        raise UserError(f"universal checkpoint: no {fp32} for a trained parameter of shape {tuple(shape)}")
    for key in _STATE_KEYS:
        f = d / f"{key}.pt"
        if not f.is_file():
            # ZeRO made no optimizer state for a parameter that never had a gradient:
            # zero moments are what Adam would have kept for it.
            obj = load_torch_file(fp32)
            full = obj[_PARAM] if isinstance(obj, dict) else obj
            torch.save({_PARAM: torch.zeros(shape, dtype=full.dtype), _CAT_DIM: 0}, f)
            continue
        obj = load_torch_file(f)
        changed = False
        if torch.is_tensor(obj):  # ZeRO-3 writer: a bare flat tensor (numel,)
            obj, changed = {_PARAM: obj}, True
        param = obj[_PARAM]
        if param.numel() != shape.numel():
            raise UserError(f"universal checkpoint {f}: {param.numel()} values for a parameter of shape {tuple(shape)}")
        if param.shape != shape:
            # The ZeRO-1/2 loader keeps a tensor whose shape equals the parameter's
            # as a whole (tensor-parallel degree 1); a flat one it would try to split.
            obj[_PARAM], changed = param.reshape(shape).contiguous(), True
        if _CAT_DIM not in obj:
            obj[_CAT_DIM], changed = 0, True
        if changed:
            torch.save(obj, f)
    if step is not None and not (d / "step.pt").is_file():
        torch.save(step, d / "step.pt")  # the ZeRO-1/2 loader reads Adam's step from here


def _normalize_optimizer_state(opt_sd: dict[str, Any], steps: list[Any]) -> dict[str, Any]:
    """Global optimizer state readable by both loaders, without the writer's flat shards."""
    import deepspeed

    groups = opt_sd.get(_PARAM_GROUPS) or (opt_sd.get(_OPT_SD) or {}).get(_PARAM_GROUPS)
    if not groups:
        raise UserError("universal checkpoint: optimizer_state.pt has no param_groups")
    out = {k: v for k, v in opt_sd.items() if k not in (_OPT_SD, "fp32_flat_groups")}
    out[_PARAM_GROUPS] = groups  # ZeRO-1/2: per-group hyperparameters, zipped with the engine's groups
    # A ZeRO-3 writer leaves no ds_version, which ZeRO-1/2 loaders require.
    out[_DS_VERSION] = opt_sd.get(_DS_VERSION) or deepspeed.__version__
    # The ZeRO-3 loader copies the hyperparameters of group 0 into *every* group
    # (it would give the no-decay group the decay group's weight_decay): keep only
    # those all groups share, so the others stay as the loading engine built them.
    common = {k: v for k, v in groups[0].items() if k != "params" and all(_same(g.get(k), v) for g in groups)}
    out[_OPT_SD] = {
        "state": {gi: {"step": s} for gi, s in enumerate(steps) if s is not None},
        _PARAM_GROUPS: [dict(common, params=[])],
    }
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):  # tensors of several elements: treat as different
        return False
