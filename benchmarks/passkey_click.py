"""When does passkey retrieval "click"? Two model recipes, the same episodic curriculum, side by side.

    python benchmarks/passkey_click.py [--steps 700] [--threads 2] [--recipes A,B]

A recipe is MLP/init/embeddings, e.g. ``swiglu/scaled/tied`` (mnemo's default
backbone at the debug size) and ``gelu/fan_in/untied`` (what the demo uses).
Each is trained from the same seed on the same kind of episodes, in one
process (2 threads, B = 16, AdamW lr 2e-3 with mnemo's defaults wd 0.1 and
betas 0.9/0.95): the demo's data (stdlib corpus, vocab 4096, T = 128, STM 128,
LTM 1024 in layer 2, k = 16). This is the curriculum of ../shared/MEMORY-NOTES.md:
an episode is one passkey document of D + 1 segments; segments 0..D-1 only
fill the memory (no gradient), the loss is the LM loss of segment D with the
answer digits weighted 5x; half of the batches use D = max D, half a uniform
D in [0, max D]; max D starts at 1 and grows by one when the training exact
match at max D passes 0.7 (mean of 5 checks), up to 8.

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

    from data_pipeline.split import heldout_mask
    from data_pipeline.streams import MDSSource
    from data_pipeline.tokenizer import Tokenizer
    from launch.demo import DemoSettings, prepare_data

    prepare_data(DemoSettings(passkey_docs=0), data_dir, T)
    src = MDSSource(str(data_dir))
    held = heldout_mask(src.num_samples, 0.1)
    docs = [np.asarray(src.get(i)["tokens"], dtype=np.int64) for i in range(src.num_samples)]
    train = np.concatenate([d for d, h in zip(docs, held) if not h])
    heldout = [d for d, h in zip(docs, held) if h]
    return Tokenizer(str(data_dir / "tokenizer.model")), train, heldout


def run_recipe(recipe: str, tok, filler, heldout, steps: int, batch: int, seed: int) -> dict:
    import numpy as np
    import torch

    from data_pipeline.passkey import DEPTHS, make_passkey_sample
    from model import MemoryTransformer
    from train.config import load_config
    from train.evaluate import passkey_report, with_ltm_capacity
    from train.trainer import lm_loss, lr_lambda, model_args_from_config, param_groups

    mlp, init, emb = recipe.split("/")
    # The demo's model and schedule; optimizer settings are mnemo's defaults.
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.mlp={mlp}", f"model.init={init}", f"model.embeddings={emb}",
                                            f"train.max_steps={steps}"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MemoryTransformer(model_args_from_config(cfg, tok.vocab_size))
    tc = cfg.train
    opt = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    max_d, hist, clicked, reached8 = 1, [], None, None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        D = max_d if step % 2 else int(rng.integers(0, max_d + 1))
        samples = [make_passkey_sample(tok, filler, D, list(DEPTHS)[int(rng.integers(0, 3))], T, rng)
                   for _ in range(batch)]
        tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))  # [B, (D+1)T + 1]
        n_ans = samples[0]["answer_len"]
        state = model.init_state(batch)
        with torch.no_grad():
            for i in range(D):
                _, state = model(tokens[:, i * T:(i + 1) * T], state)
        logits, _ = model(tokens[:, D * T:(D + 1) * T], state)  # [B, T, V]
        targets = tokens[:, D * T + 1:(D + 1) * T + 1]
        weight = torch.ones(batch, T)
        answer = slice(T - n_ans - 1, T - 1)  # the answer digits are the last targets before EOS
        weight[:, answer] = 5.0
        loss = lm_loss(logits, targets, weight, torch.ones(batch, T, dtype=torch.bool))[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        if step % 2:  # a max-D batch: update the curriculum
            exact = float((logits[:, answer].argmax(-1) == targets[:, answer]).all(1).float().mean())
            hist.append(exact)
            if len(hist) >= 5 and sum(hist[-5:]) / 5 > 0.7:
                clicked = clicked or step
                if max_d < 8:
                    max_d, hist = max_d + 1, []
                    if max_d == 8:
                        reached8 = step
        if step % 100 == 0:
            print(f"  {recipe}: step {step} loss {loss.item():.3f} max D {max_d} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    model.eval()
    with torch.no_grad():
        with_ltm_capacity(model, 32 * T)
        rep = passkey_report(model, tok, heldout, T, [1, 8, 32], trials=48, seed=1, batch_size=24)
    return {"clicked": clicked, "reached8": reached8, "exact": rep["accuracy"], "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=B_DEFAULT)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default="swiglu/scaled/tied,gelu/fan_in/untied")
    p.add_argument("--data", default=None, help="prepared demo data without passkey documents (default: a temp dir)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tok, filler, heldout = load_data(Path(args.data or tmp))
        results = {r: run_recipe(r, tok, filler, heldout, args.steps, args.batch, args.seed)
                   for r in args.recipes.split(",")}
    print(f"\nepisodic passkey curriculum, {args.steps} steps of B={args.batch}, seed {args.seed}:")
    print(f"{'recipe':<22}{'click step':>11}{'max D=8 at':>12}{'D=1':>7}{'D=8':>7}{'D=32':>7}{'seconds':>9}")
    for r, res in results.items():
        e = res["exact"]
        print(f"{r:<22}{str(res['clicked'] or '-'):>11}{str(res['reached8'] or '-'):>12}"
              f"{e['1']:>7.2f}{e['8']:>7.2f}{e['32']:>7.2f}{res['seconds']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
