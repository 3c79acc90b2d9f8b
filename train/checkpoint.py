"""Atomic, complete checkpoints and the code that finds, loads and prunes them.

Layout of one checkpoint (a directory under <run.dir>/checkpoints/):

    step_00000120/
      ds/state/...            DeepSpeed engine: module, optimizer + ZeRO partitions, LR scheduler
      ds/universal_*/         (made on demand) DeepSpeed universal checkpoint for a world-size change
      rank_00000.pt ...       per rank: stream-loader state, MemoryState, RNG states
      meta.json               step, tokens, world size, ZeRO stage, MLflow run id, resolved config,
                              tokenizer and manifest hashes, model args
      COMPLETE                written last: a checkpoint without it does not exist
    latest                    name of the newest complete checkpoint (atomic rename)

Commit protocol: every rank writes into ``.tmp-step_XXXXXXXX``; after a
barrier rank 0 fsyncs every file, writes COMPLETE, renames the directory into
place, fsyncs the parent and only then replaces ``latest``. A crash at any
moment leaves either the previous checkpoint as newest or the new one
complete; leftovers are removed (with a warning naming them) on the next start.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnemo.train.errors import UserError
from mnemo.train.redact import redact_tree

log = logging.getLogger("mnemo.checkpoint")

STEP_RE = re.compile(r"^step_(\d{8})$")
COMPLETE = "COMPLETE"
DS_TAG = "state"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file() and (path / "meta.json").is_file()


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def _maybe_crash_in_save(step: int, rank: int) -> None:
    """Fault injection for tests: MNEMO_FAULT_CRASH_IN_SAVE=STEP:RANK kills that rank mid-save."""
    spec = os.environ.get("MNEMO_FAULT_CRASH_IN_SAVE")
    if spec and spec == f"{step}:{rank}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointManager:
    def __init__(self, run_dir: str | Path, *, keep: int = 2, keep_every: int = 0, rank: int = 0,
                 world_size: int = 1, barrier=None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.keep_every = keep, keep_every
        self.rank, self.world = rank, world_size
        self._barrier = barrier or (lambda: None)
        self.protected: set[str] = set()  # never deleted: the checkpoint this run resumed from

    # ------------------------------------------------------------------ find
    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        out = [p for p in self.root.iterdir() if STEP_RE.match(p.name) and is_complete(p)]
        return sorted(out, key=lambda p: int(STEP_RE.match(p.name).group(1)))

    def partial_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and (p.name.startswith(".tmp-") or (STEP_RE.match(p.name) and not is_complete(p))))

    def latest(self) -> Path | None:
        """Newest complete checkpoint (``latest`` if it names a complete one)."""
        marker = self.root / "latest"
        if marker.is_file():
            p = self.root / marker.read_text().strip()
            if is_complete(p):
                newer = [c for c in self.complete_checkpoints() if c.name > p.name]
                return newer[-1] if newer else p
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def clean_partials(self) -> list[Path]:
        """Rank 0: delete leftovers of interrupted saves, warning with their names."""
        removed = []
        if self.rank == 0:
            for p in self.partial_checkpoints():
                log.warning("removing incomplete checkpoint %s (interrupted save)", p)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    # ------------------------------------------------------------------ save
    def save(self, step: int, engine, rank_state: dict[str, Any], meta: dict[str, Any],
             extra_files: dict[str, str] | None = None) -> Path:
        name = f"step_{step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self._barrier()
        engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=True)
        rank_file = tmp / f"rank_{self.rank:05d}.pt"
        with open(rank_file, "wb") as f:
            torch.save(rank_state, f)
            f.flush()
            os.fsync(f.fileno())
        _maybe_crash_in_save(step, self.rank)
        self._barrier()
        if self.rank == 0:
            # Credentials in URIs (tracking.uri in the config) are never saved.
            (tmp / "meta.json").write_text(json.dumps(redact_tree(meta), indent=1, default=str))
            for fname, src in (extra_files or {}).items():
                shutil.copyfile(src, tmp / fname)
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text(f"{time.time()}\n")
            _fsync_path(tmp / COMPLETE)
            if final.exists():  # a stale copy of the same step from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_path(self.root)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        done = self.complete_checkpoints()
        keep = {p.name for p in done[-self.keep:]} | self.protected
        if self.keep_every:
            keep |= {p.name for p in done if int(STEP_RE.match(p.name).group(1)) % self.keep_every == 0}
        for p in done:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def rank_states(self, path: Path) -> list[dict[str, Any]]:
        files = sorted(Path(path).glob("rank_*.pt"))
        return [torch.load(f, map_location="cpu", weights_only=False) for f in files]

    def rank_state(self, path: Path, rank: int) -> dict[str, Any]:
        return torch.load(Path(path) / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)


# ------------------------------------------------------------------ consolidated weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step dir, a run dir (its latest checkpoint), or an export dir."""
    p = Path(path)
    if (p / "model.safetensors").is_file() or is_complete(p):
        return p
    mgr = CheckpointManager(p)
    if not mgr.root.is_dir():
        mgr.root = p  # a checkpoints/ directory itself
    latest = mgr.latest()
    if latest is None:
        raise UserError(f"{path}: not a mnemo checkpoint, run directory or export directory")
    return latest


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint (any ZeRO stage) or an export dir, on CPU."""
    ckpt = Path(ckpt)
    if (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(ckpt / "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "ds"), tag=DS_TAG)
    return {k: v.float().contiguous() for k, v in sd.items()}


def model_args_of(ckpt: Path):
    from mnemo.model import ModelArgs

    ckpt = Path(ckpt)
    if (ckpt / "model_args.json").is_file():
        d = json.loads((ckpt / "model_args.json").read_text())
    else:
        d = read_meta(ckpt)["model_args"]
    d["ltm_layers"] = tuple(d["ltm_layers"])
    # Checkpoints written before these options existed hold the gated, unsmeared layer.
    d.setdefault("ltm_mix", "gate")
    d.setdefault("ltm_smear_keys", False)
    return ModelArgs(**d)


def saved_config_tree(tree: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config tree, with what older releases did where they predate a key.

    memory.long.mix and .smear_keys came with release 5; before, every
    long-term layer was gated and unsmeared (the defaults are now joint and
    smeared), so a missing key means the old behaviour, not the new default.
    """
    tree = json.loads(json.dumps(tree))  # a deep copy
    long = tree.setdefault("memory", {}).setdefault("long", {})
    long.setdefault("mix", "gate")
    long.setdefault("smear_keys", False)
    return tree


