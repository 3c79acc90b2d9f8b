"""Weighted multi-source mixtures (data.sources): token shares, exact resume, re-partition per source, bad configs."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from mnemo.data_pipeline.errors import DataError
from mnemo.data_pipeline.mixture import WeightedSource, choose, default_name, expected_epochs, format_mixture, shares
from mnemo.data_pipeline.streams import ArraySource, DocumentStreams

PAD = 0


def make_docs(n: int, seed: int, lo: int, hi: int, tag: int) -> list[np.ndarray]:
    """Documents whose tokens encode (source tag, doc id, position): any mix-up between sources shows."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(lo, hi))
        out.append((tag * 10_000_000 + 1000 * (i + 1) + np.arange(length) + 2).astype(np.int64))
    return out


def mixture(weights=(0.8, 0.2), sizes=(40, 30), max_epochs=(0, 0)):
    # Source 0: short documents, source 1: documents ~6x longer, so a document share is far from a token share.
    docs = [make_docs(sizes[0], 1, 2, 40, 1), make_docs(sizes[1], 2, 60, 200, 2)]
    return docs, [
        WeightedSource(ArraySource(d, shard_size=7), weight=w, name=f"s{i}", max_epochs=m)
        for i, (d, w, m) in enumerate(zip(docs, weights, max_epochs))
    ]


def streams(mix, rank=0, world=1, B=4, T=16, seed=3, **kw):
    return DocumentStreams(mix, batch_size=B, segment_len=T, rank=rank, world_size=world, seed=seed, pad_id=PAD, **kw)


def reconstruct(batches) -> dict[tuple[int, int, int], list[int]]:
    """(source, epoch, doc) -> the tokens its segments delivered, in order (asserts continuity and resets)."""
    out: dict[tuple[int, int, int], list[int]] = {}
    for bt in batches:
        for b in range(bt.tokens.shape[0]):
            key = (int(bt.sources[b]), int(bt.epochs[b]), int(bt.doc_ids[b]))
            seg = bt.tokens[b, : int(bt.mask[b].sum()) + 1].tolist()
            if bt.reset[b]:
                assert key not in out, f"document {key} started twice"
                out[key] = seg
            else:
                assert key in out and out[key][-1] == seg[0], f"slot continued {key} without its start"
                out[key].extend(seg[1:])
    return out


def test_token_share_within_one_percent_over_10000_documents():
    docs, mix = mixture()
    s = streams(mix, B=8)
    tokens, n_docs = np.zeros(2), 0
    while n_docs < 10_000:
        bt = next(s)
        n_docs += int(bt.reset.sum())
        np.add.at(tokens, bt.sources.numpy(), bt.mask.sum(1).numpy())
        # Every slot's tokens are its source's (the tag in the token ids).
        real = bt.tokens[:, 0] // 10_000_000
        assert torch.equal(real, bt.sources + 1)
    share = tokens / tokens.sum()
    assert abs(share[0] - 0.8) < 0.01 and abs(share[1] - 0.2) < 0.01, share
    # The document share is far from the token share: the weights are token proportions.
    assert list(s.source_tokens) == tokens.astype(int).tolist()


def test_tiny_and_huge_weights_give_their_shares():
    """Equal subnormal weights gave the shares 0.992 / 0.008 (drawn / 1e-320 overflowed to inf, and inf ties
    go to the lower index); 1e308, 1e308 was accepted by training but refused by `data inspect`."""
    assert shares([1e-320, 1e-320]) == shares([1e308, 1e308]) == [0.5, 0.5]
    assert shares([0.8, 0.2, 0]) == pytest.approx([0.8, 0.2, 0])
    with pytest.raises(DataError, match=r"^data.sources: weight 1 \(1e-320\) is too small beside 1e\+308"):
        shares([1e308, 1e-320])
    for w in ([0, 0], [1, -1], [1, float("inf")], []):
        with pytest.raises(DataError, match="^data.sources: "):
            shares(w)
    _, mix = mixture(weights=(1e-320, 1e-320))
    s = streams(mix, B=8)
    tokens = np.zeros(2)
    for _ in range(2000):
        bt = next(s)
        np.add.at(tokens, bt.sources.numpy(), bt.mask.sum(1).numpy())
    assert abs(tokens[0] / tokens.sum() - 0.5) < 0.01, tokens / tokens.sum()


