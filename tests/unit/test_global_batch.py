"""A fixed global batch with gradient accumulation (train.global_batch_size) and a token budget (train.max_tokens).

In-process and fast: the batching rule and its one-line errors, the slot-group mapping (2 ranks x 1 micro-step
read exactly what 1 rank x 2 micro-steps reads, and a resume regroups streams and memory exactly), the step
count and LR schedule of a token budget, the start-up lines. The real 2-rank vs 1-rank x 2 accumulation runs
(same weights after 5 steps; resume 2 -> 1 ranks) are in tests/integration/test_universal.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mnemo.data_pipeline.streams import ArraySource, DocumentStreams
from mnemo.model.memory import LayerMemory, MemoryState
from mnemo.train.config import ConfigError, load_config
from mnemo.train.engine import deepspeed_config, lr_lambda
from mnemo.train.schedule import (
    Batching,
    after_step,
    batching,
    batching_of,
    repartition_note,
    resumed_total_steps,
    start_lines,
    total_steps,
    warmup_note,
)
from mnemo.train.errors import UserError
from mnemo.train.slots import MemoryGroups, SlotGroups, concat_memory
from tests.unit.test_hardening_trainer import VOCAB, Metrics, StandInStreams, config, world1  # noqa: F401 (fixture)

DEBUG = "configs/debug.yaml"


def cfg_of(*overrides: str):
    return load_config(DEBUG, ["train.passkey.fraction=0", *overrides])


# ------------------------------------------------------------------ the rule and its errors


def test_accumulation_is_global_over_world_times_batch():
    cfg = cfg_of("train.batch_size=4", "train.global_batch_size=16")
    assert batching(cfg, 2) == Batching(2, 4, 2) and batching(cfg, 1).accum == 4 and batching(cfg, 4).accum == 1
    # Unset: today's behaviour, whatever the world size.
    assert batching(cfg_of("train.batch_size=4"), 3) == Batching(3, 4, 1)
    assert deepspeed_config(cfg, False, False, 2)["gradient_accumulation_steps"] == 2
    assert deepspeed_config(cfg, False, False)["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize(
    "overrides,world,needle",
    [
        (["train.batch_size=4", "train.global_batch_size=12"], 2, "train.global_batch_size: 12 is not a multiple of "),
        (["train.batch_size=4", "train.global_batch_size=6"], None, "train.global_batch_size: 6 is not a multiple"),
        (["train.global_batch_size=-8"], None, "train.global_batch_size: must be >= 0"),
        (["train.max_tokens=-1"], None, "train.max_tokens: must be >= 0"),
        (["train.batch_size=2", "train.global_batch_size=8", "train.passkey.fraction=0.25"], 2, "passkey"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, world, needle):
    with pytest.raises(ConfigError) as e:
        batching(cfg_of(*overrides), world)
    msg = str(e.value)
    # A load_config error says where the key was given ("override KEY: ..."); batching's own checks do not.
    lead = msg.removeprefix("override ")
    assert needle in msg and "\n" not in msg
    assert lead.startswith("train.global_batch_size" if "global" in needle else "")


def test_launcher_refuses_before_starting_anything(tmp_path):
    from mnemo.launch.job import LaunchRequest, launch
    from tests.unit.launch_workspace import stub_data_dir

    mds = stub_data_dir(tmp_path / "data")  # enough for the path checks that come first
    req = LaunchRequest(
        config=DEBUG,
        overrides=[
            f"data.path={mds}",
            f"run.dir={tmp_path / 'run'}",
            "train.batch_size=4",
            "train.global_batch_size=12",
        ],
        nproc_per_node=2,
        dry_run=True,
    )
    with pytest.raises(ConfigError, match=r"train.global_batch_size: 12 is not a multiple of world size 2 x"):
        launch(req)


# ------------------------------------------------------------------ slot groups


def docs(n: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=int(rng.integers(3, 40))) for _ in range(n)]


def groups(source, rank: int, accum: int, world: int, B: int = 2) -> SlotGroups:
    def make(g: int, G: int) -> DocumentStreams:
        return DocumentStreams(source, batch_size=B, segment_len=8, rank=g, world_size=G, seed=3)

    return SlotGroups(make, rank, accum, world)


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "mask", "reset", "doc_ids", "positions"))


def test_two_ranks_read_what_one_rank_with_two_micro_steps_reads_and_resume_moves_groups_exactly():
    src = ArraySource(docs())
    ranks = [groups(src, r, 1, 2) for r in range(2)]  # 2 ranks x B, no accumulation
    one = groups(src, 0, 2, 1)  # 1 rank x B x 2 micro-steps
    for _ in range(7):
        for r in range(2):
            assert same(next(ranks[r]), next(one.group(r)))
    # A = 1 keeps the rank file's stream entry exactly as before; A = 2 holds one state per group.
    assert "groups" not in ranks[0].state_dict() and ranks[0].state_dict()["rank"] == 0
    assert [s["rank"] for s in one.state_dict()["groups"]] == [0, 1]
    # Resume the 2-rank state on 1 rank x 2 micro-steps: every group continues exactly.
    resumed = groups(src, 0, 2, 1)
    assert not resumed.same_shape(ranks[0].state_dict())
    assert resumed.load_state_dict([r.state_dict() for r in ranks]) is True
    for _ in range(9):
        for r in range(2):
            b = next(ranks[r])
            assert same(b, next(resumed.group(r))) and same(b, next(one.group(r)))
    # Back: 1 rank x 2 -> 2 ranks x 1, also exact; another B re-partitions (not exact).
    back = groups(src, 1, 1, 2)
    assert back.load_state_dict([resumed.state_dict()]) is True and same(next(back), next(ranks[1]))
    assert groups(src, 0, 1, 1, B=4).load_state_dict([resumed.state_dict()]) is False


def memory(B: int, fill: float) -> MemoryState:
    stm = torch.arange(B * 4, dtype=torch.float32).view(B, 1, 2, 2) + fill  # [B, H=1, M=2, Dh=2]
    n = torch.full((B,), int(fill), dtype=torch.long)  # fills within the store (2 entries; no long-term store)
    full, empty = torch.full((B,), int(fill) // 10, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    return MemoryState(layers=(LayerMemory(stm_k=stm, stm_v=stm + 0.5),), stm_len=full, ltm_len=empty, pos=n)


def test_memory_groups_one_state_dict_of_all_slots_and_regroup_on_another_world_size():
    a, b = memory(2, 10.0), memory(2, 20.0)
    one = MemoryGroups([a], "cpu")
    assert one.state is a and one.state_dict().keys() == a.state_dict().keys()  # A = 1: as before
    two = MemoryGroups([memory(2, 0.0), memory(2, 0.0)], "cpu")
    two.load_regrouped([a.state_dict(), b.state_dict()], rank=0)  # old ranks 0, 1 -> this rank's groups 0, 1
    assert two.states[0].equal(a) and two.states[1].equal(b)
    sd = two.state_dict()
    assert sd["pos"].tolist() == [10, 10, 20, 20]  # group i = rows [iB, (i+1)B)
    back = [MemoryGroups([memory(2, 0.0)], "cpu") for _ in range(2)]
    for r, m in enumerate(back):
        m.load_regrouped([sd], rank=r)
    assert back[0].state.equal(a) and back[1].state.equal(b)


def test_regroup_reads_only_the_old_ranks_that_hold_this_ranks_rows():
    """A new rank took every old rank's memory, concatenated, then its rows: at 16 -> 8 GPUs of
    configs/medium.yaml (~1.3 GB of memory a rank file) ~340 GB of host memory a node, and the kernel
    killed the ranks. Now only the rows it gets are copied: the old ranks it gets none of are on the meta
    device here (no data: any read of them fails), and it still gets exactly concat_memory(old)'s rows."""
    old = [memory(2, 10.0 + r) for r in range(4)]  # old ranks 0..3 x 2 slots: rows 0..7
    sds = [s.state_dict() for s in old]
    every = concat_memory(sds)
    meta = [{k: v.to("meta") for k, v in sd.items()} for sd in sds]
    # 4 ranks -> 2 ranks x 2 groups of 2: new rank 1 gets old ranks 2 and 3 (rows 4..7), whole.
    two = MemoryGroups([memory(2, 0.0), memory(2, 0.0)], "cpu")
    two.load_regrouped([meta[0], meta[1], sds[2], sds[3]], rank=1)
    assert two.states[0].equal(old[2]) and two.states[1].equal(old[3])
    # 4 ranks -> 3 ranks x 3 slots (in part): new rank 1 gets rows 3..5, the second of old rank 1, old rank 2's.
    three = MemoryGroups([memory(3, 0.0)], "cpu")
    three.load_regrouped([meta[0], sds[1], sds[2], meta[3]], rank=1)
    assert all(torch.equal(v, every[k][3:6]) for k, v in three.state_dict().items())
    # One old rank of 4 slots -> 2 ranks: its rows are copied, not views that keep the whole (mapped) file's
    # tensors alive in the new rank.
    one = MemoryGroups([memory(2, 0.0)], "cpu")
    one.load_regrouped([every], rank=1)
    assert one.state.pos.tolist() == every["pos"][2:4].tolist()
    held = [one.state.pos, one.state.stm_len, one.state.ltm_len, one.state.layers[0].stm_k, one.state.layers[0].stm_v]
    saved = {v.untyped_storage().data_ptr() for v in every.values()}
    assert not saved & {t.untyped_storage().data_ptr() for t in held}


