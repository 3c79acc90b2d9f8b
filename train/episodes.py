"""Episodic passkey training: a second batch source beside the corpus streams.

Why episodes and not passkey documents in the stream. Retrieval is learned
suddenly: the answer loss sits at chance until a copy circuit forms, and
whether it forms within a few hundred steps depends on what each batch asks
(docs/demo.md has the measurements). Passkey documents mixed into the
document stream did not get there in 700 steps, in eight variants. What did
is the episode below, measured by benchmarks/passkey_click.py:

- every row of the batch is one fresh passkey document of D + 1 segments
  (key in segment 0, question at the end of segment D, filler drawn anew
  from training documents), so every row ends in a question;
- segments 0..D-1 only fill the memory, without gradient (the memory is
  detached between steps anyway); the loss is the LM loss of segment D with
  the answer weighted ``train.answer_weight``;
- an adaptive curriculum on D: max D starts at ``start_distance``; every
  other episode step uses D = max D, the others a uniform D in [0, max D]
  (D = 0 and 1 give the shared projections a full gradient); max D grows by
  one when the exact match of the max-D steps, averaged over the last
  ``promote_window`` of them, passes ``promote_exact``.

A ``train.passkey.fraction`` of the optimizer steps are episode steps; the
rest read the corpus streams, whose memory state is not touched by episodes.

Every rank must run the same number of forwards per step (ZeRO-3 gathers
parameters collectively), so D comes from a generator that is identical on
all ranks and the curriculum decides on the exact match averaged over ranks.
The documents themselves come from a per-rank generator. Both generators and
the curriculum are part of the checkpoint (``state_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mnemo.data_pipeline.passkey import DEPTHS, filler_stream, make_multikey_sample, make_passkey_sample


def is_episode_step(step: int, fraction: float) -> bool:
    """Whether optimizer step ``step`` (0-based) is an episode step.

    Spreads the episode steps evenly: step s is one when floor((s+1) f)
    exceeds floor(s f); fraction 0.5 alternates corpus, episode, corpus, ...
    """
    if fraction <= 0:
        return False
    return int((step + 1) * fraction + 1e-9) > int(step * fraction + 1e-9)


@dataclass
class EpisodeBatch:
    tokens: torch.Tensor  # [B, (D+1)T + 1] int64: D+1 segments and the EOS
    weight: torch.Tensor  # [B, T] float32: loss weight of segment D's targets
    answer: torch.Tensor  # [B, T] bool: the target is an answer digit
    distance: int  # D: segments between the key (segment 0) and the question (segment D)
    at_max: bool  # a max-D batch: its exact match drives the curriculum


class PasskeyCurriculum:
    """Max distance D of the episodes, raised as retrieval succeeds. Same on every rank."""

    def __init__(self, start_distance: int, max_distance: int, promote_exact: float, promote_window: int, seed: int):
        self.max_distance, self.promote_exact, self.promote_window = max_distance, promote_exact, promote_window
        self.current = min(start_distance, max_distance)  # max D the episodes use now
        self.history: list[float] = []  # exact match of the max-D batches since the last promotion
        self.episodes = 0
        self.clicked_at = 0  # optimizer step of the first promotion (0 = not yet)
        self.rng = np.random.default_rng([int(seed), 0x9A55])  # no rank in the seed: identical on all ranks

    def next_distance(self) -> tuple[int, bool]:
        """(D of the next episode batch, whether it is a max-D batch)."""
        self.episodes += 1
        if self.episodes % 2 == 1:
            return self.current, True
        return int(self.rng.integers(0, self.current + 1)), False

    def update(self, exact: float, step: int) -> bool:
        """Record a max-D batch's exact match (mean over ranks); True when max D was raised."""
        self.history.append(float(exact))
        recent = self.history[-self.promote_window :]
        if len(recent) < self.promote_window or sum(recent) / len(recent) <= self.promote_exact:
            return False
        self.clicked_at = self.clicked_at or step
        if self.current >= self.max_distance:
            return False
        self.current += 1
        self.history = []
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "history": list(self.history),
            "episodes": self.episodes,
            "clicked_at": self.clicked_at,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.current, self.history = int(sd["current"]), [float(x) for x in sd["history"]]
        self.episodes, self.clicked_at = int(sd["episodes"]), int(sd["clicked_at"])
        self.rng.bit_generator.state = sd["rng"]