def test_choice_is_deterministic_and_follows_the_deficit():
    assert choose([0, 0], [0.8, 0.2], [0, 1]) == 0  # a tie: the lower index
    assert choose([100, 10], [0.8, 0.2], [0, 1]) == 1  # 10/0.2 = 50 < 125
    assert choose([100, 10], [0.8, 0.2], [0]) == 0  # source 1 ran out
    assert choose([0], [1.0], []) == -1
    weight0 = streams([WeightedSource(ArraySource(make_docs(5, 0, 2, 9, 1)), weight=0.0), *mixture()[1]])
    assert not any(int(next(weight0).sources.min()) == 0 for _ in range(50))
    _, mix = mixture()
    a, b, c = streams(mix), streams(mix), streams(mix, seed=4)
    ba, bb, bc = ([next(x).doc_ids for _ in range(50)] for x in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(ba, bb))
    assert not all(torch.equal(x, y) for x, y in zip(ba, bc))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_equals_uninterrupted_at_random_points(num_workers):
    _, mix = mixture(sizes=(15, 9))
    N = 150  # several epochs of both sources
    ref = streams(mix, num_workers=num_workers)
    want = [next(ref) for _ in range(N)]
    for p in sorted(random.Random(1).sample(range(1, N - 1), 12)):
        s = streams(mix, num_workers=num_workers)
        for _ in range(p):
            next(s)
        r = streams(mix, num_workers=num_workers)
        assert r.load_state_dict(copy.deepcopy(s.state_dict())) is True
        assert r.drawn == s.drawn and r.source_tokens == s.source_tokens
        for i in range(p, min(N, p + 12)):
            got = next(r)
            for f in ("tokens", "mask", "reset", "doc_ids", "positions", "epochs", "sources"):
                assert torch.equal(getattr(got, f), getattr(want[i], f)), (p, i, f)


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2)])
def test_other_world_size_keeps_exactly_once_per_source(old_world, new_world):
    docs, mix = mixture(sizes=(23, 17))
    old = [streams(mix, rank=r, world=old_world, B=2) for r in range(old_world)]
    old_batches = [[next(s) for _ in range(30 + 9 * r)] for r, s in enumerate(old)]
    states = [s.state_dict() for s in old]
    finished, in_flight = set(), set()  # (source, epoch, doc)
    for bs in old_batches:
        for (src, e, d), toks in reconstruct(bs).items():
            (finished if len(toks) >= len(docs[src][d]) else in_flight).add((src, e, d))
    new = [streams(mix, rank=r, world=new_world, B=2) for r in range(new_world)]
    for s in new:
        assert s.load_state_dict(copy.deepcopy(states)) is False
    assert sum(sum(s.source_tokens) for s in new) == sum(sum(st["tokens"] for st in x["sources"]) for x in states)
    after: dict[tuple[int, int, int], list[int]] = {}
    for s in new:
        got = reconstruct([next(s) for _ in range(400)])
        assert not (set(got) & set(after)), "two new ranks read the same document"
        after.update(got)
    for src in (0, 1):
        for e in {e for s_, e, _ in finished | in_flight if s_ == src}:
            fin = {d for (s_, ee, d) in finished if (s_, ee) == (src, e)}
            aft = {d for (s_, ee, d) in after if (s_, ee) == (src, e)}
            assert not (aft & fin), f"source {src}: a finished document was repeated"
            assert {d for (s_, ee, d) in in_flight if (s_, ee) == (src, e)} <= aft, "an in-flight document was lost"
            assert fin | aft == set(range(len(docs[src]))), f"source {src}: a document was lost in epoch {e}"
    for (src, _, d), toks in after.items():  # restarted from the start, of the right source
        assert toks == docs[src][d][: len(toks)].tolist()


def test_exhausted_source_drops_out_and_the_rest_renormalise():
    docs, mix = mixture(weights=(0.5, 0.3), sizes=(20, 6), max_epochs=(0, 1))
    mix.append(WeightedSource(ArraySource(make_docs(20, 5, 2, 40, 3)), weight=0.2, name="s2"))
    s = streams(mix, B=2)
    got = reconstruct([next(s) for _ in range(600)])
    assert sorted(d for (src, e, d) in got if src == 1) == list(range(6)), "source 1: one epoch, each document once"
    assert s.queues[1].exhausted() and not s.queues[0].exhausted()
    after = {src for (src, e, d) in got if e >= 3}  # long after source 1 ran out, 0 and 2 go on
    assert after == {0, 2}
    # Once source 1 is out, sources 0 and 2 share the tokens 0.5 : 0.2.
    s.drawn = [0, 0, 0]
    for _ in range(400):
        next(s)
    assert abs(s.drawn[0] / (s.drawn[0] + s.drawn[2]) - 0.5 / 0.7) < 0.02 and s.drawn[1] == 0


