"""Commit protocol, retention and discovery of checkpoints, with a stand-in engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mnemo.train.checkpoint import CheckpointManager, is_complete, resolve_checkpoint
from mnemo.train.errors import UserError


class FakeEngine:
    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def save(mgr, step):
    return mgr.save(step, FakeEngine(), {"step": step}, {"step": step})


def test_save_is_complete_and_latest_points_at_it(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    p = save(mgr, 10)
    assert p.name == "step_00000010" and is_complete(p)
    assert (mgr.root / "latest").read_text().strip() == "step_00000010"
    assert mgr.latest() == p
    assert json.loads((p / "meta.json").read_text())["step"] == 10
    assert mgr.rank_state(p, 0)["step"] == 10
    assert resolve_checkpoint(tmp_path) == p


def test_partial_checkpoints_are_ignored_and_cleaned(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=3)
    good = save(mgr, 10)
    (mgr.root / ".tmp-step_00000020" / "ds").mkdir(parents=True)  # crashed mid-save
    (mgr.root / "step_00000030").mkdir()  # renamed but no COMPLETE (cannot happen with our protocol, but be safe)
    assert mgr.latest() == good
    removed = mgr.clean_partials()
    assert {p.name for p in removed} == {".tmp-step_00000020", "step_00000030"}
    assert "removing incomplete checkpoint" in caplog.text
    assert sorted(p.name for p in mgr.root.iterdir()) == ["latest", "step_00000010"]


def test_latest_marker_naming_a_missing_checkpoint_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = save(mgr, 5)
    (mgr.root / "latest").write_text("step_00000099\n")
    assert mgr.latest() == good


def test_retention_keeps_newest_k_multiples_and_the_resumed_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2, keep_every=30)
    mgr.protected.add("step_00000010")
    for s in range(10, 90, 10):
        save(mgr, s)
    kept = sorted(p.name for p in mgr.complete_checkpoints())
    assert kept == ["step_00000010", "step_00000030", "step_00000060", "step_00000070", "step_00000080"]


def test_resolve_rejects_non_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not a mnemo checkpoint"):
        resolve_checkpoint(tmp_path)
