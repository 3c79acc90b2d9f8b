"""What `mnemo launch` (and `mnemo train`) refuse before any rank starts: an unsafe resume, a dataset with fewer
training documents than the job's partitions, init_from weights of another shape, a resume onto other data.

Each was found by every rank after torchrun had started them, and printed once per rank; the init_from one left
config.yaml and run.lock in a new run dir.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from mnemo.cli import main
from mnemo.train.checkpoint import CheckpointManager
from tests.unit.launch_workspace import clear_forwarded_env, stub_data_dir


class _Engine:  # what CheckpointManager.save asks of a DeepSpeed engine
    def save_checkpoint(self, save_dir, tag, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working dir with c.yaml on a stub dataset (model.size debug); starting a rank fails the test."""
    clear_forwarded_env(monkeypatch)
    data = stub_data_dir(tmp_path / "data")
    (tmp_path / "c.yaml").write_text(
        f"run:\n  dir: runs/base\ndata:\n  path: {data}\n  val_fraction: 0\nmodel:\n  size: debug\n"
    )
    monkeypatch.chdir(tmp_path)

    def no_start(*a, **k):
        raise AssertionError("a rank was started")

    monkeypatch.setattr("mnemo.launch.local.run_node", no_start)
    return tmp_path


def _cfg(*overrides: str):
    from mnemo.train.config import load_config

    return load_config("c.yaml", list(overrides))


def _save(run_dir: str, cfg, **meta) -> Path:
    """A checkpoint of ``cfg`` in ``run_dir`` whose meta.json holds what a resume and init_from read."""
    from mnemo.train.config import manifest_vocab, to_dict
    from mnemo.train.engine import model_args_from_config
    from mnemo.data_pipeline.tokenizer import file_sha256

    meta = {
        "step": 3,
        "world_size": 1,
        "zero_stage": 2,
        "config": to_dict(cfg),
        "model_args": dataclasses.asdict(model_args_from_config(cfg, manifest_vocab(cfg))),
        "data_sha256": {"data.path": file_sha256(Path(cfg.data.path) / "index.json")},  # what a save records
        **meta,
    }
    tok = {"tokenizer.model": str(Path(cfg.data.path) / "tokenizer.model")}  # as a save copies it
    return CheckpointManager(Path(run_dir)).save(3, _Engine(), {"step": 3}, meta, extra_files=tok)


def _launch(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["launch", "c.yaml", "--nproc-per-node", "2", *argv])
    out, err = capsys.readouterr()
    return rc, out + err


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_an_unsafe_resume_is_one_line_before_any_rank_starts(ws, capsys):
    """model.segment_len changed on a resume: each rank printed the refusal after torchrun started them (9.7 s)."""
    ckpt = _save("runs/base", _cfg())
    before = _files(ws / "runs")
    rc, out = _launch(capsys, "model.segment_len=64")
    assert rc == 2
    assert out == (
        f"mnemo: error: model.segment_len: changed from 128 to 64 since checkpoint {ckpt}; resuming would be unsafe"
        " (use a new run.dir)\n"
    )
    assert _files(ws / "runs") == before  # no log, no run dir


def test_an_unsafe_resume_of_another_runs_checkpoint_advises_init_from(ws, capsys):
    """run.dir=runs/new checkpoint.resume=runs/base model.segment_len=64 was told to "use a new run.dir", which
    it was: resuming another run's checkpoint, the way on is to fine-tune from it (or not to resume it)."""
    ckpt = _save("runs/base", _cfg())
    rc, out = _launch(capsys, "run.dir=runs/new", "checkpoint.resume=runs/base", "model.segment_len=64")
    assert rc == 2
    assert out == (
        f"mnemo: error: model.segment_len: changed from 128 to 64 since checkpoint {ckpt}; resuming would be unsafe"
        f" (to fine-tune from it use init_from={ckpt} without checkpoint.resume, or drop checkpoint.resume)\n"
    )
    other = stub_data_dir(ws / "other")
    (other / "index.json").write_text((other / "index.json").read_text().replace("4096", "4096, " + '"size_limit": 1'))
    rc, out = _launch(capsys, "run.dir=runs/new", "checkpoint.resume=runs/base", f"data.path={other}")
    assert rc == 2 and out.endswith(
        f"(to fine-tune from it use init_from={ckpt} without checkpoint.resume, or drop checkpoint.resume)\n"
    )
    assert not (ws / "runs" / "new").exists()


