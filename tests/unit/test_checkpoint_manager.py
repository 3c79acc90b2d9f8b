"""Commit protocol, retention and discovery of checkpoints, with a stand-in engine."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
import types
from pathlib import Path

import pytest
import torch

from mnemo.train.checkpoint import CheckpointManager, is_complete, resolve_checkpoint
from mnemo.train.errors import UserError
from tests.unit.launch_workspace import stub_tokenizer_bytes


class FakeEngine:
    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def save(mgr, step, **meta):
    """A checkpoint of ``step`` whose meta.json holds what a resume reads (RESUME_META_KEYS): the default
    config, which a resume in check_paths compares with the run's), and ``meta``."""
    from mnemo.train.config import load_config, to_dict

    meta = {"step": step, "world_size": 1, "zero_stage": 2, "config": to_dict(load_config(None, [])), **meta}
    return mgr.save(step, FakeEngine(), {"step": step}, meta)


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
    (mgr.root / ".tmp-step_00000020" / "rank_00001.pt").write_bytes(b"x")
    (mgr.root / "step_00000030").mkdir()  # no COMPLETE: not mnemo's (its saves are renamed complete)
    (mgr.root / ".tmp-step_00000040").mkdir()  # a user's folder under a save's name, with a file no save writes
    (mgr.root / ".tmp-step_00000040" / "weights.bin").write_bytes(b"mine")
    (mgr.root / ".tmp-notes").mkdir()
    (mgr.root / "step_00000050\n").mkdir()  # "$" matched before a final newline: not a checkpoint's name
    (mgr.root / "step_00000050\n" / "COMPLETE").write_text("x")
    (mgr.root / "step_00000050\n" / "meta.json").write_text("{}")
    assert mgr.latest() == good
    removed = mgr.clean_partials()
    assert {p.name for p in removed} == {".tmp-step_00000020"}
    assert "removing incomplete checkpoint" in caplog.text
    names = sorted(p.name for p in mgr.root.iterdir())
    assert names == [".tmp-notes", ".tmp-step_00000040", "latest", "step_00000010", "step_00000030", "step_00000050\n"]
    assert (mgr.root / ".tmp-step_00000040" / "weights.bin").read_bytes() == b"mine"


def test_latest_marker_naming_a_missing_checkpoint_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = save(mgr, 5)
    (mgr.root / "latest").write_text("step_00000099\n")
    assert mgr.latest() == good


@pytest.mark.parametrize(
    "marker",
    [b"\xff\xfe not utf-8\n", b"ABSOLUTE", b"../../elsewhere/checkpoints/step_00000099\n", b"step_00000099\n"],
)
def test_latest_is_never_followed_out_of_the_folder_nor_decoded(tmp_path, marker):
    """checkpoints/latest that was not UTF-8 was a UnicodeDecodeError traceback (eval, export, init_from,
    resume); one holding a path (absolute, or ../..) to a complete checkpoint elsewhere made export, eval,
    resume=auto and init_from use that one. Now the newest complete checkpoint of the folder by name is
    used, whatever `latest` holds."""
    from mnemo.train.rundir import check_run_dir, find_checkpoint

    elsewhere = save(CheckpointManager(tmp_path / "elsewhere"), 99)
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    save(mgr, 4)
    good = save(mgr, 8)
    (mgr.root / "step_00000099").mkdir()  # not complete: named like one, never taken
    marker = str(elsewhere).encode() if marker == b"ABSOLUTE" else marker
    (mgr.root / "latest").write_bytes(marker)
    assert mgr.latest() == good
    assert find_checkpoint(run) == find_checkpoint(mgr.root) == good
    assert resolve_checkpoint(run) == good
    (mgr.root / "step_00000099").rmdir()  # (a run refuses to start beside it)
    assert check_run_dir(run, "auto")[0] == good  # what resume=auto resumes from
    _check(_cfg(tmp_path, run))


def test_retention_keeps_newest_k_multiples_and_the_resumed_one(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2, keep_every=30)
    mgr.protected.add("step_00000010")
    for s in range(10, 90, 10):
        save(mgr, s)
    kept = sorted(p.name for p in mgr.complete_checkpoints())
    assert kept == ["step_00000010", "step_00000030", "step_00000060", "step_00000070", "step_00000080"]


@pytest.mark.parametrize("holding", [None, "notes.txt"])
def test_a_folder_at_latest_does_not_stop_saves_and_is_left_alone(tmp_path, caplog, holding):
    """A folder named checkpoints/latest (empty or not) made every save an IsADirectoryError traceback
    (the rename over it), though the docs promise that whatever latest holds cannot stop a run. Now the
    saves go on, the folder is left as it is (not provably mnemo's), with one warning naming it."""
    mgr = CheckpointManager(tmp_path, keep=2)
    latest = mgr.root / "latest"
    latest.mkdir(parents=True)
    if holding:
        (latest / holding).write_text("mine")
    for step in (2, 4, 6):
        assert is_complete(save(mgr, step))
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_00000004", "step_00000006"]
    assert sorted(os.listdir(latest)) == ([holding] if holding else [])
    assert caplog.text.count(f"{latest} is a folder, which mnemo did not write: it is left as it is") == 1


def test_retention_keeps_a_checkpoint_holding_files_mnemo_did_not_write(tmp_path, caplog):
    """Was: shutil.rmtree of the whole folder, an eval.json that `mnemo eval CKPT --json CKPT/eval.json`
    put there with it. Now such a checkpoint is kept, with one warning naming the file."""
    mgr = CheckpointManager(tmp_path, keep=1)
    old = save(mgr, 10)
    (old / "eval.json").write_text("{}")
    save(mgr, 20)
    save(mgr, 30)
    assert (old / "eval.json").read_text() == "{}" and is_complete(old)
    assert sorted(p.name for p in mgr.complete_checkpoints()) == ["step_00000010", "step_00000030"]
    assert caplog.text.count(f"retention: keeping {old}: it holds eval.json, which mnemo did not write") == 1


class FullEngine(FakeEngine):
    """Writes into ds/ every name DeepSpeed (ZeRO 1/2/3, fp32 and bf16) and mnemo's universal conversion do."""

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        super().save_checkpoint(save_dir, tag, save_latest)
        ds = Path(save_dir)
        # .latest_universal.tmpPID: the conversion's atomic write of latest_universal, killed before its rename.
        for name in ("latest", "zero_to_fp32.py", "zero_to_torch.py", "latest_universal", ".latest_universal.tmp4242"):
            (ds / name).write_text("x")
        for name in (
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt",
            "zero_pp_rank_3_mp_rank_00_model_states.pt",
        ):
            (ds / tag / name).write_bytes(b"w")
        for name in ("universal_state/zero/w", ".tmp-universal_state/zero/w"):
            (ds / name).mkdir(parents=True)


@pytest.mark.parametrize(
    "theirs",
    ["ds/pytorch_model.bin", "ds/fp32", "ds/state/notes.txt", "ds/state/mp_rank_00_model_states.pt.bak", "ds"],
)
def test_retention_and_start_keep_a_checkpoint_holding_user_files_inside_ds(tmp_path, caplog, theirs):
    """Was: only a checkpoint's top-level names were checked, so retention (and the start's removal of an
    interrupted .tmp-step_*) deleted what a user wrote inside ds/, e.g. the output of DeepSpeed's
    zero_to_fp32.py run there, without a word. Inside ds/ only what DeepSpeed and mnemo write is theirs:
    a checkpoint holding anything else (or a ds/ linked elsewhere) is kept, with one warning naming it."""
    mgr = CheckpointManager(tmp_path, keep=1)
    meta = {"step": 1, "world_size": 1, "zero_stage": 2, "config": {}}
    mine = mgr.save(1, FullEngine(), {}, meta)
    old = mgr.save(10, FullEngine(), {}, meta)
    assert not mine.exists()  # all of DeepSpeed's and mnemo's names: deleted
    where = old / theirs
    if theirs == "ds/fp32":
        where.mkdir()
        (where / "NOTES.txt").write_text("n")
    elif theirs == "ds":
        (old / "ds").rename(tmp_path / "elsewhere")
        where.symlink_to(tmp_path / "elsewhere")
    else:
        where.write_text("mine")
    tmp = mgr.root / ".tmp-step_00000015"  # an interrupted save holding it
    if theirs == "ds":
        tmp.mkdir()
        (tmp / "ds").symlink_to(tmp_path / "elsewhere")
    else:
        (tmp / "ds" / "state").mkdir(parents=True)
        (tmp / theirs).write_text("mine")
    assert CheckpointManager(tmp_path, keep=1).clean_partials() == [] and tmp.is_dir()
    mgr.save(20, FullEngine(), {}, meta)
    mgr.save(30, FullEngine(), {}, meta)
    assert is_complete(old) and os.path.lexists(where)
    assert sorted(p.name for p in mgr.complete_checkpoints()) == ["step_00000010", "step_00000030"]
    assert caplog.text.count(f"retention: keeping {old}: it holds {theirs}, which mnemo did not write") == 1