def test_a_used_up_mixture_pads_and_says_so_instead_of_raising():
    """Every source that draws at its max_epochs: the loader raised a DataError at the rank's own step (the
    other ranks then died in their next collective). Now the slot without a document is padding and
    ``used_up`` tells the trainer, which ends the run on every rank at once."""
    docs, _ = mixture()
    only = streams([WeightedSource(ArraySource(docs[1]), weight=1.0, max_epochs=1)], B=2)
    got, n = [], 0
    while not only.used_up:
        got.append(next(only))
        n += 1
        assert n < 1000
    assert sorted(d for (_, e, d) in reconstruct(got)) == list(range(len(docs[1]))), "each document once"
    after = next(only)  # what a step that still reads gets: padding in the slot without a document
    empty = after.doc_ids == -1
    assert empty.any() and not after.mask[empty].any() and only.used_up
    resumed = streams([WeightedSource(ArraySource(docs[1]), weight=1.0, max_epochs=1)], B=2)
    resumed.load_state_dict(copy.deepcopy(only.state_dict()))
    assert resumed.used_up  # a resume of the ended run ends at once
    fresh = streams([WeightedSource(ArraySource(docs[1]), weight=1.0, max_epochs=1)], B=2)
    assert not fresh.used_up and not streams(mixture()[1]).used_up


def test_state_of_another_mixture_is_refused():
    _, mix = mixture()
    s = streams(mix)
    next(s)
    st = s.state_dict()
    with pytest.raises(DataError, match="has 2 sources, this run 1"):
        streams(mix[:1]).load_state_dict(copy.deepcopy(st))
    swapped = [WeightedSource(m.source, m.weight, name, 0) for m, name in zip(mix, ("s1", "s0"))]
    with pytest.raises(DataError, match=r"data.sources\[0\]: the checkpoint's source 0 is 's0', this run's 's1'"):
        streams(swapped).load_state_dict(copy.deepcopy(st))
    with pytest.raises(DataError, match="made on a mixture"):
        DocumentStreams(mix[0].source, batch_size=4, segment_len=16, seed=3).load_state_dict(copy.deepcopy(st))


def test_a_resume_on_other_sources_names_data_sources():
    """Resuming with data.sources reordered said "data.path: the dataset changed since checkpoint ... (300 -> 12
    documents)": the first source's document count, under a key the run does not set."""
    from pathlib import Path

    from mnemo.train.config import load_config, to_dict
    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    def check(old, new, docs):
        return check_resume_compatible(
            to_dict(old), new, {"num_documents": 300}, "", {"num_documents": docs}, Path("ck")
        )

    mix = load_config(None, ["data.sources=[{path: x/d_en}, {path: x/d_ru, weight: 0.5}]"])
    swapped = load_config(None, ["data.sources=[{path: x/d_ru, weight: 0.5}, {path: x/d_en}]"])
    with pytest.raises(UserError, match=r"^data.sources\[0\]: the checkpoint's source 0 is 'd_en', this run's 'd_ru' "):
        check(mix, swapped, 12)
    with pytest.raises(UserError, match=r"^data.sources: the checkpoint has 2 sources, this run 1; checkpoint ck$"):
        check(mix, load_config(None, ["data.sources=[{path: x/d_en}]"]), 300)
    with pytest.raises(
        UserError, match=r"^data.sources\[0\].path: the dataset changed since checkpoint ck \(300 -> 12 "
    ):
        check(mix, mix, 12)
    with pytest.raises(UserError, match=r"^data.sources: checkpoint ck was made on a mixture \(data.sources\)"):
        check(mix, load_config(None, ["data.path=x/d_en"]), 300)
    assert check(mix, mix, 300) == []


def test_expected_epochs_and_table():
    assert expected_epochs([1000, 500], [3, 1], 4000) == [3.0, 2.0]
    with pytest.raises(DataError, match="--weights"):
        expected_epochs([1, 1], [0, 0], 10)
    reps = [
        {"data_dir": "/d/web", "documents": 10, "tokens": 1000},
        {"data_dir": "/d/code/", "documents": 5, "tokens": 500},
    ]
    table = format_mixture(reps, [3, 1], 4000)
    assert "budget 4,000 tokens" in table and "web" in table and "code" in table
    assert "3.00" in table and "2.00" in table and "75.0%" in table