def test_a_dataset_with_fewer_training_documents_than_partitions_is_one_line_before_any_rank(ws, capsys):
    """data.path with 1 training document on 2 ranks: each rank printed it; the run dir got logs/node0.log."""
    tiny = ws / "tiny"
    stub_data_dir(tiny)
    index = json.loads((tiny / "index.json").read_text())
    index["shards"][0]["samples"] = 1
    (tiny / "index.json").write_text(json.dumps(index))
    (tiny / "shard.00000.mds").write_bytes((1).to_bytes(4, "little"))  # its header says so too
    manifest = json.loads((tiny / "manifest.json").read_text())
    (tiny / "manifest.json").write_text(json.dumps({**manifest, "num_documents": 1}))  # and its manifest
    rc, out = _launch(capsys, f"data.path={tiny}")
    assert rc == 2
    assert re.fullmatch(
        r"mnemo: error: data.path: 1 training documents, fewer than the 2 partitions it is split into \(.*\)\n", out
    )
    # the partitions are the ranks x the accumulation micro-steps; and a mixture's source is named as the ranks do
    rc, out = _launch(
        capsys, f"data.path={tiny}", "--nproc-per-node", "1", "train.batch_size=2", "train.global_batch_size=4"
    )
    assert rc == 2 and out.startswith("mnemo: error: data.path: 1 training documents, fewer than the 2 partitions")
    sources = f'data.sources=[{{"path": "{ws / "data"}"}}, {{"path": "{tiny}", "name": "t"}}]'
    rc, out = _launch(capsys, "data.path=", sources)
    assert rc == 2 and out.startswith("mnemo: error: data.sources[1]: 1 training documents, fewer than the 2 ")
    assert _files(ws / "runs") == []


def test_init_from_weights_of_another_shape_are_one_line_before_any_rank(ws, capsys):
    """init_from=runs/base model.size=small: found by the ranks, after config.yaml and run.lock were written."""
    ckpt = _save("runs/base", _cfg())
    rc, out = _launch(capsys, "run.dir=runs/new", "init_from=runs/base", "model.size=small")
    assert rc == 2
    assert out == f"mnemo: error: init_from: {ckpt}: weights of 4 layers do not fit this model (12 layers)\n"
    rc, out = _launch(capsys, "run.dir=runs/new", "init_from=runs/base", "model.mlp=gelu")
    assert rc == 2
    want = rf"mnemo: error: init_from: {ckpt}: weights do not fit this model \(missing .*, unexpected .*mlp.*\)\n"
    assert re.fullmatch(want, out)
    assert not (ws / "runs" / "new").exists()
    from mnemo.train.resume import check_before_start

    check_before_start(_cfg("run.dir=runs/new", "init_from=runs/base"))  # the same model: fine


def test_a_resume_onto_other_data_of_the_same_size_is_refused_and_a_moved_dataset_resumes(ws, capsys):
    """data.path=dcS1 then dcS2 (300 documents each) resumed as "(safe)" and "(exact)": the stream positions
    of one dataset read in another. meta.json's data_sha256 (index.json: shards' names, sizes and hashes) is
    compared; the same dataset in another folder, or prepared again alike, has the same index.json."""
    from mnemo.train.resume import check_before_start

    ckpt = _save("runs/base", _cfg())
    other = stub_data_dir(ws / "other")
    index = json.loads((other / "index.json").read_text())
    index["shards"][0]["raw_data"]["hashes"] = {"sha1": "0" * 40}
    (other / "index.json").write_text(json.dumps(index))
    rc, out = _launch(capsys, f"data.path={other}")
    assert rc == 2
    assert out == (
        f"mnemo: error: data.path: holds other data than checkpoint {ckpt} was trained on (its index.json differs:"
        " another dataset, or one prepared again differently); resuming would be unsafe (use a new run.dir, with"
        f" init_from={ckpt} to fine-tune from it)\n"
    )
    (ws / "data").rename(ws / "moved")
    check_before_start(_cfg(f"data.path={ws / 'moved'}"))  # the same shards elsewhere: resumes
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["data_sha256"]  # a checkpoint older than the entry: nothing to compare
    (ckpt / "meta.json").write_text(json.dumps(meta))
    check_before_start(_cfg(f"data.path={other}"))


def test_a_launch_onto_other_nodes_does_not_judge_their_data_by_this_hosts_copy(ws, capsys):
    """data.path and data.tokenizer are each node's own (NODE_LOCAL_KEYS); a launch onto a hostfile's nodes or
    SLURM's refused a resume because this host's copy was stale, though the nodes' were right. There only the
    config is compared; an unsafe config change is refused all the same."""
    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_before_start

    _save("runs/base", _cfg())
    stale = stub_data_dir(ws / "stale")
    index = json.loads((stale / "index.json").read_text())
    index["shards"][0]["raw_data"]["hashes"] = {"sha1": "0" * 40}
    (stale / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="holds other data than checkpoint"):
        check_before_start(_cfg(f"data.path={stale}"))  # the ranks start here: this copy is theirs
    check_before_start(_cfg(f"data.path={stale}"), data_here=False)
    (ws / "hosts").write_text("node-a slots=2\nnode-b slots=2\n")
    rc, out = _launch(capsys, "--hostfile", str(ws / "hosts"), "--dry-run", f"data.path={stale}")
    assert rc == 0, out  # the launch onto the nodes: their copies decide
    with pytest.raises(UserError, match="train.seed: changed from"):
        check_before_start(_cfg(f"data.path={stale}", "train.seed=99"), data_here=False)