@pytest.mark.parametrize(
    "theirs",
    ["meta.json", "rank_00009.pt", "tokenizer.model", "COMPLETE", "ds/latest", "ds/state/mp_rank_00_model_states.pt"],
)
def test_a_folder_or_link_under_a_name_a_save_writes_as_a_file_is_kept_not_deleted(tmp_path, caplog, theirs):
    """Was: only the names in a save's folder were checked, so a user's FOLDER named like a file a save writes
    (``.tmp-step_*/meta.json/thesis.txt``, ``step_*/rank_00009.pt/notes.txt``, ``.trash-step_*/tokenizer.model/``)
    made the folder mnemo's: the start removed it as an interrupted save, retention deleted it, without a
    word. A save writes these as regular files: a folder (or link) there is kept, with retention's warning."""
    from mnemo.train.rundir import stray_entries

    mgr = CheckpointManager(tmp_path, keep=1)
    meta = {"step": 1, "world_size": 1, "zero_stage": 2, "config": {}}
    old = mgr.save(3, FullEngine(), {}, meta)

    def plant(folder: Path, link: bool = False) -> Path:
        where = folder / theirs
        if where.is_file():
            where.unlink()
        if link:
            (tmp_path / "outside.txt").write_text("only-copy")
            where.symlink_to(tmp_path / "outside.txt")
        else:
            where.mkdir(parents=True)
            (where / "thesis.txt").write_text("only-copy")
        return where

    tmp, trash = mgr.root / ".tmp-step_00000099", mgr.root / ".trash-step_00000098"
    planted = [plant(old)]
    for folder in (tmp, trash):
        (folder / "ds" / "state").mkdir(parents=True)
        (folder / "rank_00000.pt").write_bytes(b"x")
        planted.append(plant(folder))
    linked = mgr.root / ".tmp-step_00000097"
    (linked / "ds" / "state").mkdir(parents=True)
    planted.append(plant(linked, link=True))
    assert all(stray_entries(p) == [theirs] for p in (old, tmp, trash, linked))
    assert CheckpointManager(tmp_path, keep=1).clean_partials() == []
    if theirs not in ("COMPLETE", "meta.json"):  # else no checkpoint (is_complete): never pruned
        mgr.save(6, FullEngine(), {}, meta)
        mgr.save(12, FullEngine(), {}, meta)
        assert caplog.text.count(f"retention: keeping {old}: it holds {theirs}, which mnemo did not write") == 1
    assert all(os.path.lexists(w) for w in planted)
    assert all((w / "thesis.txt").read_text() == "only-copy" for w in planted[:-1])


def test_a_deletion_cut_off_halfway_leaves_a_resumable_run_dir_and_is_cleaned_next_start(tmp_path, monkeypatch, caplog):
    """Was: retention's rmtree(ignore_errors=True) in place; a file that could not be unlinked (an NFS
    .nfsXXXX, an immutable file, a kill mid-delete) left step_* without COMPLETE, and every relaunch was
    refused as "named like a checkpoint but not one mnemo wrote". Now the folder is renamed
    .trash-step_* first: the failure is one warning, the run dir resumes, the next start removes the rest."""
    import errno

    from mnemo.train.rundir import check_run_dir

    mgr = CheckpointManager(tmp_path, keep=1)
    save(mgr, 10)
    unlink = os.unlink

    def stuck(path, *args, **kwargs):  # as chattr +i on one file (shutil.rmtree unlinks by name and dir_fd)
        if os.path.basename(path) == "rank_00000.pt":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", stuck)
    newest = save(mgr, 20)
    monkeypatch.undo()
    assert "could not delete all of" in caplog.text and "Operation not permitted" in caplog.text
    assert sorted(p.name for p in mgr.root.iterdir()) == [".trash-step_00000010", "latest", "step_00000020"]
    assert check_run_dir(tmp_path, "auto")[0] == newest  # resumable
    (mgr.root / ".trash-step_00000005").mkdir()  # a trash name holding a file no save writes: not mnemo's
    (mgr.root / ".trash-step_00000005" / "notes.txt").write_text("mine")
    removed = CheckpointManager(tmp_path, keep=1).clean_partials()  # the next start
    assert [p.name for p in removed] == [".trash-step_00000010"]
    assert "removing the rest of deleted checkpoint" in caplog.text
    assert sorted(p.name for p in mgr.root.iterdir()) == [".trash-step_00000005", "latest", "step_00000020"]


def test_a_step_folder_linked_from_elsewhere_is_not_the_runs_newest_checkpoint(tmp_path, caplog):
    """Was: ``ln -s /elsewhere/step_00000009 run/checkpoints/step_00000009`` made export, eval, generate and
    init_from of the run dir use the folder outside it (rundir.complete_checkpoints took links), while
    `mnemo train` there refused the link as not mnemo's. Now readers skip it too, with a warning naming
    it; named itself, it is still used."""
    from mnemo.train.rundir import check_run_dir, find_checkpoint

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=3)
    own = save(mgr, 3)
    elsewhere = save(CheckpointManager(tmp_path / "other", keep=3), 9)
    link = mgr.root / "step_00000009"
    link.symlink_to(elsewhere)
    for given in (run, mgr.root):
        assert resolve_checkpoint(given) == own and find_checkpoint(given) == own
    assert f"skipping {link}: a symbolic link, not a checkpoint mnemo wrote" in caplog.text
    assert caplog.text.count(f"skipping {link}") == 1  # said once, however often a command looks
    assert resolve_checkpoint(link) == link  # named explicitly: used
    assert mgr.complete_checkpoints() == [own]
    with pytest.raises(ValueError, match="holds step_00000009, named like a checkpoint but not one mnemo wrote"):
        check_run_dir(run, "auto")  # what train says of it: unchanged
    own.rename(tmp_path / "moved")
    with pytest.raises(UserError, match="not a mnemo checkpoint"):
        resolve_checkpoint(run)


def test_resolve_rejects_non_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not a mnemo checkpoint"):
        resolve_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- a rank's Stateful parts


class StandInStreams:
    """Stateful like DocumentStreams: one state per rank; a list of every old rank's state re-partitions."""

    def __init__(self, slots: int = 2):
        self.slots, self.loaded = slots, None

    def state_dict(self):
        return {"slots": self.slots, "pos": [7] * self.slots}

    def same_shape(self, sd):
        return sd["slots"] == self.slots

    def load_state_dict(self, sd):
        self.loaded = sd
        return not isinstance(sd, list)  # exact only from this rank's own state


class StandInEpisodes:
    def __init__(self):
        self.loaded = None

    def state_dict(self):
        return {"curriculum": {"current": 3}}

    def load_state_dict(self, sd, own_rank=True):
        self.loaded = (sd, own_rank)


def rank_parts(episodes: bool = True):
    """The trainer's parts of one rank (train/trainer.py Trainer.setup) with stand-in streams and episodes."""
    import torch

    from mnemo.model import MemoryTransformer, ModelArgs
    from mnemo.train.state import Counters, MemoryPart, RNGState

    args = ModelArgs(
        vocab_size=16,
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_ff=32,
        stm_length=4,
        ltm_kind="knn",
        ltm_capacity=8,
        ltm_topk=4,
    )
    memory = MemoryPart(MemoryTransformer(args).init_state(2), torch.device("cpu"))
    parts = {"streams": StandInStreams(), "memory": memory, "rng": RNGState(), "counters": Counters()}
    if episodes:
        parts["episodes"] = StandInEpisodes()
    return parts


def old_rank_file(step: int, tokens_seen: int, memory_fill: float):
    """A rank file as the trainer wrote it before its state was kept in Stateful parts (keys written by hand)."""
    from mnemo.train.state import rng_state

    parts = rank_parts()
    st = parts["memory"].state
    sd = {k: v.fill_(memory_fill) if v.is_floating_point() else v for k, v in st.state_dict().items()}
    return {
        "streams": {"slots": 2, "pos": [step] * 2},
        "memory": sd,
        "rng": rng_state("cpu"),
        "step": step,
        "tokens_seen": tokens_seen,
        "episodes": {"curriculum": {"current": step}},
    }


def write_old_checkpoint(mgr, step: int, world_size: int) -> Path:
    """A checkpoint of ``world_size`` ranks, rank files holding today's keys, written the old way (torch.save)."""
    import torch

    p = save(mgr, step, world_size=world_size)
    for r in range(world_size):
        torch.save(old_rank_file(step, 1000 * step, float(r + 1)), p / f"rank_{r:05d}.pt")
    return p