# ----------------------------------------------------------------- config


def fake_data(path, sha=None):
    """Just enough of a `mnemo prepare` dir for the path checks: index.json, manifest.json, tokenizer.model;
    ``sha``: the tokenizer hash its manifest records instead of its tokenizer's (another tokenizer's data)."""
    from tests.unit.launch_workspace import stub_data_dir

    stub_data_dir(path)
    if sha is not None:
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "tokenizer_sha256": sha}))
    return path


@pytest.mark.parametrize(
    "sources,match",
    [
        ("[{path: a, weight: 0.8}, {path: b, weightt: 0.2}]", r"unknown config key 'data.sources\[1\].weightt'"),
        ("[{path: a, weight: 0.8}, {path: b, weight: -0.2}]", r"data.sources\[1\].weight: must be >= 0"),
        ("[{path: a, weight: 0}, {path: b, weight: 0}]", r"data.sources: the weights sum to 0"),
        ("[{path: a, weight: 1e308}, {path: b, weight: 1e-320}]", r"data.sources: weight 1 \(1e-320\) is too small"),
        ("[{path: a}, {weight: 1}]", r"data.sources\[1\].path: not set"),
        ("[{path: x/a}, {path: y/a}]", r"data.sources\[1\]: name 'a' is also data.sources\[0\]'s"),
        ("[{path: a, max_epochs: -1}]", r"data.sources\[0\].max_epochs: must be >= 0"),
        ("[{path: a, name: 'w b'}]", r"data.sources\[0\].name: 'w b' may hold only"),
        # '.' and '..' would be a metric data/./tokens that MLflow refuses (with every metric of its batch)
        # and a cache folder <cache_dir>/.. outside this node's.
        ("[{path: a, name: '..'}]", r"data.sources\[0\].name: '..' is not a name of its own"),
        (
            "[{path: a}, {path: .}]",
            r"data.sources\[1\].path: '.' gives the source no usable name.*data.sources\[1\].name$",
        ),
        ("[{path: d/..}]", r"data.sources\[0\].path: 'd/..' gives the source no usable name"),
        ("{path: a}", r"data.sources: expected a list"),
    ],
)
def test_bad_mixture_is_a_one_line_config_error(sources, match):
    from mnemo.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"data.sources={sources}"])
    assert "\n" not in str(e.value)


def test_a_name_too_long_for_a_folder_or_a_metric_is_refused(tmp_path):
    """A name of 239+ characters made metric names data/<name>/share over MLflow's 250 (every metric of their
    batch lost); one of 256+ bytes was OSError 'File name too long' in the rank (its cache folder)."""
    from mnemo.train.config import ConfigError, load_config

    load_config(None, [f"data.sources=[{{path: a, name: {'n' * 200}}}]"])  # the bound: 200 bytes
    load_config(None, [f"data.sources=[{{path: a, name: {'я' * 100}}}]"])
    for name, key in (("n" * 201, "name"), ("я" * 101, "name"), ("n" * 300, "name")):
        with pytest.raises(ConfigError, match=rf"^override data.sources\[0\].{key}: '.*' is \d+ bytes long") as e:
            load_config(None, [f"data.sources=[{{path: a, name: {name}}}]"])
        assert "at most 200" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(
        ConfigError, match=r"^override data.sources\[0\].path: .* gives the source no usable name .*300 bytes"
    ):
        load_config(None, [f"data.sources=[{{path: {tmp_path / ('d' * 300)}}}]"])


def test_a_name_with_a_character_it_may_not_hold_names_that_character():
    """A folder name in decomposed Unicode ('donne' + U+0301 + 'es', as macOS writes names) was refused as holding
    something other than letters, with the name shown as if it held only letters: the character is named."""
    from mnemo.train.config import ConfigError, load_config

    nfd = "donne\u0301es"
    with pytest.raises(ConfigError, match=r"no usable name .* not '\\u0301'\); set data.sources\[0\].name"):
        load_config(None, [f"data.sources=[{{path: d/{nfd}}}]"])
    with pytest.raises(ConfigError, match=r"^override data.sources\[0\].name: 'a b' may hold .*, not ' '$"):
        load_config(None, ["data.sources=[{path: d/x, name: a b}]"])