class EpisodeSource:
    """Fresh passkey documents for one rank: ``batch(D)`` -> EpisodeBatch."""

    def __init__(
        self,
        tokenizer: Any,
        filler: Any,
        segment_len: int,
        batch_size: int,
        answer_weight: float,
        context_weight: float,
        seed: int,
        rank: int,
        max_keys: int = 1,
    ):
        self.tokenizer, self.T, self.B = tokenizer, int(segment_len), int(batch_size)
        self.answer_weight, self.context_weight = float(answer_weight), float(context_weight)
        self.filler = filler_stream(filler)
        self.depths = list(DEPTHS)
        self.max_keys = int(max_keys)
        self.rng = np.random.default_rng([int(seed), int(rank), 0xE915])
        # Fail at start-up, not mid-run, when the segment cannot hold a key or a question.
        make_passkey_sample(tokenizer, self.filler, 0, "start", self.T, np.random.default_rng(0))
        if self.max_keys > 1:  # the most facts at every depth, facts placed at random: a few draws each
            for depth in self.depths:
                for seed in range(4):
                    make_multikey_sample(
                        tokenizer, self.filler, 0, self.max_keys, self.T, np.random.default_rng(seed), depth=depth
                    )

    def _row(self, distance: int) -> dict:
        """One document: with max_keys > 1, 1..max_keys door facts ("The pass key of door N is ...")."""
        depth = self.depths[int(self.rng.integers(0, len(self.depths)))]
        if self.max_keys == 1:
            return make_passkey_sample(self.tokenizer, self.filler, distance, depth, self.T, self.rng)
        keys = int(self.rng.integers(1, self.max_keys + 1))
        return make_multikey_sample(self.tokenizer, self.filler, distance, keys, self.T, self.rng, depth=depth)

    def batch(self, distance: int, at_max: bool = False) -> EpisodeBatch:
        T = self.T
        rows = [self._row(distance) for _ in range(self.B)]
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))  # [B, (D+1)T + 1]
        answer = torch.zeros(self.B, T, dtype=torch.bool)
        for i, r in enumerate(rows):
            # The answer digits are the last tokens of segment D (before EOS); as
            # targets of segment D's inputs they sit at T-1-len .. T-2.
            answer[i, T - 1 - r["answer_len"] : T - 1] = True
        weight = torch.where(answer, self.answer_weight, self.context_weight).float()
        return EpisodeBatch(tokens=tokens, weight=weight, answer=answer, distance=distance, at_max=at_max)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.rng.bit_generator.state = sd["rng"]


@dataclass
class EpisodeResult:
    loss: torch.Tensor  # the loss to optimize (answer weighted), with graph
    plain_sum: torch.Tensor  # sum of the plain CE over segment D's targets (detached)
    n: torch.Tensor  # number of those targets
    exact: torch.Tensor  # rows whose answer is right at every digit (greedy = argmax)
    batch: EpisodeBatch


class Episodes:
    """What the trainer holds: this rank's document source, the shared curriculum, the step schedule."""

    def __init__(
        self, source: EpisodeSource, curriculum: PasskeyCurriculum, fraction: float, ltm_only_at_max: bool = False
    ):
        self.source, self.curriculum, self.fraction = source, curriculum, fraction
        self.ltm_only_at_max = ltm_only_at_max

    def is_step(self, step: int) -> bool:
        return is_episode_step(step, self.fraction)

    def forward(self, model: Any, device: torch.device, dtype: torch.dtype, has_memory: bool) -> EpisodeResult:
        """Draw a batch at the curriculum's next D and run it: D segments without gradient, then segment D.

        model  ``model(tokens [B, T], state, logits=True) -> (logits [B, T, V] or None, state)``, with ``init_state``
               on it or on its ``.module`` (a DeepSpeed engine)
        has_memory  False: the earlier segments cannot reach segment D, so they are not run.
        A max-D batch runs without the short-term memory when ``ltm_only_at_max``
        (a model with long-term memory only): its key can then only come from the
        long-term store, so retrieval is learned from D = 1 on instead of after
        the short-term cache has solved D = 1 (docs/demo.md).
        """
        from mnemo.train.losses import lm_loss

        D, at_max = self.curriculum.next_distance()
        eb = self.source.batch(D, at_max)
        T, B = self.source.T, self.source.B
        tokens = eb.tokens.to(device)
        core = getattr(model, "module", model)
        has_ltm = getattr(getattr(core, "args", None), "ltm_kind", "none") != "none"
        if self.ltm_only_at_max and at_max and has_ltm:
            state = core.init_state(B, stm=False, device=device, dtype=dtype)
        else:
            state = core.init_state(B, device=device, dtype=dtype)
        if has_memory:
            with torch.no_grad():
                for i in range(D):
                    _, state = model(tokens[:, i * T : (i + 1) * T], state, logits=False)
        logits, _ = model(tokens[:, D * T : (D + 1) * T], state)  # [B, T, V]
        targets = tokens[:, D * T + 1 : (D + 1) * T + 1]  # [B, T]
        answer = eb.answer.to(device)
        loss, plain, n = lm_loss(logits, targets, eb.weight.to(device), torch.ones_like(answer))
        right = (logits.detach().argmax(-1) == targets) | ~answer
        return EpisodeResult(loss=loss, plain_sum=plain.detach() * n, n=n, exact=right.all(1).sum().float(), batch=eb)

    def summary(self) -> dict[str, Any]:
        c = self.curriculum
        return {"max_distance": c.current, "clicked_at": c.clicked_at, "episode_steps": c.episodes}

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "curriculum": self.curriculum.state_dict()}

    def load_state_dict(self, sd: dict[str, Any], own_rank: bool = True) -> None:
        self.curriculum.load_state_dict(sd["curriculum"])
        if own_rank:
            self.source.load_state_dict(sd["source"])


def training_filler(source: Any, val_fraction: float, max_docs: int, seed: int) -> np.ndarray:
    """Filler tokens for training episodes: up to ``max_docs`` training (not held-out) corpus documents.

    Held-out documents are the evaluation's filler, so they are never used
    here; synthetic passkey documents are skipped. The documents are a fixed
    function of (dataset, seed), the same on every rank.
    """
    from mnemo.evaluation.heldout import read_docs

    order = np.random.default_rng([int(seed), 0xF111]).permutation(source.num_samples)
    docs = read_docs(source, val_fraction, heldout=False, order=order, max_docs=max_docs)
    if not docs:
        from mnemo.train.errors import UserError

        raise UserError(
            "train.passkey.fraction: the dataset has no training corpus documents to draw passkey filler from"
        )
    return np.concatenate(docs)


__all__ = [
    "EpisodeBatch",
    "EpisodeResult",
    "EpisodeSource",
    "Episodes",
    "PasskeyCurriculum",
    "is_episode_step",
    "training_filler",
]