def test_rank_file_of_the_parts_has_exactly_the_keys_of_a_rank_file(tmp_path):
    from mnemo.train.checkpoint import rank_file_of

    for episodes in (True, False):
        f = rank_file_of(rank_parts(episodes=episodes))
        keys = ["streams", "memory", "rng", "step", "tokens_seen"] + (["episodes"] if episodes else [])
        assert list(f) == keys
    mgr = CheckpointManager(tmp_path, states=rank_parts())
    mgr.states["counters"].step, mgr.states["counters"].tokens_seen = 4, 400
    p = mgr.save(4, FakeEngine(), None, {"step": 4})
    saved = mgr.rank_state(p, 0)
    assert sorted(saved) == sorted(old_rank_file(4, 400, 0.0)) and (saved["step"], saved["tokens_seen"]) == (4, 400)


def _real_stream_parts():
    from mnemo.data_pipeline.streams import ArraySource
    from tests.unit.test_streams import make_docs, streams

    parts = rank_parts(episodes=False)
    parts["streams"] = streams(ArraySource(make_docs(20)), B=2, T=8)
    return parts


def _slot0(d, **edit):
    d["streams"]["slots"][0].update(edit)


def _memory(d, key, value):
    d["memory"][key] = value


@pytest.mark.parametrize(
    "edit,needle",
    [
        (
            lambda d: _slot0(d, doc=10**12),
            r"streams\.slots\[0\]\.doc: 1000000000000 is not a whole number from -1 to 19",
        ),
        (lambda d: _slot0(d, offset=-5), r"streams\.slots\[0\]\.offset: -5 is not a whole number from 0"),
        (lambda d: _slot0(d, doc="3"), r"streams\.slots\[0\]\.doc: '3' is not a whole number"),
        (lambda d: d.update(streams={"version": 99}), r"streams: stream state version 99 is not 1"),
        (
            lambda d: _memory(d, "layers.0.stm_k", torch.zeros(2, 2, 3, 8)),
            r"memory\.layers\.0\.stm_k: shape \(2, 2, 3, 8\) does not match \(2, 2, 4, 8\)",
        ),
        (lambda d: _memory(d, "stm_len", torch.tensor([-3, 4])), r"memory\.stm_len: -3 \(slot 0\) is outside 0 to 4"),
        (
            lambda d: _memory(d, "stm_len", torch.tensor([1, 10**9])),
            r"memory\.stm_len: 1000000000 \(slot 1\) is outside",
        ),
        (lambda d: _memory(d, "pos", torch.tensor([-100, 0])), r"memory\.pos: -100 \(slot 0\) is below 0"),
        (
            lambda d: _memory(d, "ltm_len", torch.tensor([0.5, 1.0])),
            r"memory\.ltm_len: torch\.float32 \(2,\), not whole",
        ),
        (lambda d: d.update(memory={}), r"memory\.stm_len: missing"),
        (lambda d: d.pop("memory"), r"memory: no 'memory' entry"),
        (lambda d: d["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), r"rng\.torch: 3 bytes, not \d+"),
        (lambda d: d["rng"].update(numpy=("MT19937", [1, 2])), r"rng\.numpy: not a state of its generator"),
        (lambda d: d["rng"].update(python=(3, (1, 2))), r"rng\.python: not a state of its generator"),
        (lambda d: d.pop("rng"), r"rng: no 'rng' entry"),
    ],
)
def test_a_damaged_or_crafted_rank_file_is_one_line_naming_the_field(tmp_path, edit, needle):
    """A rank file whose entries were damaged or crafted was a traceback (IndexError for a document past
    the dataset, ValueError from the memory's shape check, RuntimeError for a torch RNG state of 3 bytes,
    KeyError for a missing part or key) or was accepted silently (a negative or too large fill of the
    short-term store, a negative position or slot offset: read as an index). Each part's load checks
    what it takes; the error is one line: checkpoint CKPT: rank_00000.pt: FIELD: what is wrong."""
    import random

    meta = {"step": 4, "tokens_seen": 0, "world_size": 1}
    mgr = CheckpointManager(tmp_path, states=_real_stream_parts())
    next(mgr.states["streams"])
    mgr.states["counters"].step = 4  # what meta.json records
    p = mgr.save(4, FakeEngine(), None, meta)
    d = torch.load(p / "rank_00000.pt", weights_only=False)
    edit(d)
    torch.save(d, p / "rank_00000.pt")
    random.seed(99)  # not the saved state: a refused RNG state sets none of the generators
    state = random.getstate()
    with pytest.raises(UserError, match=rf"^checkpoint {p}: rank_00000\.pt: {needle}"):
        CheckpointManager(tmp_path, states=_real_stream_parts()).restore(p, meta)
    assert random.getstate() == state
    assert CheckpointManager(tmp_path, states=_real_stream_parts()).restore(mgr.save(6, FakeEngine(), None, meta), meta)


def test_a_rank_file_written_before_stateful_parts_resumes_into_them(tmp_path):
    """Same world size: every part gets this rank's entry (RNG restored, memory exactly the saved one)."""
    import random

    import torch

    mgr = CheckpointManager(tmp_path)
    p = write_old_checkpoint(mgr, 20, world_size=1)
    old = mgr.rank_state(p, 0)
    expected_draw = (random.setstate(old["rng"]["python"]), random.random())[1]
    random.seed(12345)  # a different RNG state, which the restore must replace
    parts = rank_parts()
    mgr.states = parts
    assert mgr.restore(p, {"step": 20, "tokens_seen": 20000, "world_size": 1}) is True
    assert parts["streams"].loaded == old["streams"]
    assert all(torch.equal(a, b) for a, b in zip(parts["memory"].state_dict().values(), old["memory"].values()))
    assert random.random() == expected_draw
    assert (parts["counters"].step, parts["counters"].tokens_seen) == (20, 20000)
    assert parts["episodes"].loaded == (old["episodes"], True)


def test_after_a_world_size_change_streams_are_repartitioned_and_memory_and_rng_start_fresh(tmp_path):
    import torch

    p = write_old_checkpoint(CheckpointManager(tmp_path), 30, world_size=2)
    mgr = CheckpointManager(tmp_path, rank=2, world_size=3)  # rank 2 of 3: a rank the checkpoint has no file of
    parts = rank_parts()
    fresh = {k: v.clone() for k, v in parts["memory"].state_dict().items()}
    rng_before = torch.get_rng_state()
    mgr.states = parts
    assert mgr.restore(p, {"step": 30, "tokens_seen": 30000, "world_size": 2}) is False
    assert parts["streams"].loaded == [s["streams"] for s in mgr.rank_states(p)]  # both old ranks' states
    assert all(torch.equal(fresh[k], v) for k, v in parts["memory"].state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_before)
    # The curriculum of rank 0 (this rank did not exist): its own document generator starts over.
    assert parts["episodes"].loaded == (mgr.rank_state(p, 0)["episodes"], False)
    assert (parts["counters"].step, parts["counters"].tokens_seen) == (30, 30000)


class RegroupedStreams(StandInStreams):
    """Streams of the same slot groups at another world size: every group resumes exactly from the old states."""

    def load_state_dict(self, sd):
        self.loaded = sd
        return True


def peak_memory_mb() -> int:
    """This process's peak resident memory (VmHWM) in MB."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_a_new_rank_at_another_world_size_reads_only_its_own_memory_rows(tmp_path):
    """8 old ranks -> 4, the same slot groups: new rank 1 gets old ranks 2 and 3's memory rows (32 MB here).

    Every new rank read every old rank's whole file and concatenated them all before taking its rows: 8 x
    its share (16 -> 8 GPUs of configs/medium.yaml: ~340 GB a node, and the kernel killed the ranks). The old
    files are mapped now and only this rank's rows are copied: the restore's peak resident memory is about
    twice its share (the mapped pages it read and its copy), below 4 x with room; it was 8 x (measured)."""
    from mnemo.model.memory import LayerMemory, MemoryState
    from mnemo.train.slots import MemoryGroups
    from mnemo.train.state import Counters

    def memory(fill: float) -> MemoryState:  # 2 slots, 16 MB
        stm, n = torch.full((2, 1, 1024, 1024), fill), torch.zeros(2, dtype=torch.long)
        return MemoryState(layers=(LayerMemory(stm_k=stm, stm_v=stm + 0.5),), stm_len=n, ltm_len=n, pos=n + int(fill))

    mgr = CheckpointManager(tmp_path)
    p = save(mgr, 3)
    for r in range(8):
        torch.save({"streams": {"slots": 2}, "memory": memory(float(r)).state_dict()}, p / f"rank_{r:05d}.pt")
    mgr = CheckpointManager(tmp_path, rank=1, world_size=4)
    groups = MemoryGroups([memory(-1.0), memory(-1.0)], "cpu")  # 2 groups (micro-steps) of 2 slots
    mgr.states = {"streams": RegroupedStreams(), "memory": groups, "counters": Counters()}
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    before = peak_memory_mb()
    meta = {"step": 3, "tokens_seen": 0, "world_size": 8, "config": {"train": {"batch_size": 2}}}  # 2 slots a file
    assert mgr.restore(p, meta) is True
    grown = peak_memory_mb() - before
    assert groups.states[0].equal(memory(2.0)) and groups.states[1].equal(memory(3.0))
    print(f"restore of 32 MB of memory rows from 128 MB of rank files: peak resident memory +{grown} MB")
    assert grown < 4 * 32


# ----------------------------------------------------------------------------- what a run may write over


def _cfg(tmp_path, run_dir, **over):
    """A valid config on a stub data dir (check_paths needs index.json, manifest.json and a tokenizer)."""
    from mnemo.train.config import load_config
    from tests.unit.launch_workspace import stub_data_dir

    data = tmp_path / "data"
    if not data.exists():
        stub_data_dir(data)
    args = [f"data.path={data}", f"run.dir={run_dir}", *(f"{k}={v}" for k, v in over.items())]
    return load_config(None, args)


def _check(cfg):
    from mnemo.train.config import check_paths

    check_paths(cfg)


def test_a_new_run_refuses_a_run_dir_with_another_runs_checkpoints(tmp_path):
    """resume=never beside an earlier run's step_635: the new run's saves (steps 10, 20) were deleted by
    retention as they were made (keep=1 kept the newest by step, 635), and resume=auto would then go on
    with the old run. Now the start refuses, naming the checkpoint; nothing is deleted."""
    from mnemo.train.config import ConfigError

    run = tmp_path / "run"
    old = CheckpointManager(run, keep=1)
    save(old, 635)
    with pytest.raises(ConfigError, match=r"run.dir: .*checkpoints of another run \(step_00000635\)"):
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": "never"}))
    other = tmp_path / "other"
    src = save(CheckpointManager(other), 5)
    with pytest.raises(ConfigError, match="checkpoints of another run"):  # resumed from another run's checkpoint
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(src)}))
    _check(_cfg(tmp_path, run))  # resume=auto: goes on with step_635
    _check(_cfg(tmp_path, tmp_path / "fresh", **{"checkpoint.resume": str(src)}))  # into a new run.dir
    assert [p.name for p in old.complete_checkpoints()] == ["step_00000635"]


def test_resuming_an_older_checkpoint_of_the_run_refuses_while_newer_ones_exist(tmp_path):
    """Resumed from step_10 beside step_20: step_20 stayed the newest, so retention pruned the resumed
    branch's saves below it and resume=auto went back to the abandoned branch."""
    from mnemo.train.config import ConfigError

    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep=3)
    first, _ = save(mgr, 10), save(mgr, 20)
    with pytest.raises(ConfigError, match=r"newer than step_00000010, which this run resumes from \(step_00000020\)"):
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(first)}))
    _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(mgr.latest())}))  # the newest: fine
    _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(run)}))  # the run dir: its newest