# ------------------------------------------------------------------ token budget and the LR schedule


def test_max_tokens_sets_the_step_count_and_the_lr_schedule_ends_there():
    cfg = cfg_of("train.max_tokens=100000", "train.max_steps=100", "train.warmup_steps=5")
    tps = 8 * cfg.model.segment_len * cfg.memory.bptt_segments  # global batch 8
    steps = total_steps(cfg, 8)
    assert steps == math.ceil(100000 / tps) == 196
    assert total_steps(cfg_of("train.max_steps=30"), 8) == 30
    f, plain = lr_lambda(cfg, steps), lr_lambda(cfg)
    floor = cfg.train.min_lr_ratio
    # f(i) is the factor of the run's step i + 1: the budget's last step (i = steps - 1) takes the floor.
    assert f(steps - 1) == pytest.approx(floor) and f(steps - 2) > floor
    assert plain(99) == pytest.approx(floor) and f(99) > floor + 0.3  # not at train.max_steps
    assert after_step(cfg_of("eval.interval=50", "checkpoint.interval=0"), 150, False, False, steps) == ("eval",)
    assert (
        after_step(cfg_of("eval.interval=50", "checkpoint.interval=0"), 150, False, False) == ()
    )  # past train.max_steps=30


def test_the_logged_lr_is_the_one_each_step_used_and_the_last_step_takes_the_floor():
    # train/lr was read after the scheduler had moved on: each point was the next step's LR, and
    # the floor it showed last was never applied.
    from types import SimpleNamespace

    from mnemo.train.engine import applied_lr

    cfg = cfg_of("train.max_steps=6", "train.warmup_steps=2", "train.lr=0.003")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine = SimpleNamespace(lr_scheduler=sched)
    used, logged = [], []
    for _ in range(cfg.train.max_steps):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        logged.append(applied_lr(engine))
    assert logged == used
    assert used[0] == pytest.approx(0.0015) and used[-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    # warmup + 1 steps: the one step after the warmup is the last, at the floor (it was at the peak).
    f = lr_lambda(cfg_of("train.max_steps=2", "train.warmup_steps=1"))
    assert f(0) == 1.0 and f(1) == pytest.approx(cfg.train.min_lr_ratio)


def test_the_eta_counts_days_and_never_overflows():
    # time.gmtime wrapped at 24 h (an 11-day run said 13:30:10) and raised past ~1e16 s: a rank's
    # traceback at the first log line of train.max_steps=10**18.
    from mnemo.train.loop import eta_text

    assert eta_text(59) == "00:00:59" and eta_text(3600 * 25 + 61) == "1d 01:01:01"
    assert eta_text(11 * 86400 + 13 * 3600) == "11d 13:00:00"
    assert eta_text(6.7e16) == eta_text(float("inf")) == "> 10,000,000d"


def test_start_lines_state_the_batch_what_it_was_and_the_budget():
    cfg = cfg_of("train.batch_size=4", "train.global_batch_size=8", "train.max_tokens=5000")
    old = batching_of({"world_size": 2, "config": {"train": {"batch_size": 4, "global_batch_size": 0}}})
    lines = start_lines(cfg, batching(cfg, 1), old, total_steps(cfg, 8))
    assert lines[0] == "global batch 8 = 1 rank x 4 slots x 2 accumulation (was 2 ranks x 4 x 1)"
    assert lines[1] == "token budget: train.max_tokens=5000 -> 10 steps of 512 tokens (train.max_steps=30 not used)"
    assert start_lines(cfg_of(), batching(cfg_of(), 2), None, 30) == [
        "global batch 8 = 2 ranks x 4 slots x 1 accumulation"
    ]


def test_a_token_budget_counts_what_was_read_before_a_resume_at_another_global_batch():
    """max_tokens 1,200 at 128 tokens a step (2 ranks x 2 slots x T 32) is 10 steps. Relaunched on 1 rank (64 a
    step), the count was made afresh: 19 steps, 1,856 tokens read, 55% over; preempted at step 14 on 1 rank
    (896 tokens) then relaunched on 2 ranks, 10 steps: it stopped at once with a quarter of the budget unread."""
    cfg = cfg_of("model.segment_len=32", "train.batch_size=2", "train.max_tokens=1200")
    assert total_steps(cfg, 4) == 10 and total_steps(cfg, 2) == 19
    assert resumed_total_steps(cfg, 2, step=10, tokens_seen=1280) == 10  # the budget is spent: done
    assert resumed_total_steps(cfg, 4, step=14, tokens_seen=896) == 14 + 3  # 304 tokens left: 3 steps of 128
    assert resumed_total_steps(cfg, 2, step=5, tokens_seen=640) == 5 + 9  # 560 left: 9 steps of 64
    # Resumed again at 64 a step (its step-10 checkpoint, 960 read): still 14, not a count made afresh (19).
    assert resumed_total_steps(cfg, 2, step=10, tokens_seen=960) == 14
    for step in range(11):  # at the tokens per step it was read at: the same as a run never stopped
        assert resumed_total_steps(cfg, 4, step=step, tokens_seen=step * 128) == total_steps(cfg, 4) == 10
    assert resumed_total_steps(cfg_of("train.max_steps=7"), 2, step=5, tokens_seen=640) == 7  # no budget
    old = Batching(1, 2, 1)
    lines = start_lines(cfg, Batching(2, 2, 1), old, 17, done=(14, 896))
    assert lines[1] == (
        "token budget: train.max_tokens=1200 -> 17 steps (896 tokens read in 14 steps, then 3 of 128)"
        " (train.max_steps=30 not used)"
    )


def test_a_warmup_not_shorter_than_the_run_is_warned_with_the_rate_it_peaks_at():
    """train.warmup_steps >= the run's steps: the run ends in its warmup, which nothing said."""
    assert warmup_note(cfg_of("train.warmup_steps=10", "train.max_steps=11"), 11) is None
    f = lr_lambda(cfg_of("train.warmup_steps=20", "train.max_steps=10", "train.lr=1e-3"))
    assert max(f(i) for i in range(10)) == f(9) == 0.5  # the rate it logs: 5e-4 on the last step, no decay
    note = warmup_note(cfg_of("train.warmup_steps=20", "train.max_steps=10", "train.lr=1e-3"), 10)
    assert note.startswith("train.warmup_steps=20 is not below the run's 10 steps: the run ends in its warmup")
    assert "peaks at 0.0005 (train.lr=0.001)" in note
    # A token budget sets the step count the note compares with.
    assert "the run's 10 steps" in warmup_note(cfg_of("train.warmup_steps=10", "train.max_tokens=5000"), 10)


def test_repartition_note_names_what_changed():
    # A batch-size-only change used to read "re-partitioned from 1 to 1 ranks".
    old = batching_of({"world_size": 1, "config": {"train": {"batch_size": 4}}})
    note = repartition_note(old, Batching(1, 2, 1))
    assert note.startswith("re-partitioned from 4 to 2 slots per rank;")
    assert "restart from their beginning" in note
    assert repartition_note(
        batching_of({"world_size": 2, "config": {"train": {"batch_size": 4}}}), Batching(1, 4, 1)
    ).startswith("re-partitioned from 2 to 1 ranks;")


def test_repartition_note_names_a_changed_global_batch_size():
    """Only train.global_batch_size changed (8 -> 4 on one rank of 2 slots: slot groups 4 -> 2): the note read
    "re-partitioned from 2 to 2 slots per rank". It names the slot groups now, and each part that changed."""
    old = batching_of({"world_size": 1, "config": {"train": {"batch_size": 2, "global_batch_size": 8}}})
    assert old == Batching(1, 2, 4)
    assert repartition_note(old, Batching(1, 2, 2)).startswith(
        "re-partitioned from 4 to 2 slot groups (accumulation steps) per rank;"
    )
    assert repartition_note(old, Batching(2, 1, 2)).startswith(
        "re-partitioned from 1 to 2 ranks, from 2 to 1 slots per rank, from 4 to 2 slot groups "
        "(accumulation steps) per rank;"
    )


# ------------------------------------------------------------------ the engine's accumulation boundaries (in-process)


@pytest.fixture(scope="module")
def accum(world1, tmp_path_factory):  # noqa: F811 (test_hardening_trainer's one-rank process group)
    """(cfg, engine) of a 1-rank DeepSpeed engine with 2 accumulation micro-steps of 2 slots (ZeRO-2, fp32)."""
    import deepspeed

    from mnemo.model import MemoryTransformer
    from mnemo.train import engine as build

    # Stand-in streams of random tokens (no dataset): data.path is never opened.
    cfg = config(Path("unused"), tmp_path_factory.mktemp("unused"), "train.batch_size=2", "train.global_batch_size=4")
    model = MemoryTransformer(build.model_args_from_config(cfg, VOCAB))
    opt = torch.optim.AdamW(build.param_groups(model, 0.1), lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config=build.deepspeed_config(cfg, False, False, batching(cfg, 1).accum),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, build.lr_lambda(cfg)),
    )
    return cfg, engine