def test_default_name_is_the_last_part_of_the_normalised_path():
    assert [default_name(p) for p in ("d/web", "d/web/", "d_en/.", "d_en/./", "a/b/..", "s3://bucket/web")] == [
        "web",
        "web",
        "d_en",
        "d_en",
        "a",
        "web",
    ]
    assert [default_name(p) for p in (".", "..", "d/..", "/", "")] == [""] * 5  # no name: set data.sources[i].name


def test_path_and_sources_exclusive_and_paths_checked(tmp_path):
    from mnemo.train.config import ConfigError, check_paths, load_config, tokenizer_path

    a, b = fake_data(tmp_path / "a"), fake_data(tmp_path / "b")
    with pytest.raises(ConfigError, match="set either data.path or data.sources, not both"):
        load_config(None, [f"data.path={a}", f"data.sources=[{{path: {b}}}]"])
    cfg = load_config(None, [f"data.sources=[{{path: {a}, weight: 0.8}}, {{path: {b}, weight: 0.2, name: bb}}]"])
    check_paths(cfg)
    assert tokenizer_path(cfg) == str(a / "tokenizer.model")
    assert [s.name for s in cfg.data.sources] == ["", "bb"] and cfg.data.sources[0].weight == 0.8
    missing = load_config(None, [f"data.sources=[{{path: {a}}}, {{path: {tmp_path / 'nope'}}}]"])
    with pytest.raises(ConfigError, match=r"^data.sources\[1\].path: no such directory: .*nope$"):
        check_paths(missing)
    c = fake_data(tmp_path / "c", sha="c" * 64)
    other = load_config(None, [f"data.sources=[{{path: {a}}}, {{path: {c}}}]"])
    with pytest.raises(ConfigError, match=rf"^data.sources: {a} and {c} were made with different tokenizers") as e:
        check_paths(other)
    assert "\n" not in str(e.value)


def test_single_path_config_unchanged():
    from mnemo.train.config import data_paths, load_config

    cfg = load_config(None, ["data.path=/x/y"])
    assert cfg.data.sources == [] and data_paths(cfg) == [("data.path", "/x/y")]


CHILD = """
import hashlib, os, sys, torch
sys.path.insert(0, {here!r})
from test_mixture import mixture, streams
s = streams(mixture(sizes=(15, 9))[1], num_workers=2)
out = open(sys.argv[1] + "/batches.txt", "w")
for i in range(1, 10_000):
    bt = next(s)
    out.write(hashlib.sha256(bt.tokens.numpy().tobytes() + bt.sources.numpy().tobytes()).hexdigest() + "\\n")
    out.flush()
    if i % 7 == 0:  # a checkpoint: the state after batch i, written atomically
        torch.save({{"batch": i, "state": s.state_dict()}}, sys.argv[1] + "/tmp.pt")
        os.replace(sys.argv[1] + "/tmp.pt", sys.argv[1] + "/state.pt")
"""