def test_a_run_started_from_another_runs_checkpoint_goes_on_from_its_own_after_a_restart(tmp_path):
    """checkpoint.resume=X (another run's) and a SLURM requeue or relaunch of the same command: the run dir
    now holds this run's saves, whose meta.json says they began at X, so the run goes on from the newest
    of them (not from X again, and not refused as another run's)."""
    from mnemo.train.config import ConfigError
    from mnemo.train.rundir import check_run_dir

    src = save(CheckpointManager(tmp_path / "parent"), 5)
    run = tmp_path / "run"
    assert check_run_dir(run, str(src), src) == (src, str(src.resolve()))  # first start: from X
    mgr = CheckpointManager(run)
    newest = save(mgr, 15, origin=str(src.resolve()))
    assert check_run_dir(run, str(src), src) == (newest, str(src.resolve()))  # restart: its own newest
    assert check_run_dir(run, "auto") == (newest, str(src.resolve()))  # origin inherited
    _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(src)}))
    other = save(CheckpointManager(tmp_path / "other"), 7)
    with pytest.raises(ConfigError, match="checkpoints of another run"):  # not where this run began
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(other)}))
    with pytest.raises(ConfigError, match=r"and this run starts fresh: .*checkpoint.resume=auto to go on"):
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": "never"}))


def test_a_run_dir_with_folders_named_like_checkpoints_is_refused_and_kept(tmp_path):
    """A user's checkpoints/step_00000001 (no COMPLETE) was removed with its files at the next start as
    an 'incomplete checkpoint'. Now the start refuses to run there and leaves it."""
    from mnemo.train.config import ConfigError

    run = tmp_path / "proj"
    mine = run / "checkpoints" / "step_00000001"
    mine.mkdir(parents=True)
    (mine / "weights.bin").write_text("data")
    with pytest.raises(ConfigError, match=r"holds step_00000001, named like a checkpoint but not one mnemo wrote"):
        _check(_cfg(tmp_path, run))
    assert (mine / "weights.bin").read_text() == "data"


def test_config_yaml_mnemo_did_not_write_is_refused(tmp_path):
    """run.dir/config.yaml was replaced by the resolved config without a look (run.dir=. in a project
    with its own config.yaml lost it). Now only a config.yaml mnemo wrote is replaced."""
    from mnemo.train.config import CONFIG_HEADER, ConfigError, to_yaml
    from mnemo.train.config import wrote_run_config as wrote_config

    run = tmp_path / "proj"
    run.mkdir()
    (run / "config.yaml").write_text("my: precious config\n")
    with pytest.raises(ConfigError, match=r"config.yaml exists and mnemo did not write it"):
        _check(_cfg(tmp_path, run))
    assert (run / "config.yaml").read_text() == "my: precious config\n"
    cfg = _cfg(tmp_path, run)
    (run / "config.yaml").write_text(f"{CONFIG_HEADER}\n{to_yaml(cfg)}")  # what mnemo train writes now
    _check(cfg)
    (run / "config.yaml").write_text(to_yaml(cfg))  # what it wrote before the header: a dump of the whole tree
    assert wrote_config(run / "config.yaml")
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"  # a hand-written config, every section
    (run / "config.yaml").write_text(demo.read_text())
    assert not wrote_config(run / "config.yaml")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["alias bomb", "deep nesting"])
def test_a_run_config_yaml_that_is_an_alias_bomb_or_nested_deep_is_refused_at_once(tmp_path, kind):
    """run.dir/config.yaml was read with plain yaml.safe_load: a 1 KB alias bomb (10 levels of 10 aliases,
    init_from at the top) hung the start in flatten, 5000-deep nesting was a RecursionError traceback. It is
    read as config files are (train/config.py _load_yaml): refused at once, so not mnemo's: one line."""
    from mnemo.train.config import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    if kind == "alias bomb":
        lines = ['init_from: ""', "a0: &a0 {" + ", ".join(f"k{j}: lol" for j in range(10)) + "}"]
        lines += [f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(10)) + "}" for i in range(1, 10)]
        text = "\n".join(lines) + "\n"
    else:
        text = 'init_from: ""\nx: ' + "[" * 5000 + "]" * 5000 + "\n"
    (run / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"config.yaml exists and mnemo did not write it"):
        _check(_cfg(tmp_path, run))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "long line"])
def test_a_run_config_yaml_that_is_not_a_regular_file_is_refused_at_once(tmp_path, kind):
    """run.dir/config.yaml as a FIFO hung `mnemo train` and `mnemo launch --dry-run` (the open waited for a
    writer); a link to /dev/zero was a MemoryError traceback (readline of an endless line). Now a FIFO or a
    device is refused with one line saying what it is, and a regular file is read with a bound."""
    from mnemo.train.config import ConfigError, wrote_run_config

    run = tmp_path / "run"
    run.mkdir()
    conf = run / "config.yaml"
    if kind == "fifo":
        os.mkfifo(conf)
        why = r"a FIFO \(named pipe\), not a regular file"
    elif kind == "dev-zero":
        conf.symlink_to("/dev/zero")
        why = r"a character device, not a regular file"
    else:  # 2 MB without a newline: read no further than the header's length, then refused by its size
        conf.write_bytes(b"x" * (2 << 20))
        why = r"exists and mnemo did not write it"
    assert not wrote_run_config(conf)
    with pytest.raises(ConfigError, match=rf"^run\.dir: .*config\.yaml: {why}" if kind != "long line" else why):
        _check(_cfg(tmp_path, run))


def test_an_older_mnemos_config_dump_is_known_by_the_runs_checkpoints(tmp_path):
    """A run of an older mnemo (its config.yaml a dump without the header, holding fewer keys than
    today's 80%) could not be resumed: 'config.yaml exists and mnemo did not write it'. Such a dump is
    mnemo's when a complete checkpoint of the run recorded that very config."""
    import json

    import yaml

    from mnemo.train.config import wrote_run_config

    run = tmp_path / "old_run"
    run.mkdir()
    # An older version's dump: init_from at the top and its own (fewer) keys.
    old = {
        "run": {"dir": str(run), "name": ""},
        "data": {"path": "d", "val_fraction": 0.05},
        "model": {"size": "debug", "segment_len": 64},
        "train": {"batch_size": 4, "max_steps": 20, "lr": 0.003},
        "init_from": "",
    }
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert not wrote_run_config(run / "config.yaml")  # no checkpoint vouches for it
    ckpt = run / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 10, "config": {**old, "train": {**old["train"], "lr": 1}}}))
    (ckpt / "COMPLETE").write_text("")
    assert not wrote_run_config(run / "config.yaml")  # another config
    (ckpt / "meta.json").write_text(json.dumps({"step": 10, "config": old}))
    assert wrote_run_config(run / "config.yaml")
    (ckpt / "COMPLETE").unlink()
    assert not wrote_run_config(run / "config.yaml")  # an interrupted save vouches for nothing