def accum_loop(cfg, engine, tmp_path, policy: str = "skip"):
    from mnemo.train import loop

    info = loop.DistInfo(
        rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1, restart=0, requeue=0
    )
    B, T = cfg.train.batch_size, cfg.model.segment_len
    streams = SlotGroups(lambda g, G: StandInStreams(B, T, VOCAB), 0, 2, 1)
    memory = MemoryGroups([engine.module.init_state(B), engine.module.init_state(B)])
    cfg.train.nan_policy = policy
    return loop.TrainLoop(
        cfg,
        engine,
        streams,
        memory,
        info,
        torch.device("cpu"),
        Metrics(),
        loop.StepLog(tmp_path / "s.jsonl", True),
        model_flops=1.0,
        use_cuda=False,
        batching=batching(cfg, 1),
    )


def params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def nan_at_call(monkeypatch, n: int) -> None:
    """The n-th truncated-BPTT window from now (1-based; 2 per step here) has a NaN loss."""
    from mnemo.train import loop

    real, calls = loop.corpus_window_loss, [0]

    def window(*a, **kw):
        total, state, plain, count = real(*a, **kw)
        calls[0] += 1
        return (total * float("nan"), state, plain, count) if calls[0] == n else (total, state, plain, count)

    monkeypatch.setattr(loop, "corpus_window_loss", window)