def test_sigkill_then_resume_from_the_saved_state_continues_every_source_exactly(tmp_path):
    """A loader process SIGKILLed mid-run; the state it saved last resumes the per-source sequence exactly."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = CHILD.format(here=str(Path(__file__).parent))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    log = tmp_path / "batches.txt"
    t0 = time.time()
    while not (log.is_file() and len(log.read_text().splitlines()) >= 60):
        assert child.poll() is None and time.time() - t0 < 120, "the loader process ended or stalled"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    from mnemo.train.checkpoint import load_torch_file

    saved = load_torch_file(tmp_path / "state.pt")  # as the trainer reads rank files: weights_only
    done = log.read_text().splitlines()
    ref = streams(mixture(sizes=(15, 9))[1], num_workers=2)

    def digest(bt):
        return hashlib.sha256(bt.tokens.numpy().tobytes() + bt.sources.numpy().tobytes()).hexdigest()

    want = [digest(next(ref)) for _ in range(saved["batch"] + 80)]
    assert done[: len(done) - 1] == want[: len(done) - 1]  # the last line may be cut by the kill
    r = streams(mixture(sizes=(15, 9))[1], num_workers=2)
    assert r.load_state_dict(saved["state"]) is True
    assert [digest(next(r)) for _ in range(80)] == want[saved["batch"] :]


def test_data_inspect_of_several_datasets_prints_expected_epochs(tmp_path, monkeypatch, capsys):
    """`mnemo data inspect A B --tokens N --weights ..`: the mixture table; other tokenizers: a one-line error."""
    from mnemo.cli import main
    from mnemo.data_pipeline import verify

    a, b, c = fake_data(tmp_path / "web"), fake_data(tmp_path / "code"), fake_data(tmp_path / "other", sha="c" * 64)
    sizes = {str(a): (100, 30_000), str(b): (10, 10_000), str(c): (1, 1)}

    def fake_inspect(d, num_samples=3):
        docs, toks = sizes[d]
        return {"data_dir": d, "documents": docs, "tokens": toks, "passkey_documents": 0, "shards": 1}

    monkeypatch.setattr(verify, "inspect", fake_inspect)
    monkeypatch.setattr(verify, "format_inspect", lambda r: f"{r['data_dir']}: report")
    assert main(["data", "inspect", str(a), str(b), "--tokens", "1e5", "--weights", "0.6,0.4"]) == 0
    out = capsys.readouterr().out
    assert "budget 100,000 tokens" in out
    web = next(line for line in out.splitlines() if line.strip().startswith("web "))
    code = next(line for line in out.splitlines() if line.strip().startswith("code "))
    assert web.split()[-2:] == ["60.0%", "2.00"] and code.split()[-2:] == ["40.0%", "4.00"]
    # The weights training takes, inspect takes: one check (mixture.shares).
    assert main(["data", "inspect", str(a), str(b), "--tokens", "1e5", "--weights", "1e308,1e308", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mixture"]["expected_epochs"] == [5 / 3, 5.0]
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(a), str(b), "--weights", "1e308,1e-320"])
    assert "--weights: '1e308,1e-320': weight 1 (1e-320) is too small" in capsys.readouterr().err
    assert main(["data", "inspect", str(a), str(b), "--tokens", "1e5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mixture"]["expected_epochs"] == [5 / 3, 5.0]
    assert main(["data", "inspect", str(a), str(c)]) != 0
    err = capsys.readouterr().err.strip()
    assert "made with different tokenizers" in err and str(a) in err and str(c) in err and "\n" not in err


def test_the_data_count_params_are_those_of_the_whole_mixture(tmp_path):
    """MLflow's data.num_documents / data.num_tokens described data.sources[0] alone (48 of 96 documents);
    they are the mixture's sums now, a remote source's from its fetched manifest, None where one is unknown."""
    from types import SimpleNamespace

    from mnemo.train.config import load_config
    from mnemo.train.trainer import Trainer

    counts = {"a": (48, 7676), "b": (48, 16179)}
    for name, (docs, tokens) in counts.items():
        (tmp_path / name).mkdir()
        manifest = {"tokenizer_sha256": "0" * 64, "vocab_size": 400, "eos_id": 1, "token_dtype": "uint16"}
        (tmp_path / name / "manifest.json").write_text(
            json.dumps({**manifest, "num_documents": docs, "num_tokens": tokens})
        )
    sources = f"data.sources=[{{path: {tmp_path / 'a'}}}, {{path: {tmp_path / 'b'}}}]"
    cfg = load_config("configs/debug.yaml", ["data.path=", sources])
    local = SimpleNamespace(remote_manifest=None)
    me = SimpleNamespace(cfg=cfg, manifest={"num_documents": 48, "num_tokens": 7676})
    me.mixture = [SimpleNamespace(source=local), SimpleNamespace(source=local)]
    assert Trainer._data_counts(me) == {"data.num_documents": 96, "data.num_tokens": 23855}
    remote = f"data.sources=[{{path: {tmp_path / 'a'}}}, {{path: 's3://bucket/b'}}]"
    me.cfg = load_config("configs/debug.yaml", ["data.path=", remote])
    me.mixture[1] = SimpleNamespace(source=SimpleNamespace(remote_manifest={"num_documents": 2, "num_tokens": 10}))
    assert Trainer._data_counts(me) == {"data.num_documents": 50, "data.num_tokens": 7686}
    me.mixture[1] = SimpleNamespace(source=SimpleNamespace(remote_manifest=None))  # a remote dataset without one
    assert Trainer._data_counts(me) == {"data.num_documents": None, "data.num_tokens": None}
    me.mixture = []  # data.path: its manifest's
    assert Trainer._data_counts(me) == {"data.num_documents": 48, "data.num_tokens": 7676}