@pytest.mark.parametrize("name", ["summary.json", "PREEMPTED", "mlflow_run.json"])
def test_summary_or_preempted_mnemo_did_not_write_is_refused(tmp_path, name):
    """run.dir/summary.json (at the end) and PREEMPTED (on a stop request) were written with write_text,
    without a look and through a link. Now a start refuses a file of those names that mnemo did not write,
    as it refuses such a config.yaml; mnemo's own are replaced by an atomic rename (never written through)."""
    from mnemo.train.config import ConfigError
    from mnemo.train.rundir import wrote_run_file

    run = tmp_path / "proj"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("notes\n")
    for theirs in ("my notes\n", "[1, 2]", None):  # None: a link to the victim
        (run / name).unlink(missing_ok=True)
        if theirs is None:
            (run / name).symlink_to(victim)
        else:
            (run / name).write_text(theirs)
        with pytest.raises(ConfigError, match=rf"^run\.dir: {run}/{name} exists and mnemo did not write it \(mnemo"):
            _check(_cfg(tmp_path, run))
    assert victim.read_text() == "notes\n"
    (run / name).unlink()
    mine = '{"step": 5, "exit": "completed", "run_id": null, "checkpoint": "c", "run_dir": "r"}'
    mine = {"summary.json": mine, "PREEMPTED": "5\n", "mlflow_run.json": '{"mlflow_run_id": "%s"}' % ("0a" * 16)}
    (run / name).write_text(mine[name])  # what mnemo writes
    assert wrote_run_file(run / name)
    _check(_cfg(tmp_path, run))


def test_only_an_mlflow_run_id_of_mlflows_form_kept_in_the_run_dir_is_read(tmp_path):
    """A start stopped before its first checkpoint keeps its MLflow run id in run.dir/mlflow_run.json for the
    next start to reopen; only a run id of MLflow's form (32 hex digits) that mnemo wrote there is read."""
    from mnemo.train.rundir import forget_mlflow_run_id, keep_mlflow_run_id, kept_mlflow_run_id

    assert kept_mlflow_run_id(tmp_path) is None
    keep_mlflow_run_id(tmp_path, "0123456789abcdef" * 2)
    assert kept_mlflow_run_id(tmp_path) == "0123456789abcdef" * 2
    forget_mlflow_run_id(tmp_path, "f" * 32)  # a checkpoint holding another run: the kept one stays
    forget_mlflow_run_id(tmp_path, None)
    assert kept_mlflow_run_id(tmp_path) == "0123456789abcdef" * 2
    forget_mlflow_run_id(tmp_path, "0123456789abcdef" * 2)
    assert not (tmp_path / "mlflow_run.json").exists()
    for bad in ("../../other", "0123456789ABCDEF" * 2, "0" * 31, 7):
        (tmp_path / "mlflow_run.json").write_text(json.dumps({"mlflow_run_id": bad}))
        assert kept_mlflow_run_id(tmp_path) is None
        forget_mlflow_run_id(tmp_path, bad)  # not mnemo's: left where it is
        assert (tmp_path / "mlflow_run.json").exists()


def test_run_dir_that_is_a_file_is_refused_before_start(tmp_path):
    from mnemo.train.config import ConfigError

    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"run.dir: .*afile is not a directory"):
        _check(_cfg(tmp_path, f))


def test_run_dir_that_is_a_loop_of_links_is_refused_before_start_naming_the_loop(tmp_path):
    """pathlib's exists() says False for a loop of links: it passed the checks, and the run stopped after
    the ranks' start-up with 'cannot lock a/run.lock: File exists'. The lock (taken by rank 0, and by the
    launcher's early check) says the same."""
    from mnemo.train.config import ConfigError
    from mnemo.train.errors import UserError
    from mnemo.train.runlock import RunLock, check_run_dir_free

    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ConfigError, match=rf"^run\.dir: {a}: Too many levels of symbolic links$"):
        _check(_cfg(tmp_path, a))
    for take in (check_run_dir_free, lambda d: RunLock(d).acquire()):
        with pytest.raises(UserError, match=rf"^run\.dir: {a}: Too many levels of symbolic links$"):
            take(a)
    missing = tmp_path / "gone"
    missing.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=rf"^run\.dir: {missing} is a symbolic link to a missing path$"):
        _check(_cfg(tmp_path, missing))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_symlink()) == ["a", "b", "gone"]


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused_before_start(tmp_path):
    from mnemo.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint.resume: .* is not a mnemo checkpoint"):
        _check(_cfg(tmp_path, tmp_path / "run", **{"checkpoint.resume": str(tmp_path / "data")}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["rank_00000.pt", "ds/state/mp_rank_00_model_states.pt"])
def test_a_fifo_in_a_checkpoint_is_refused_not_waited_on(tmp_path, name):
    """A FIFO in place of rank_00000.pt hung the resume forever (torch.load opened it and waited for a
    writer), as did one among DeepSpeed's files. Now the pre-flight, the rank file's load and the
    consolidation of export/eval refuse it in one line naming it, without opening it."""
    from mnemo.train.checkpoint import consolidated_state_dict

    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    p = save(mgr, 4)
    (p / name).unlink()
    os.mkfifo(p / name)
    why = rf"{p / name}: a FIFO \(named pipe\), not a regular file"
    with pytest.raises(UserError, match=rf"^checkpoint {p}: {why}$"):
        _check(_cfg(tmp_path, run))
    with pytest.raises(UserError, match=rf"^checkpoint {p}: {why}$"):
        consolidated_state_dict(p)
    if name.startswith("rank_"):
        with pytest.raises(UserError, match=rf"^{p / name}: cannot read \(a FIFO \(named pipe\), not a regular"):
            mgr.rank_state(p, 0)


@pytest.mark.timeout(60)
def test_a_fifo_under_a_linked_ds_folder_is_refused_not_waited_on(tmp_path):
    """A checkpoint whose ds/ was a link to a folder elsewhere hid a FIFO there from the check (os.walk
    did not follow the link): eval, export and resume then hung forever in its open. Links to folders
    are now followed (each folder once: a link back to an ancestor does not loop the walk)."""
    from mnemo.train.checkpoint import DS_TAG, consolidated_state_dict

    run = tmp_path / "run"
    p = save(CheckpointManager(run), 4)
    elsewhere = tmp_path / "fake_ds"
    (p / "ds").rename(elsewhere)
    (p / "ds").symlink_to(elsewhere)
    (elsewhere / "up").symlink_to("..")  # an ancestor (the checkpoint's parent): walked once, not forever
    fifo = elsewhere / DS_TAG / "mp_rank_00_model_states.pt"
    fifo.unlink()
    os.mkfifo(fifo)
    shown = p / "ds" / DS_TAG / "mp_rank_00_model_states.pt"
    why = rf"{shown}: a FIFO \(named pipe\), not a regular file"
    with pytest.raises(UserError, match=rf"^checkpoint {p}: {why}$"):
        _check(_cfg(tmp_path, run))
    with pytest.raises(UserError, match=rf"^checkpoint {p}: {why}$"):
        consolidated_state_dict(p)


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.pop("config"), r"no 'config' entry \(not a checkpoint's meta.json, or edited\)"),
        (lambda m: m.clear(), r"no 'step' entry"),
        (lambda m: m.update(step="12"), r"step is '12', not a whole number >= 0"),
        (lambda m: m.update(world_size=1.5), r"world_size is 1.5, not a whole number >= 1"),
        (lambda m: m.update(zero_stage=None), r"zero_stage is None, not a whole number from 0 to 3"),
        (lambda m: m.update(config=[]), r"config is \[\], not a JSON object"),
        (lambda m: m.update(config={"train": {"batch_size": "4"}}), r"config.train.batch_size is '4', not a whole"),
        (lambda m: m.update(config={"memory": 1}), r"config.memory is 1, not a JSON object"),
        (lambda m: m.update(mlflow_run_id=7), r"mlflow_run_id is 7, not a string or null"),
    ],
)
def test_an_edited_meta_json_is_refused_before_start_in_one_line(tmp_path, edit, needle):
    """A meta.json without `config`, or with a step or world size that is no whole number, was a KeyError or
    TypeError traceback in every rank of the resume (train/trainer.py, CheckpointManager.restore). Now the
    pre-flight refuses it naming the file and the key, and so does every reader (checkpoint.read_meta)."""
    run = tmp_path / "run"
    p = save(CheckpointManager(run), 8)
    meta = json.loads((p / "meta.json").read_text())
    edit(meta)
    (p / "meta.json").write_text(json.dumps(meta))
    where = rf"^{p / 'meta.json'}: "
    with pytest.raises(UserError, match=where + needle):
        _check(_cfg(tmp_path, run))
    from mnemo.train.checkpoint import read_meta
    from mnemo.train.rundir import RESUME_META_KEYS

    with pytest.raises(UserError, match=where + needle):
        read_meta(p, RESUME_META_KEYS)
    (p / "meta.json").write_text("[]")
    with pytest.raises(UserError, match=where + r"not a checkpoint's meta.json \(a JSON object expected, not list\)"):
        _check(_cfg(tmp_path, run))