def test_one_update_per_step_over_both_micro_steps_and_a_nan_micro_step_skips_it(accum, tmp_path, monkeypatch):
    cfg, engine = accum
    lp = accum_loop(cfg, engine, tmp_path)
    before, sched, g = params(engine), engine.lr_scheduler.last_epoch, engine.global_steps
    assert lp.train_step(0)
    # One optimizer step and one LR step for two micro-steps; both groups read (their streams moved on).
    assert engine.global_steps == g + 1 and engine.lr_scheduler.last_epoch == sched + 1
    assert not all(torch.equal(a, b) for a, b in zip(before, params(engine)))
    assert [s.n for s in lp.streams.groups] == [1, 1]
    assert lp.counters.tokens_seen == 4 * cfg.model.segment_len * cfg.memory.bptt_segments
    # A NaN loss at the first micro-step of step 2 (skip): its gradients poison the sum, DeepSpeed refuses the
    # update; the second micro-step still runs (its streams stay in step) and the next step trains.
    nan_at_call(monkeypatch, 1)
    before, sched = params(engine), engine.lr_scheduler.last_epoch
    assert lp.train_step(1) is True
    assert all(torch.equal(a, b) for a, b in zip(before, params(engine))), "the bad update was applied"
    assert engine.lr_scheduler.last_epoch == sched and (2, {"train/nan": 1.0}) in lp.tracker.logged
    assert [s.n for s in lp.streams.groups] == [2, 2]
    assert int(lp.memory.states[0].pos.max()) == 0 < int(lp.memory.states[1].pos.max())  # group 0 emptied
    assert lp.train_step(2) is True and not all(torch.equal(a, b) for a, b in zip(before, params(engine)))
    # stop: ends before that micro-step's backward.
    stop = accum_loop(cfg, engine, tmp_path / "stop", "stop")
    nan_at_call(monkeypatch, 2)
    assert stop.train_step(0) is False and stop.nonfinite == "loss"


