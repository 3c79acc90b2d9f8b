"""Every rank of a job runs rank 0's config on the same data, or every rank stops with one line.

Nodes started by hand (``mnemo launch --nnodes N --node-rank I`` on each) can be given other overrides: with
another train.batch_size or dataset a node trained silently wrong, with another model shape DeepSpeed's first
broadcast hung for the collective timeout. ``Trainer._check_same_job`` runs in two gloo ranks here, each with
the overrides of its case.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from mnemo.train.config import load_config
from mnemo.train.trainer import job_identity
from tests.unit.gloo_ranks import run_ranks

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    rank, rendezvous, case = int(sys.argv[1]), sys.argv[3], json.loads(sys.argv[4])
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
    from mnemo.train.config import load_config
    from mnemo.train.errors import UserError
    from mnemo.train.trainer import Trainer

    mine = case[rank]
    trainer = SimpleNamespace(
        cfg=load_config(sys.argv[5], mine["overrides"]),
        tok_sha=mine.get("tok", "a" * 64),
        device=torch.device("cpu"),
        info=SimpleNamespace(rank=rank, node_rank=rank),
    )
    try:
        Trainer._check_same_job(trainer)
        error = None
    except UserError as e:
        error = str(e)
    dist.barrier()  # both ranks done with the group before either tears it down (else gloo may abort one)
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"error": error}))
""")


def _errors(tmp_path: Path, rank0: dict, rank1: dict) -> list[str | None]:
    case = json.dumps([rank0, rank1])
    run = tmp_path / f"run{len(list(tmp_path.iterdir()))}"  # a fresh rendezvous file per job
    run.mkdir()
    results = run_ranks(run, WORKER, extra=(case, str(REPO / "configs/debug.yaml")))
    return [r["error"] for r in results]


def test_the_same_config_on_every_rank_passes(tmp_path):
    same = {"overrides": ["train.max_steps=7", f"data.path={_dataset(tmp_path / 'd', '{}')}"]}
    assert _errors(tmp_path, same, same) == [None, None]


def test_another_batch_size_on_one_node_stops_every_rank_naming_the_key(tmp_path):
    data = f"data.path={_dataset(tmp_path / 'd', '{}')}"
    errors = _errors(
        tmp_path, {"overrides": [data]}, {"overrides": [data, "train.batch_size=2", "model.embeddings=untied"]}
    )
    want = load_config(REPO / "configs/debug.yaml").train.batch_size
    assert errors[1].startswith("rank 1 (node 1) differs from rank 0: ")
    assert f"train.batch_size 2 here, {want} on rank 0" in errors[1]
    assert "model.embeddings" in errors[1]
    assert errors[1].endswith("every node must run the same config file, overrides and data")
    assert errors[0].startswith("another rank's config or data differs from rank 0's (its error names them)")


def _dataset(path: Path, index: str) -> str:
    path.mkdir(parents=True)
    (path / "index.json").write_text(index)
    return str(path)


def test_each_node_may_keep_its_own_copy_of_the_same_data(tmp_path):
    # data.path (a node's local copy, or the same corpus prepared on each node: manifest.json then differs
    # in its paths and times), data.num_workers and data.cache_dir are the node's own; the shards count.
    a, b = _dataset(tmp_path / "a/mds", '{"shards": [1]}'), _dataset(tmp_path / "b/mds", '{"shards": [1]}')
    rank0 = {"overrides": [f"data.path={a}", "data.num_workers=4"]}
    rank1 = {"overrides": [f"data.path={b}", "data.num_workers=1", "data.cache_dir=/tmp/c"]}
    assert _errors(tmp_path, rank0, rank1) == [None, None]
    other = _dataset(tmp_path / "c/mds", '{"shards": [2]}')  # another dataset behind the path
    errors = _errors(tmp_path, rank0, {"overrides": [f"data.path={other}"]})
    assert "the data of data.path differs" in errors[1] and errors[0].startswith("another rank's")
    assert "the tokenizer (sha256) differs" in _errors(tmp_path, rank0, dict(rank1, tok="b" * 64))[1]


def test_every_source_of_a_mixture_is_compared(tmp_path):
    # Was: only the first source's manifest was compared: nodes mixed in different second datasets silently.
    first = _dataset(tmp_path / "first", '{"shards": [1]}')
    x, y = _dataset(tmp_path / "x", '{"shards": [2]}'), _dataset(tmp_path / "y", '{"shards": [3]}')

    def sources(second: str) -> dict:
        return {"overrides": ["data.path=", f"data.sources=[{{path: {first}}}, {{path: {second}, weight: 2}}]"]}

    assert _errors(tmp_path, sources(x), sources(x)) == [None, None]
    errors = _errors(tmp_path, sources(x), sources(y))
    assert "the data of data.sources[1].path differs" in errors[1] and errors[0].startswith("another rank's")


@pytest.mark.parametrize("secret", ["http://alice:hunter2@mlflow.example:5000"])
def test_a_differing_tracking_uri_is_named_without_its_password(tmp_path, secret):
    data = f"data.path={_dataset(tmp_path / 'd', '{}')}"
    errors = _errors(tmp_path, {"overrides": [data]}, {"overrides": [data, f"tracking.uri={secret}"]})
    assert "tracking.uri" in errors[1] and "hunter2" not in errors[1] and "hunter2" not in errors[0]


def test_job_identity_leaves_out_node_local_keys_and_source_paths():
    cfg = load_config(REPO / "configs/debug.yaml", ["data.path=/x", "data.num_workers=3"])
    ident = job_identity(cfg, "t" * 64, {"data.path": "d" * 64})
    assert not {"data.path", "data.tokenizer", "data.num_workers", "data.cache_dir"} & set(ident)
    assert ident["train.batch_size"] == str(cfg.train.batch_size)
    assert ident["the tokenizer (sha256)"] == "t" * 64 and ident["the data of data.path"] == "d" * 64