@pytest.mark.parametrize("kind", ["nested", "huge"])
def test_a_nested_or_huge_newest_meta_json_is_refused_before_start_in_one_line(tmp_path, kind):
    """Was: the start's look for the run's origin (rundir.origin_of) read the newest checkpoint's meta.json
    with an unbounded read_text() and json.loads: one nested 100000 deep was a RecursionError traceback
    (`mnemo train`, `mnemo launch`), a 4 GiB sparse one was read whole. Now it is read as every meta.json is
    (files.load_json: 256 MiB, 100 levels), and the start refuses it in one line naming the file."""
    from mnemo.train.rundir import check_run_dir, origin_of

    run = tmp_path / "run"
    p = save(CheckpointManager(run), 6)
    meta = p / "meta.json"
    if kind == "nested":
        meta.write_text("[" * 100000 + "]" * 100000)
        why = r"not valid JSON \(JSON nested more than 100 levels deep\)"
    else:
        with open(meta, "r+b") as f:
            f.truncate(300 << 20)  # sparse: no disk used; over load_json's 256 MiB (the tester's was 4 GiB)
        why = "cannot read"
    tracemalloc.start()
    try:
        assert origin_of(p) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # not read whole
    assert check_run_dir(run, "auto") == (p, "")
    with pytest.raises(UserError, match=rf"^{meta}: {why}") as e:
        _check(_cfg(tmp_path, run))
    assert "\n" not in str(e.value)


def test_resume_from_an_export_is_refused_before_start_pointing_to_init_from(tmp_path):
    """checkpoint.resume=EXPORT_DIR (model.safetensors, no meta.json) passed the pre-flight and failed in the
    ranks minutes later ('No such file or directory: .../meta.json'), after config.yaml and run.lock were
    written into the new run dir. An export is weights only: init_from starts from it."""
    from mnemo.train.config import ConfigError

    exp = tmp_path / "exported"
    exp.mkdir()
    (exp / "model.safetensors").write_bytes(b"w")
    (exp / "tokenizer.model").write_bytes(stub_tokenizer_bytes())
    run = tmp_path / "run"
    with pytest.raises(
        ConfigError,
        match=rf"^checkpoint.resume: {exp} is an export \(weights only\), not a checkpoint; use init_from={exp}$",
    ):
        _check(_cfg(tmp_path, run, **{"checkpoint.resume": str(exp)}))
    assert not run.exists()
    _check(_cfg(tmp_path, run, init_from=str(exp)))


def test_init_from_and_tokenizer_that_are_not_what_they_name_are_refused_before_start(tmp_path):
    """Both passed `mnemo launch --dry-run` and failed only in the ranks."""
    from mnemo.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"init_from: .* is not a mnemo checkpoint"):
        _check(_cfg(tmp_path, tmp_path / "run", init_from=str(tmp_path / "data")))
    src = _trained_with(tmp_path, "parent", stub_tokenizer_bytes())  # the tokenizer of _cfg's data
    _check(_cfg(tmp_path, tmp_path / "run", init_from=str(src)))
    _check(_cfg(tmp_path, tmp_path / "run", init_from=str(tmp_path / "parent")))  # its newest checkpoint
    bad = tmp_path / "notes.model"
    bad.write_text("not a tokenizer")
    with pytest.raises(ConfigError, match=r"data.tokenizer: .*notes.model: not a SentencePiece model"):
        _check(_cfg(tmp_path, tmp_path / "run", **{"data.tokenizer": str(bad)}))


def test_an_empty_checkpoint_resume_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    """checkpoint.resume= was Path(''), the working directory: from inside a run dir the new run resumed
    from that run's checkpoints. Now it is a one-line error naming the key."""
    from mnemo.train.config import ConfigError

    other = tmp_path / "other"
    save(CheckpointManager(other), 5)
    monkeypatch.chdir(other)
    with pytest.raises(ConfigError, match=r"^checkpoint.resume: empty; use auto, never or a path$"):
        _check(_cfg(tmp_path, tmp_path / "run", **{"checkpoint.resume": ""}))


@pytest.mark.parametrize(
    "key", ["run.dir", "data.path", "data.tokenizer", "data.cache_dir", "init_from", "checkpoint.resume"]
)
def test_a_path_key_starting_with_a_tilde_is_refused_not_made_a_folder_named_tilde(tmp_path, monkeypatch, key):
    """No shell reads a config file: `run.dir: ~/runs/x` made ./~/runs/x and trained there. Every local path
    key starting with ~ or ~user is refused before anything is made, with the expanded path to write."""
    from mnemo.train.config import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value, shown in (("~/x", "'~'"), ("~", "'~'"), ("~some.user-1/x", "'~some.user-1'")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {re.escape(value)} starts with {shown}, which"):
            _check(_cfg(tmp_path, tmp_path / "run", **{key: value}))
    with pytest.raises(ConfigError, match=rf"write the full path, such as {re.escape(str(tmp_path))}/home/x$"):
        _check(_cfg(tmp_path, tmp_path / "run", **{key: "~/x"}))
    assert not (tmp_path / "~").exists()
    if key == "run.dir":  # a ~ inside a path, or a name that only starts with ~-like text, is a plain name
        _check(_cfg(tmp_path, tmp_path / "run" / "~" / "x"))
        _check(_cfg(tmp_path, tmp_path / "run" / "~x~"))


def test_a_sqlite_tracking_uri_starting_with_a_tilde_is_refused(tmp_path, monkeypatch):
    """Before: tracking.uri=sqlite:///~/m.db made a folder named ~ in the working directory (SQLAlchemy and
    MLflow read the path after sqlite:/// as relative). Refused as the path keys are, with the full URI."""
    from mnemo.train.config import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for uri in ("sqlite:///~/m.db", "sqlite+pysqlite:///~/m.db"):
        with pytest.raises(ConfigError, match=rf"^tracking.uri: {re.escape(uri)} starts with '~', which .* such as "):
            _check(_cfg(tmp_path, tmp_path / "run", **{"tracking.enabled": True, "tracking.uri": uri}))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///~/m.db")
    with pytest.raises(ConfigError, match=rf"such as sqlite:///{re.escape(str(tmp_path))}/home/m.db$"):
        _check(_cfg(tmp_path, tmp_path / "run", **{"tracking.enabled": True, "tracking.uri": ""}))
    assert not (tmp_path / "~").exists()
    _check(_cfg(tmp_path, tmp_path / "run", **{"tracking.enabled": True, "tracking.uri": "sqlite:///m~/x.db"}))


def test_the_other_path_keys_mean_their_documented_default_when_empty(tmp_path):
    from mnemo.train.config import ConfigError, load_config

    cfg = _cfg(tmp_path, tmp_path / "run", **{"init_from": "", "data.tokenizer": "", "tracking.uri": ""})
    _check(cfg)  # from scratch, the dataset's tokenizer, the default tracking store
    with pytest.raises(ConfigError, match=r"^override run\.dir: must not be empty$"):
        load_config(None, ["run.dir="])
    with pytest.raises(ConfigError, match=r"^data.path: not set"):
        _check(_cfg(tmp_path, tmp_path / "run", **{"data.path": ""}))
    with pytest.raises(ConfigError, match=r"^override data.sources\[0\].path: not set"):
        load_config(None, ["data.sources=[{path: ''}]"])


def _trained_with(tmp_path, name, tokenizer: bytes | None, meta_sha: str | None = None):
    """A checkpoint (run dir ``name``) holding a copy of ``tokenizer`` (None: none), as a save writes one."""
    extra = {}
    if tokenizer is not None:
        (tmp_path / f"{name}.tok").write_bytes(tokenizer)
        extra = {"tokenizer.model": str(tmp_path / f"{name}.tok")}
    meta = {"step": 5} if meta_sha is None else {"step": 5, "tokenizer_sha256": meta_sha}
    return CheckpointManager(tmp_path / name).save(5, FakeEngine(), {"step": 5}, meta, extra_files=extra)


def test_init_from_weights_of_another_tokenizer_is_refused_before_start(tmp_path, monkeypatch):
    """Weights trained with tokenizer A started a run on data of tokenizer B (same vocabulary size) without a
    word, the new checkpoints recording B. Now check_paths (mnemo train and mnemo launch, before any rank)
    compares the sha256 of the tokenizer the source keeps with the run's, as a resume does."""
    from mnemo.data_pipeline.tokenizer import file_sha256
    from mnemo.train.config import ConfigError

    run = tmp_path / "run"
    same = _trained_with(tmp_path, "same", stub_tokenizer_bytes())  # the tokenizer.model of _cfg's data dir
    _check(_cfg(tmp_path, run, init_from=str(same)))
    _check(_cfg(tmp_path, run, init_from=str(tmp_path / "same")))  # a run dir: its newest checkpoint
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"w")
    (export / "tokenizer.model").write_bytes(stub_tokenizer_bytes())
    _check(_cfg(tmp_path, run, init_from=str(export)))

    other = _trained_with(tmp_path, "other", b"y")
    theirs, ours = file_sha256(other / "tokenizer.model")[:12], file_sha256(tmp_path / "data" / "tokenizer.model")[:12]
    want = (
        rf"^init_from: {other} was trained with another tokenizer "
        rf"\(sha256 {theirs} != {ours} of data.path's .*data/tokenizer.model\)$"
    )
    with pytest.raises(ConfigError, match=want):
        _check(_cfg(tmp_path, run, init_from=str(other)))
    (export / "tokenizer.model").write_bytes(b"y")
    with pytest.raises(ConfigError, match=r"^init_from: .*export was trained with another tokenizer"):
        _check(_cfg(tmp_path, run, init_from=str(export)))
    (tmp_path / "mine.model").write_bytes(b"y")  # data.tokenizer given: that is the run's tokenizer
    vocab = json.loads((tmp_path / "data" / "manifest.json").read_text())["vocab_size"]
    # b"y" is no real tokenizer: one of the data's vocabulary size, as far as the checks look.
    monkeypatch.setattr("mnemo.data_pipeline.tokenizer.Tokenizer", lambda path: types.SimpleNamespace(vocab_size=vocab))
    with pytest.raises(ConfigError, match=rf"\(sha256 {ours} != {theirs} of data.tokenizer .*mine.model\)$"):
        _check(_cfg(tmp_path, run, init_from=str(same), **{"data.tokenizer": str(tmp_path / "mine.model")}))