def test_a_resume_takes_its_first_step_at_this_runs_schedule():
    # The param groups' lr came back from the checkpoint, set by the saved run's schedule: a 5-step run
    # (warmup 5) saved its floor, and step 6 of its 7-step continuation ran at it, not at this schedule's.
    from types import SimpleNamespace

    from mnemo.train.engine import apply_optimizer_config

    cfg = cfg_of("train.max_steps=7", "train.warmup_steps=5", "train.lr=0.003")
    opt = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}],
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        betas=(cfg.train.beta1, cfg.train.beta2),
    )
    opt.param_groups[1]["weight_decay"] = 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    for _ in range(5):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        g["lr"] = 0.0003  # as the checkpoint of the 5-step run left it
    apply_optimizer_config(SimpleNamespace(optimizer=opt, lr_scheduler=sched), cfg)
    assert [g["lr"] for g in opt.param_groups] == [cfg.train.lr * lr_lambda(cfg)(5)] * 2 == [cfg.train.lr] * 2


# ------------------------------------------------------------------ a resume takes only the checkpoint's own rank files


def two_rank_checkpoint(folder: Path, step: int = 6) -> tuple[Path, dict]:
    """A checkpoint of 2 ranks x 2 slots (global batch 4) after ``step`` steps, its rank files as the trainer
    writes them (streams, memory: rank r's rows filled with 10 (r + 1), counters); and its meta.json."""
    from mnemo.train.checkpoint import rank_file_of
    from mnemo.train.state import Counters, RNGState

    config = {"train": {"batch_size": 2, "global_batch_size": 4}}
    meta = {"step": step, "tokens_seen": 32 * step, "world_size": 2, "config": config}
    ranks = [groups(ArraySource(docs()), r, 1, 2) for r in range(2)]
    for _ in range(step):
        for g in ranks:
            next(g)
    p = folder / "checkpoints" / f"step_{step:08d}"
    p.mkdir(parents=True)
    for r, g in enumerate(ranks):
        mem = MemoryGroups([memory(2, 10.0 * (r + 1))])
        parts = {"streams": g, "memory": mem, "rng": RNGState(), "counters": Counters(step, 32 * step)}
        torch.save(rank_file_of(parts), p / f"rank_{r:05d}.pt")
    return p, meta


