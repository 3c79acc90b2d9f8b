"""Ranks resume and roll back to the checkpoint rank 0 chooses (train/checkpoint.py resume_point, train/spikes.py).

Each rank used to list <run.dir>/checkpoints itself. On NFS a listing is cached for up to about a minute, so
after a save and a restart (or a spike rollback) the nodes could pick different newest checkpoints. Two gloo
ranks in subprocesses; rank 1's listing is stale (it does not see step 4 yet).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.unit.gloo_ranks import run_ranks

REPO = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    import torch.distributed as dist

    rank, rendezvous, run = int(sys.argv[1]), sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=2)
    from mnemo.train import checkpoint, rundir, spikes
    from mnemo.train.config import SpikeConfig

    root = run / "checkpoints"
    mine = root / ("step_00000004" if rank == 0 else "step_00000002")
    if rank == 1:  # a stale listing: the newest save is not seen yet
        rundir.newest_checkpoint = lambda folder: mine
        checkpoint.newest_checkpoint = rundir.newest_checkpoint


    class Manager:
        world = 2

        def __init__(self):
            self.rank = rank

        def latest(self):
            return mine


    out = {}
    for name, call in (
        ("resume", lambda: checkpoint.resume_point(run, "auto", None, rank)[0]),
        ("rollback", lambda: spikes.SpikeDetector(SpikeConfig(policy="rollback"), Manager()).usable_checkpoint()),
    ):
        try:
            out[name] = Path(call()).name
        except Exception as e:
            out[name] = "error: " + str(e).splitlines()[0]
    # A rank that does not see the checkpoint rank 0 chose: a one-line error there.
    if rank == 1:
        checkpoint.is_complete = lambda path: False
    try:
        out["unseen"] = Path(checkpoint.resume_point(run, "auto", None, rank)[0]).name
    except Exception as e:
        out["unseen"] = type(e).__name__ + ": " + str(e)
    print("RESULT " + json.dumps(out))
    dist.destroy_process_group()
""")


def test_every_rank_takes_rank_0s_checkpoint_whatever_its_own_listing(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        ck = run / "checkpoints" / f"step_{step:08d}"
        ck.mkdir(parents=True)
        (ck / "meta.json").write_text(json.dumps({"step": step, "world_size": 2, "config": {}}))
        (ck / "COMPLETE").write_text("")
        for r in (0, 1):
            (ck / f"rank_{r:05d}.pt").write_bytes(b"")
    results = run_ranks(tmp_path, WORKER, 2, (str(run),))
    for r in results:
        assert (r["resume"], r["rollback"]) == ("step_00000004", "step_00000004"), r
    assert results[0]["unseen"] == "step_00000004"
    msg = results[1]["unseen"]
    assert msg.startswith("ValueError: rank 1 does not see checkpoint ") and "step_00000004" in msg, msg
    assert "\n" not in msg and "same run.dir" in msg