def config_of(ckpt: Path):
    from mnemo.train.config import from_dict

    ckpt = Path(ckpt)
    if (ckpt / "config.json").is_file():
        return from_dict(saved_config_tree(json.loads((ckpt / "config.json").read_text())))
    return from_dict(saved_config_tree(read_meta(ckpt)["config"]))


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load consolidated weights, tolerating a missing tied LM head."""
    own = model.state_dict()
    if getattr(model, "args", None) is not None and model.args.tie_embeddings and "lm_head.weight" not in sd:
        sd = dict(sd, **{"lm_head.weight": sd["tok_emb.weight"]})
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"{source}: weight {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)


def load_for_inference(path: str | Path, device: str = "cpu"):
    """(model, tokenizer, cfg) from a checkpoint, run dir or export dir, without DeepSpeed engines."""
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.model import MemoryTransformer

    ckpt = resolve_checkpoint(path)
    args = model_args_of(ckpt)
    cfg = config_of(ckpt)
    model = MemoryTransformer(args)
    load_weights(model, consolidated_state_dict(ckpt), str(ckpt))
    model.to(device).eval()
    tok_path = ckpt / "tokenizer.model"
    if not tok_path.is_file():
        raise UserError(f"{ckpt}: tokenizer not found (looked for tokenizer.model)")
    return model, Tokenizer(str(tok_path)), cfg


def export(path: str | Path, out: str | Path) -> Path:
    """Consolidated weights (safetensors) + model args + config + tokenizer, no DeepSpeed needed to load."""
    from safetensors.torch import save_file

    ckpt = resolve_checkpoint(path)
    sd = consolidated_state_dict(ckpt)
    args = model_args_of(ckpt)
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; re-tied on load
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    import dataclasses

    (out / "model_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    meta = read_meta(ckpt) if is_complete(ckpt) else {}
    if meta:
        (out / "config.json").write_text(json.dumps(redact_tree(meta["config"]), indent=1))
        if (ckpt / "tokenizer.model").is_file():
            shutil.copy(ckpt / "tokenizer.model", out / "tokenizer.model")
        (out / "source.json").write_text(json.dumps(
            {"checkpoint": str(ckpt), "step": meta.get("step"), "mlflow_run_id": meta.get("mlflow_run_id")}, indent=1))
    elif (ckpt / "config.json").is_file():
        shutil.copy(ckpt / "config.json", out / "config.json")
        if (ckpt / "tokenizer.model").is_file():
            shutil.copy(ckpt / "tokenizer.model", out / "tokenizer.model")
    return out