def resume(p: Path, meta: dict, rank: int, world: int) -> tuple[bool, MemoryGroups]:
    """Restore rank ``rank`` of ``world`` (global batch 4, 2 slots) from checkpoint ``p``: (exact, its memory)."""
    from mnemo.train.checkpoint import CheckpointManager
    from mnemo.train.state import Counters

    accum = 4 // (2 * world)
    mgr = CheckpointManager(p.parent.parent, rank=rank, world_size=world)
    mem = MemoryGroups([memory(2, 0.0) for _ in range(accum)])
    mgr.states = {"streams": groups(ArraySource(docs()), rank, accum, world), "memory": mem, "counters": Counters()}
    if world == meta["world_size"]:
        from mnemo.train.state import RNGState

        mgr.states["rng"] = RNGState()
    return mgr.restore(p, meta), mem


def _swap(p: Path) -> None:
    a, b = p / "rank_00000.pt", p / "rank_00001.pt"
    a.rename(p / "t")
    b.rename(a)
    (p / "t").rename(b)


def _edit_top(p: Path, **fields) -> None:
    d = torch.load(p / "rank_00001.pt", weights_only=False)
    d.update(fields)
    torch.save(d, p / "rank_00001.pt")


def _edit_streams(p: Path, **fields) -> None:
    d = torch.load(p / "rank_00001.pt", weights_only=False)
    d["streams"].update(fields)
    torch.save(d, p / "rank_00001.pt")