def test_a_checkpoint_whose_tokenizer_was_replaced_is_refused_by_every_loader(tmp_path, capsys):
    """A checkpoint's tokenizer.model replaced by another valid one: generate ran with it (exit 0), eval
    blamed the data, init_from compared the replaced file with the run's and loaded; only export refused.
    Now every load compares it with the sha256 meta.json records (check_tokenizer_file, as export does)."""
    from mnemo.cli import main
    from mnemo.data_pipeline.tokenizer import file_sha256
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.train.engine import init_weights_from

    ours = stub_tokenizer_bytes()  # the tokenizer of _cfg's data dir: init_from's own check passes it
    (tmp_path / "orig.model").write_bytes(b"the tokenizer the weights were trained with")
    trained = file_sha256(tmp_path / "orig.model")
    ck = _trained_with(tmp_path, "swapped", ours, trained)
    tok = ck / "tokenizer.model"
    want = (
        rf"^{re.escape(str(tok))}: not the tokenizer the model was trained with "
        rf"\(sha256 {file_sha256(tok)[:12]} != {trained[:12]} recorded in meta\.json\): damaged or replaced$"
    )
    with pytest.raises(UserError, match=want):
        load_for_inference(ck)  # generate, eval, lm-eval
    (tmp_path / "p.txt").write_text("hi\n")
    assert main(["generate", str(ck), "--prompt-file", str(tmp_path / "p.txt"), "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(want.replace("^", "^mnemo: error: ", 1), err[0]), err
    _check(_cfg(tmp_path, tmp_path / "run", init_from=str(ck)))  # the file it keeps is the run's tokenizer...
    with pytest.raises(UserError, match=want):
        init_weights_from(None, str(ck), zero3=False)  # ...but not its weights': refused before they load


@pytest.mark.parametrize(
    "key, value, why",
    [("size", "huge", r"unknown size 'huge' \(known: debug"), ("segment_len", 10**12, r"must be <= 2147483647")],
)
def test_a_bad_config_in_a_checkpoint_names_its_meta_json(tmp_path, key, value, why):
    """An edited meta.json (model.size unknown, model.segment_len 1e12) was "model.size: unknown size ...":
    a mistake in the user's own config, as it read. Now the file and its entry are named (an export: config.json)."""
    from mnemo.train.checkpoint import config_of
    from mnemo.train.config import load_config, to_dict

    tree = to_dict(load_config(None, []))
    tree["model"][key] = value
    p = save(CheckpointManager(tmp_path / "run"), 5, config=tree)
    with pytest.raises(UserError, match=rf"^{re.escape(str(p / 'meta.json'))}: config\.model\.{key}: {why}") as e:
        config_of(p)
    assert "\n" not in str(e.value)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps(tree))
    with pytest.raises(UserError, match=rf"^{re.escape(str(export / 'config.json'))}: model\.{key}: {why}"):
        config_of(export)


def test_init_from_weights_that_record_no_tokenizer_is_refused_saying_so(tmp_path):
    from mnemo.data_pipeline.tokenizer import file_sha256
    from mnemo.train.config import ConfigError

    run = tmp_path / "run"
    bare = _trained_with(tmp_path, "bare", None)
    with pytest.raises(
        ConfigError, match=r"^init_from: .*step_00000005 records no tokenizer \(no tokenizer.model or tokenizer.json\)"
    ):
        _check(_cfg(tmp_path, run, init_from=str(bare)))
    # Without the file, a checkpoint's meta.json tokenizer_sha256 is compared.
    _check(
        _cfg(
            tmp_path,
            run,
            init_from=str(_trained_with(tmp_path, "m1", None, file_sha256(tmp_path / "data" / "tokenizer.model"))),
        )
    )
    with pytest.raises(ConfigError, match=r"was trained with another tokenizer \(sha256 0123456789ab != "):
        _check(_cfg(tmp_path, run, init_from=str(_trained_with(tmp_path, "m2", None, "0123456789ab" * 5))))


def test_weights_of_another_vocabulary_name_the_tokenizer():
    import torch

    from mnemo.model import MemoryTransformer, ModelArgs
    from mnemo.train.checkpoint import load_weights
    from mnemo.train.errors import UserError

    model = MemoryTransformer(ModelArgs.from_size("debug", 64))
    sd = MemoryTransformer(ModelArgs.from_size("debug", 32)).state_dict()
    with pytest.raises(
        UserError,
        match=r"^src: trained with another tokenizer \(a vocabulary of 32 tokens, this run's tokenizer has 64",
    ):
        load_weights(model, sd, "src")
    load_weights(model, {k: torch.zeros_like(v) for k, v in model.state_dict().items()}, "src")


def test_load_universal_never_across_world_size_stage_or_precision_is_one_line(tmp_path):
    """With checkpoint.load_universal=never, a checkpoint of another world size was DeepSpeed's
    ZeRORuntimeException under a traceback, of another ZeRO stage a bare AssertionError, of another precision
    "cannot read the DeepSpeed state (... bf16_zero_pp_rank_0 ...: No such file)" as if it were damaged."""
    from mnemo.train.config import load_config
    from mnemo.train.resume import reads_universal

    ckpt = tmp_path / "step_00000006"
    (ckpt / "ds" / "state").mkdir(parents=True)
    meta = {"world_size": 2, "zero_stage": 2}
    for setting, want in (("auto", False), ("always", True), ("never", False)):
        cfg = load_config(None, ["zero.stage=2", f"checkpoint.load_universal={setting}"])
        assert reads_universal(cfg, meta, ckpt, 2, use_bf16=False) is want
    for stage, world, bf16 in ((2, 1, False), (3, 2, False), (2, 2, True)):
        cfg = load_config(None, [f"zero.stage={stage}", "checkpoint.load_universal=never"])
        with pytest.raises(UserError) as e:
            reads_universal(cfg, meta, ckpt, world, use_bf16=bf16)
        msg = str(e.value)
        assert msg.startswith("checkpoint.load_universal=never: checkpoint ") and "\n" not in msg, msg
        assert "saved at world size 2, ZeRO 2, fp32" in msg and "(checkpoint.load_universal=auto)" in msg, msg
        cfg = load_config(None, [f"zero.stage={stage}", "checkpoint.load_universal=auto"])
        assert reads_universal(cfg, meta, ckpt, world, use_bf16=bf16) is True


def _tied_export(tmp_path, name, drop=("lm_head.weight",), tied=True):
    """An export folder as `mnemo export` writes one: a tied model's weights leave out lm_head.weight."""
    import dataclasses

    from safetensors.torch import save_file

    from mnemo.model import MemoryTransformer, ModelArgs

    args = dataclasses.replace(ModelArgs.from_size("debug", 64), tie_embeddings=tied)
    model = MemoryTransformer(args)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    out = tmp_path / name
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"))
    (out / "model_args.json").write_text(json.dumps(dataclasses.asdict(args)))
    return out, model


def test_init_from_an_export_of_a_tied_model_fills_an_untied_models_head_from_the_embedding(tmp_path):
    """Before: "weights do not fit this model (missing ['lm_head.weight'] ...)", while init_from the checkpoint of
    the same weights (which holds the shared tensor as lm_head.weight too) loaded."""
    import dataclasses

    import torch

    from mnemo.model import MemoryTransformer, ModelArgs
    from mnemo.train.checkpoint import load_weights
    from mnemo.train.engine import init_weights_from

    exp, src = _tied_export(tmp_path, "exp")
    untied = MemoryTransformer(dataclasses.replace(ModelArgs.from_size("debug", 64), tie_embeddings=False))
    init_weights_from(untied, str(exp), zero3=False)
    assert torch.equal(untied.lm_head.weight, src.tok_emb.weight) and torch.equal(
        untied.tok_emb.weight, src.tok_emb.weight
    )
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()  # still untied
    # Strict otherwise: another missing tensor, an untied export without its head, eval's plain load.
    with pytest.raises(UserError, match=r"missing \['norm.weight'\]"):
        init_weights_from(untied, str(_tied_export(tmp_path, "exp2", drop=("lm_head.weight", "norm.weight"))[0]), False)
    with pytest.raises(UserError, match=r"missing \['lm_head.weight'\]"):
        init_weights_from(untied, str(_tied_export(tmp_path, "exp3", tied=False)[0]), zero3=False)
    sd = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UserError, match=r"missing \['lm_head.weight'\]"):
        load_weights(untied, sd, "src")


