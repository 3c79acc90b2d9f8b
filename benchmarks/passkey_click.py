"""When does passkey retrieval "click"? Two model recipes, the same episodic curriculum, side by side.

    python benchmarks/passkey_click.py [--steps 700] [--threads 2] [--recipes A,B] [--set KEY=VALUE ...]

A recipe is MLP/init/embeddings, e.g. ``swiglu/scaled/tied`` (mnemo's default
backbone at the debug size) and ``gelu/fan_in/untied`` (what the demo uses).
Each is trained from the same seed on the trainer's own passkey episodes
(train/episodes.py) in one process, with everything else from
configs/demo.yaml (``--set key=value`` overrides any of it): B = 16, AdamW
lr 2e-3 (wd 0.1, betas 0.9/0.95), the demo's data (stdlib corpus, vocab 4096,
T = 128, STM 128, LTM 1024 in layer 2, k = 16), the answer weighted 5 and the
rest of the episode train.answer_context_weight, and the curriculum: half of
the batches at D = max D, half a uniform D in [0, max D]; max D starts at 1
and grows by one when the training exact match at max D passes 0.7 (mean of
5 checks), up to 8.

Prints, per recipe: the step at which the exact match first passes 0.7 at
D = 1 (the copy circuit has formed), the step at which max D reaches 8, and
held-out passkey exact match at D = 1, 8, 32 after training (filler from
held-out documents, store sized for D = 32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

T, B_DEFAULT = 128, 16


def load_data(data_dir: Path):
    import numpy as np

    from mnemo.data_pipeline.streams import MDSSource
    from mnemo.data_pipeline.tokenizer import Tokenizer
    from mnemo.demo import DemoSettings, prepare_data
    from mnemo.evaluation.heldout import read_docs

    prepare_data(DemoSettings(passkey_docs=0), data_dir, T)
    src = MDSSource(str(data_dir))
    train = np.concatenate(read_docs(src, 0.1, heldout=False))
    heldout = read_docs(src, 0.1)
    return Tokenizer(str(data_dir / "tokenizer.model")), train, heldout


def run_recipe(recipe: str, tok, filler, heldout, steps: int, batch: int, seed: int, overrides: list[str] = ()) -> dict:
    import torch

    from mnemo.model import MemoryTransformer
    from mnemo.train.config import load_config
    from mnemo.train.episodes import EpisodeSource, Episodes, PasskeyCurriculum
    from mnemo.evaluation.inference import with_ltm_capacity
    from mnemo.evaluation.scoring import passkey_report
    from mnemo.train.engine import lr_lambda, model_args_from_config, param_groups

    mlp, init, emb = recipe.split("/")
    # The demo's model, schedule, episode weights and curriculum (configs/demo.yaml), with the recipe
    # and any --set overrides; the episodes are the trainer's own (train/episodes.py).
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"model.mlp={mlp}", f"model.init={init}", f"model.embeddings={emb}", f"train.max_steps={steps}", *overrides],
    )
    torch.manual_seed(seed)
    model = MemoryTransformer(model_args_from_config(cfg, tok.vocab_size))
    tc, pk = cfg.train, cfg.train.passkey
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    episodes = Episodes(
        EpisodeSource(tok, filler, T, batch, tc.answer_weight, tc.answer_context_weight, seed, 0, max_keys=pk.max_keys),
        PasskeyCurriculum(pk.start_distance, pk.max_distance, pk.promote_exact, pk.promote_window, seed),
        fraction=1.0,
        ltm_only_at_max=pk.ltm_only_at_max,
    )
    cur, reached_max = episodes.curriculum, None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        res = episodes.forward(model, torch.device("cpu"), torch.float32, has_memory=True)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        if res.batch.at_max and cur.update(float(res.exact) / batch, step):
            print(f"  {recipe}: step {step} max D -> {cur.current}", flush=True)
            if cur.current == pk.max_distance:
                reached_max = step
        if step % 100 == 0:
            print(
                f"  {recipe}: step {step} loss {res.loss.item():.3f} max D {cur.current} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    model.eval()
    with torch.no_grad():
        with_ltm_capacity(model, 32 * T)
        rep = passkey_report(model, tok, heldout, T, [1, 8, 32], trials=48, seed=1, batch_size=24)
    return {
        "clicked": cur.clicked_at or None,
        "reached8": reached_max,
        "exact": rep["accuracy"],
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=B_DEFAULT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default="swiglu/scaled/tied,gelu/fan_in/untied")
    p.add_argument("--data", default=None, help="prepared demo data without passkey documents (default: a temp dir)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every recipe, e.g. train.answer_context_weight=1 (repeatable)",
    )
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok, filler, heldout = load_data(Path(args.data or tmp))
        results = {
            r: run_recipe(r, tok, filler, heldout, args.steps, args.batch, args.seed, args.set)
            for r in args.recipes.split(",")
        }
    print(f"\nepisodic passkey curriculum, {args.steps} steps of B={args.batch}, seed {args.seed}:")
    print(f"{'recipe':<22}{'click step':>11}{'max D=8 at':>12}{'D=1':>7}{'D=8':>7}{'D=32':>7}{'seconds':>9}")
    for r, res in results.items():
        e = res["exact"]
        print(
            f"{r:<22}{str(res['clicked'] or '-'):>11}{str(res['reached8'] or '-'):>12}"
            f"{e['1']:>7.2f}{e['8']:>7.2f}{e['32']:>7.2f}{res['seconds']:>9.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