@pytest.mark.parametrize(
    "damage,needle",
    [
        (
            lambda p, q: shutil.copy(p / "rank_00000.pt", p / "rank_00001.pt"),
            r"rank_00001\.pt: streams\.rank: 0, not 1",
        ),
        (lambda p, q: _swap(p), r"rank_00000\.pt: streams\.rank: 1, not 0"),
        (lambda p, q: shutil.copy(q / "rank_00001.pt", p), r"rank_00001\.pt: step: 9, not meta\.json's 6"),
        (lambda p, q: _edit_streams(p, rank=3, world_size=4), r"rank_00001\.pt: streams\.rank: 3, not 1"),
        (lambda p, q: _edit_top(p, step=torch.tensor([6, 6])), r"rank_00001\.pt: step: .*, not meta\.json's 6"),
        (lambda p, q: _edit_streams(p, world_size=4), r"rank_00001\.pt: streams\.world_size: 4, not 2"),
        (lambda p, q: _edit_streams(p, batch_size=4), r"rank_00001\.pt: streams\.batch_size: 4, not 2"),
        (
            lambda p, q: (p / "rank_00001.pt").unlink(),
            r"rank_00001\.pt: missing \(meta\.json records a world size of 2: rank_00000\.pt to rank_00001\.pt\)",
        ),
        (
            lambda p, q: shutil.copy(q / "rank_00001.pt", p / "rank_00002.pt"),
            r"rank_00002\.pt: not one of its rank files",
        ),
        (lambda p, q: (p / "rank_00001.pt").rename(p / "rank_1.pt"), r"rank_1\.pt: not one of its rank files"),
    ],
)
@pytest.mark.parametrize("world", [1, 2])
def test_a_resume_refuses_rank_files_that_are_not_the_checkpoints_own(tmp_path, damage, needle, world):
    """At another world size every rank_*.pt in the folder was taken, in name order, as the old ranks' files: a
    duplicated, swapped, stale (a later step's), foreign (another world size's or batch's) or misnamed one resumed
    '(exact)' with documents read twice or never and memory rows in another group's slots (streams were matched by
    their rank field, memory by file order). Now the names must be exactly rank_00000.pt .. those of meta.json's
    world size, and each file's step and stream record its name's and meta.json's: one line naming the file, at
    any world size (the same world size let a stale file through, and said 'got 1 rank states' for a swap)."""
    p, meta = two_rank_checkpoint(tmp_path / "run")
    q, _ = two_rank_checkpoint(tmp_path / "later", step=9)
    resumed = [resume(p, meta, r, world) for r in range(world)]  # the clean checkpoint: exact, every group's rows
    assert all(exact for exact, _ in resumed)
    assert all(m.equal(memory(2, 10.0 * g)) for g, m in enumerate((s for _, mem in resumed for s in mem.states), 1))
    damage(p, q)
    with pytest.raises(UserError, match=rf"^checkpoint {p}: {needle}"):
        for r in range(world):  # each rank reads its own file at the same world size: one of them refuses
            resume(p, meta, r, world)


def test_an_old_rank_files_memory_must_hold_its_slots_at_another_world_size(tmp_path):
    """Memory rows are taken by offset across the old rank files: a tensor of rank_00000.pt twice its slots
    gave group 1 rows of group 0 ('(exact)', a wrong loss), where the same file at the same world size was
    refused. Now each old file's tensors must hold its slots (batch size x accumulation): one line naming the
    file and the entry, at either world size."""
    p, meta = two_rank_checkpoint(tmp_path / "run")
    f = p / "rank_00000.pt"
    d = torch.load(f, weights_only=False)
    d["memory"]["layers.0.stm_k"] = torch.cat([d["memory"]["layers.0.stm_k"]] * 2)
    torch.save(d, f)
    with pytest.raises(UserError, match=rf"^checkpoint {p}: rank_00000\.pt: memory\.layers\.0\.stm_k: shape \(4, 1"):
        resume(p, meta, 0, 1)
    with pytest.raises(UserError, match=rf"^checkpoint {p}: rank_00000\.pt: memory\.layers\.0\.stm_k: shape \(4, 1"):
        resume(p, meta, 0, 2)
    with pytest.raises(ValueError, match=r"^old rank 0: layers\.0\.stm_k: shape \(4, 1, 2, 2\) does not hold"):
        MemoryGroups([memory(2, 0.0), memory(2, 0.0)]).load_regrouped([d["memory"], memory(2, 1.0).state_dict()], 0, 2)
