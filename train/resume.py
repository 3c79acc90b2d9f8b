"""Whether a checkpoint may be resumed under this run's config, tokenizer and data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnemo.train.checkpoint import saved_config_tree
from mnemo.train.config import Config, flatten, to_dict
from mnemo.train.errors import UserError
from mnemo.train.redact import redact_tree

# Config keys whose change makes a resume unsafe (model shapes, data order).
UNSAFE_KEYS = (
    "model.size",
    "model.mlp",
    "model.embeddings",
    "model.segment_len",
    "memory.short.length",
    "memory.long.kind",
    "memory.long.capacity",
    "memory.long.layers",
    "memory.long.mix",
    "memory.long.smear_keys",
    "data.val_fraction",
    "train.seed",
)
_LTM_ONLY_KEYS = ("memory.long.mix", "memory.long.smear_keys")


def check_resume_compatible(
    old_cfg: dict[str, Any], cfg: Config, meta: dict[str, Any], tok_sha: str, manifest: dict[str, Any], path: Path
) -> list[str]:
    """The safe config changes since checkpoint ``path`` (UserError on an unsafe one, another tokenizer or dataset)."""
    # Checkpoints hold the config with credentials redacted (tracking.uri):
    # compare, and report changes, in that form on both sides, so a password
    # is neither a "change" nor printed.
    old, new = flatten(redact_tree(saved_config_tree(old_cfg))), flatten(redact_tree(to_dict(cfg)))
    for key in UNSAFE_KEYS:
        if key in _LTM_ONLY_KEYS and old.get("memory.long.kind") == new.get("memory.long.kind") == "none":
            continue  # how a long-term layer works does not matter to a model that has none
        if old.get(key) != new.get(key):
            raise UserError(
                f"{key}: changed from {old.get(key)!r} to {new.get(key)!r} since checkpoint {path}; "
                "resuming would be unsafe (use checkpoint.resume=never or a new run.dir)"
            )
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != tok_sha:
        raise UserError(f"data.tokenizer: differs from the tokenizer of checkpoint {path} (sha256 mismatch)")
    if meta.get("num_documents") not in (None, manifest.get("num_documents")):
        raise UserError(
            f"data.path: the dataset changed since checkpoint {path} "
            f"({meta['num_documents']} -> {manifest.get('num_documents')} documents)"
        )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