class FullDiskEngine(FakeEngine):
    """deepspeed's save on a full disk: torch.save to a path raises only this RuntimeError, no OSError chained."""

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        super().save_checkpoint(save_dir, tag, save_latest)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3369792 vs 3369680")


def _statvfs(free: int, flag: int = 0):
    return lambda path: types.SimpleNamespace(f_bavail=free, f_bfree=free, f_flag=flag)


@pytest.mark.parametrize("flag, reason", [(0, "No space left on device"), (os.ST_RDONLY, "Read-only file system")])
def test_a_save_on_a_full_disk_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, flag, reason):
    """Was a traceback ending in torch's RuntimeError "unexpected pos" (exit 1); now a UserError naming the
    checkpoint, found by the disk (statvfs) as torch does not say. The earlier checkpoint stays the latest
    and the unfinished save is what the next start cleans up."""
    mgr = CheckpointManager(tmp_path, keep=3)
    good = save(mgr, 10)
    monkeypatch.setattr(os, "statvfs", _statvfs(0, flag))
    meta = {"step": 20, "world_size": 1, "zero_stage": 2, "config": {}}
    with pytest.raises(UserError) as got:
        mgr.save(20, FullDiskEngine(), {"step": 20}, meta)
    assert str(got.value) == f"checkpoint of step 20: {mgr.root}: {reason}"
    monkeypatch.undo()
    assert mgr.latest() == good and (mgr.root / "latest").read_text().strip() == good.name
    assert [p.name for p in mgr.clean_partials()] == [".tmp-step_00000020"]


def test_a_save_whose_torch_save_hit_a_full_disk_names_the_checkpoint(tmp_path, monkeypatch):
    """torch.save into a file object: the OSError is the RuntimeError's context, whatever the disk says now."""
    import errno

    import torch

    def full(obj, f):
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:  # as torch's zip writer: the OSError is only the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", full)
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(UserError, match=f"^checkpoint of step 5: {mgr.root}: Disk quota exceeded$"):
        save(mgr, 5)


def test_another_failure_of_a_save_is_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "statvfs", _statvfs(1000))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        CheckpointManager(tmp_path).save(5, FullDiskEngine(), {"step": 5}, {"step": 5})


SAVING_RANK = """
import datetime, errno, json, os, sys, time
from pathlib import Path

import torch
import torch.distributed as dist

rank, world, rendezvous, root, where = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=60))
from mnemo.train import checkpoint
from mnemo.train.collectives import any_true, barrier


class Engine:
    def save_checkpoint(self, save_dir, tag, save_latest=True):
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)


def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if where == "rank file" and rank == 1:
    torch.save = full
if where == "commit" and rank == 0:
    checkpoint.fsync_tree = full
mgr = checkpoint.CheckpointManager(root, rank=rank, world_size=world, barrier=barrier,
                                   any_failed=lambda failed: any_true([failed], "cpu")[0])
t0 = time.monotonic()
try:
    mgr.save(5, Engine(), {"step": 5}, {"step": 5, "world_size": world})
    out = {"error": None}
except Exception as e:
    out = {"error": f"{type(e).__name__}: {e}"}
out["seconds"] = time.monotonic() - t0
print("RESULT " + json.dumps(out), flush=True)
time.sleep(6)  # a rank that does not vanish at once (on NCCL, the others never learn that it did)
"""


@pytest.mark.parametrize("where, failing", [("rank file", 1), ("commit", 0)])
def test_a_save_that_fails_on_one_rank_stops_every_rank_at_once_uncommitted(tmp_path, where, failing):
    """Was: the rank whose write hit a full disk stopped with its line, the others waited at the save's barrier
    for the collective's timeout (or failed with gloo's "Connection closed by peer" traceback once it exited)."""
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(SAVING_RANK)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    argv = [str(tmp_path / "rendezvous"), str(tmp_path / "run"), where]
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), *argv], env=env, stdout=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert lines, out
        results.append(json.loads(lines[-1][len("RESULT ") :]))
    root = tmp_path / "run" / "checkpoints"
    for r, got in enumerate(results):
        assert got["seconds"] < 5, (r, got)  # not waiting for the failed rank to exit
        if r == failing:
            assert got["error"] == f"UserError: checkpoint of step 5: {root}: No space left on device"
        else:
            assert (
                got["error"]
                == "UserError: checkpoint of step 5: another rank could not write it (its error names the cause)"
            )
    assert not (root / "step_00000005").exists() and not (root / "latest").exists()


def test_glob_safe_links_left_by_killed_commands_are_swept_by_the_next_one(tmp_path, monkeypatch):
    # Was: `mnemo generate/eval/export` (or a resume) on a checkpoint whose path holds [ ] * ? killed while
    # DeepSpeed read it (SIGKILL, SIGTERM, SIGHUP: no `finally`) left $TMPDIR/mnemo-ds-XXXX and its link for good.
    import signal
    import socket
    import subprocess
    import sys
    import tempfile

    import psutil

    from mnemo.train.checkpoint import GLOB_LINK_MARKER, glob_safe_dir

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    ckpt = tmp_path / "g[1]" / "ds"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.pt").write_bytes(b"w")
    code = (
        "import sys, tempfile, time; from pathlib import Path; tempfile.tempdir = sys.argv[1]\n"
        "from mnemo.train.checkpoint import glob_safe_dir\n"
        "with glob_safe_dir(Path(sys.argv[2])) as name:\n    print(name, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp), str(ckpt)], stdout=subprocess.PIPE, text=True)
    killed = Path(child.stdout.readline().strip()).parent
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert (killed / "ds").is_symlink()  # what the killed command left
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    me = {"host": host, "pid": os.getpid(), "started": psutil.Process().create_time()}
    dead = {"host": host, "pid": gone.pid, "started": 1.0}
    swept = {"mnemo-ds-reused00": ({**me, "started": me["started"] - 100}, "link")}  # pid now another process's
    others = {
        "mnemo-ds-alive000": (me, "link"),  # a command that still runs
        "mnemo-ds-otherhst": ({**dead, "host": host + "-other"}, "link"),  # another host's (a shared TMPDIR)
        "mnemo-ds-nomarker": (None, "link"),  # not provably mnemo's
        "mnemo-ds-tooLong99": (dead, "link"),  # not mkdtemp's name
        "mnemo-ds-afile000": (dead, "file"),  # holds something mnemo never puts there
        "mnemo-ds-realdir0": (dead, "dir"),  # its ds is a folder, not mnemo's link
    }
    for name, (owner, ds) in {**swept, **others}.items():
        (tmp / name).mkdir()
        if owner is not None:
            (tmp / name / GLOB_LINK_MARKER).write_text(json.dumps(owner))
        if ds == "link":
            (tmp / name / "ds").symlink_to(ckpt)
        elif ds == "file":
            (tmp / name / "ds").symlink_to(ckpt)
            (tmp / name / "notes.txt").write_text("mine")
        else:
            (tmp / name / "ds").mkdir()
    with glob_safe_dir(ckpt) as name:
        assert os.listdir(name) == ["weights.pt"]
        left = sorted(os.listdir(tmp))
        assert left == sorted([*others, Path(name).parent.name]), left  # the killed command's folder is gone
        assert json.loads((Path(name).parent / GLOB_LINK_MARKER).read_text()) == me  # this one names us
    assert sorted(os.listdir(tmp)) == sorted(others)
    assert (ckpt / "weights.pt").read_bytes() == b"w"  # the link was removed, not followed
    assert not killed.exists()
