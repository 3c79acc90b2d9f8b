"""Two evaluations of one ``--data`` dir started at the same moment both read its held-out documents.

A user runs the memory model and a baseline side by side on one dataset. The
held-out reader once opened a streaming StreamingDataset after a machine-wide
``clean_stale_shared_memory()``: one process unlinked the shared memory the
other had just registered (``[Errno 2] No such file or directory:
'/000000_locals'``). Here two real interpreters (like two ``mnemo eval``
commands; forked, so that they start in milliseconds) meet at a barrier and
read at once, several rounds in a row.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROUNDS = 6
VAL_FRACTION = 0.5


def _child(data: str, barrier: Any, results: Any) -> None:
    """One evaluation: per round, wait for the other process, then read the held-out documents."""
    from mnemo.evaluation.heldout import read_heldout_docs

    for _ in range(ROUNDS):
        barrier.wait(timeout=60)
        try:
            docs = read_heldout_docs(data, VAL_FRACTION)
            results.put(f"ok {len(docs)} {sum(int(d.sum()) for d in docs)}")
        except BaseException as e:  # any failure is a result the test shows
            results.put(f"fail {type(e).__name__}: {e}")


def _write_mds(root: Path, n_docs: int = 40) -> list[np.ndarray]:
    """A zstd-compressed MDS dir in `mnemo prepare`'s columns (corpus documents + 2 passkey ones); its documents."""
    from streaming import MDSWriter

    cols = {
        "answer_len": "int32",
        "answer_start": "int32",
        "doc_id": "str",
        "source": "str",
        "tokens": "ndarray:uint16",
    }
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 500, int(rng.integers(20, 200))).astype(np.uint16) for _ in range(n_docs)]
    # Small shards: several of them, as in a real dataset.
    with MDSWriter(out=str(root), columns=cols, compression="zstd", size_limit=4096) as w:
        for i, d in enumerate(docs):
            src, ans = ("passkey", (3, 2)) if i in (1, 2) else (f"f{i}.py", (-1, 0))
            w.write({"tokens": d, "doc_id": f"d{i}", "source": src, "answer_start": ans[0], "answer_len": ans[1]})
    return docs


def test_two_processes_read_one_data_dir_at_once(tmp_path):
    from mnemo.data_pipeline.split import heldout_mask

    data = tmp_path / "data"
    docs = _write_mds(data)
    assert len(list(data.glob("**/*.zstd"))) > 1
    held = heldout_mask(len(docs), VAL_FRACTION)
    want = [d for i, d in enumerate(docs) if held[i] and i not in (1, 2)]
    assert want, "the split holds out no corpus document"
    expect = f"ok {len(want)} {sum(int(d.astype(np.int64).sum()) for d in want)}"

    ctx = multiprocessing.get_context("fork")  # streaming is imported already: both start at once, in ms
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_child, args=(str(data), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=60) for _ in range(2 * ROUNDS)]
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert got == [expect] * (2 * ROUNDS), got
    assert [p.exitcode for p in procs] == [0, 0]
    # A read-only reader: nothing written next to the compressed shards (no decompressed copies).
    assert not list(data.glob("**/*.mds")), sorted(str(p) for p in data.glob("**/*.mds"))


def test_open_mds_errors_name_the_data_dir(tmp_path):
    """A damaged shard is one EvalError naming the data dir and what to run, not a streaming traceback."""
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.heldout import read_heldout_docs

    data = tmp_path / "data"
    _write_mds(data)
    shard = sorted(data.glob("**/*.zstd"))[0]
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(EvalError) as e:
        read_heldout_docs(str(data), VAL_FRACTION)
    msg = str(e.value)
    assert "\n" not in msg and str(data) in msg and "mnemo data verify" in msg, msg


def test_index_json_that_is_no_file_is_said_so_not_missing(tmp_path):
    """An index.json that is a FIFO is there: the error says what it is (and never waits on it), not
    'index.json missing; run mnemo prepare'; a dir without one still says that."""
    from mnemo.data_pipeline.errors import DataError
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.heldout import read_heldout_docs

    data = tmp_path / "data"
    _write_mds(data)
    (data / "index.json").unlink()
    with pytest.raises(EvalError, match=r"index\.json missing"):
        read_heldout_docs(str(data), VAL_FRACTION)
    os.mkfifo(data / "index.json")
    with pytest.raises((EvalError, DataError)) as e:
        read_heldout_docs(str(data), VAL_FRACTION)
    assert "FIFO" in str(e.value) and "missing" not in str(e.value), str(e.value)
