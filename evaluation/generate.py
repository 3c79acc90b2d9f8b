"""Generation with memory: read an arbitrarily long prompt, then sample.

Tokens reach the model exactly as a training document does: in segments of
T tokens from the document start, each segment read with the memory state
left by the previous one. ``SegmentReader`` keeps that invariant while tokens
arrive one at a time: the state is only advanced when a segment is complete;
the tokens of the segment in progress are re-read (from the state at the
segment's start) together with each new token. So the state never holds a
token twice, and the local context of every token is what it was in
training: the segment so far plus the short-term memory. That costs a
forward of up to T tokens per new token.

``mode="step"`` is the cheap alternative: every new token is one 1-token
forward carrying the state (the returned state already holds all earlier
tokens). Its local context is then the short-term memory alone (the last M
tokens), which differs from training, and a model without short-term memory
sees nothing but the current token.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.inference import core_model, eval_mode, model_device, torch_seed


def check_sampling(temperature: float, top_p: float) -> None:
    """EvalError unless temperature is finite and >= 0 (0 = greedy) and top_p is in (0, 1].

    A NaN or infinite temperature would make every probability NaN (torch.multinomial
    then fails mid-generation); a negative one would silently mean greedy.
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EvalError(f"temperature: must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise EvalError(f"top_p: must be in (0, 1], got {top_p!r}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from logits [V]: greedy when temperature is 0, else nucleus sampling (check_sampling's values).

    top_p keeps the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept). A logit of -inf is a
    token never chosen; EvalError for a NaN or +inf logit, or all -inf: a
    diverged model's output, which made torch.multinomial fail with a traceback
    (and greedy decoding pick token 0 silently).
    """
    # One reduction, one host sync per token on CUDA (`a.any() or b.any()` synced for each test).
    if bool(logits.isnan().any() | logits.isposinf().any() | logits.isneginf().all()):
        raise EvalError(
            "the model's output holds NaN or infinity: its weights are not finite or too large "
            "(a run that diverged; use an earlier checkpoint)"
        )
    if temperature <= 0:
        return int(logits.argmax())
    # The max subtracted before the division: a subnormal temperature (1e-310) made logits / temperature
    # overflow to inf, softmax then NaN and torch.multinomial fail. Now the top logit is 0 and every other
    # one finite or -inf at any temperature > 0 (the limit: greedy). float64: a stable cumsum.
    scaled = logits.double()
    probs = torch.softmax((scaled - scaled.max()) / temperature, dim=-1).cpu()  # [V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each token
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class SegmentReader:
    """Feeds token streams of B slots to the model segment by segment, as training does.

    feed(tokens [B, n]) -> logits [B, V] at the last token fed. Complete
    segments advance ``state``; the partial segment in progress is kept in
    ``pending`` and re-read with the next tokens (mode "segment"), or each
    call advances the state at once (mode "step").
    """

    def __init__(self, model: Any, state: Any, segment_len: int, mode: str = "segment"):
        if mode not in ("segment", "step"):
            raise ValueError(f"unknown decoding mode {mode!r} (segment or step)")
        self.model, self.state, self.T, self.mode = model, state, int(segment_len), mode
        self.pending: torch.Tensor | None = None  # [B, p], p < T: the segment in progress

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mode == "step":
            last = None
            for s0 in range(0, tokens.shape[1], self.T):
                final = s0 + self.T >= tokens.shape[1]  # only the last segment's prediction is needed
                logits, self.state = self.model(tokens[:, s0 : s0 + self.T], self.state, logits=final)
                last = logits[:, -1] if final else None
            return last
        buf = tokens if self.pending is None else torch.cat((self.pending, tokens), dim=1)  # [B, p+n]
        last = None
        while buf.shape[1] >= self.T:
            final = buf.shape[1] == self.T  # nothing after it: its last prediction is the one returned
            logits, self.state = self.model(buf[:, : self.T], self.state, logits=final)  # a complete segment: commit
            last, buf = (logits[:, -1] if final else None), buf[:, self.T :]
        if buf.shape[1] > 0:
            logits, _ = self.model(buf, self.state)  # partial: read again with the next tokens
            last = logits[:, -1]
        self.pending = buf if buf.shape[1] > 0 else None
        return last


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    segment_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_token: Callable[[int], None] | None = None,
    stop_at_eos: bool = True,
    on_prompt_segment: Callable[[int, int], None] | None = None,
    mode: str = "segment",
) -> list[int]:
    """Continue ``prompt_ids``; returns the new token ids (EOS ends it and is not returned).

    on_token(id) is called as each token is chosen; on_prompt_segment(i, n)
    after prompt segment i of n has been read. Deterministic for a fixed seed.
    """
    if not len(prompt_ids):
        raise EvalError("generate: the prompt is empty")

    def stop(slot: int, out: list[int]) -> bool:
        if on_token is not None:
            on_token(out[-1])
        return False

    eos = getattr(tokenizer, "eos_id", None) if stop_at_eos else None
    return generate_batch(
        model,
        [prompt_ids],
        segment_len,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_id=eos,
        should_stop=stop,
        on_prompt_segment=on_prompt_segment,
        mode=mode,
    )[0]


@torch.inference_mode()
def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    segment_len: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | Sequence[int] = 0,
    eos_id: int | None = None,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    on_prompt_segment: Callable[[int, int], None] | None = None,
    mode: str = "segment",
) -> list[list[int]]:
    """Continue several prompts at once, one stream slot each; returns the new ids of each prompt.

    All slots advance in lockstep from their document start: the tokens every
    prompt has (the shortest prompt's length) are read together segment by
    segment, then one token per step, a slot still inside its prompt feeding
    its next prompt token and the others their last chosen token. So each
    slot reads exactly the token stream ``generate`` would give it alone. A
    slot stops at ``eos_id`` (not returned), after ``max_new_tokens``, or when
    should_stop(slot, its new ids) is true (called after each chosen token;
    that token is kept); a stopped slot reads padding (its own last token),
    which comes after everything it returns. Slot r samples with its own
    generator seeded ``seed`` (or ``seed[r]``, one seed per prompt: independent samples of one prompt
    given twice): the same tokens as ``generate`` with that seed.
    """
    ids = [[int(t) for t in p] for p in prompts]
    if not ids or any(not p for p in ids):
        raise EvalError("generate: a prompt is empty")
    check_sampling(temperature, top_p)
    B, T = len(ids), int(segment_len)
    device = model_device(model)
    with eval_mode(model):
        seeds = [int(seed)] * B if isinstance(seed, int) else [int(x) for x in seed]
        if len(seeds) != B:
            raise EvalError(f"generate: {len(seeds)} seeds for {B} prompts")
        gens = [torch.Generator().manual_seed(torch_seed(x)) for x in seeds]
        p0 = min(len(p) for p in ids)
        common = torch.tensor([p[:p0] for p in ids], dtype=torch.long, device=device)  # [B, p0]
        reader = SegmentReader(model, core_model(model).init_state(B, device=device), T, mode)
        n_seg = -(-p0 // T)
        last = None
        for i, s0 in enumerate(range(0, p0, T)):
            last = reader.feed(common[:, s0 : s0 + T])  # [B, V]
            if on_prompt_segment is not None:
                on_prompt_segment(i, n_seg)
        outs: list[list[int]] = [[] for _ in range(B)]
        done = [int(max_new_tokens) <= 0] * B
        pos = p0  # tokens each slot has read
        while not all(done):
            col = []
            for r in range(B):
                if pos < len(ids[r]):  # still inside its prompt
                    col.append(ids[r][pos])
                    continue
                if not done[r]:
                    tok = sample_next(last[r].float(), temperature, top_p, gens[r])
                    if eos_id is not None and tok == eos_id:
                        done[r] = True
                    else:
                        outs[r].append(tok)
                        stop = should_stop is not None and should_stop(r, outs[r])
                        done[r] = stop or len(outs[r]) >= max_new_tokens
                col.append(outs[r][-1] if outs[r] else ids[r][-1])  # a stopped slot reads padding
            if all(done):
                break  # no forward for a token nobody will sample after
            last = reader.feed(torch.tensor(col, dtype=torch.long, device=device)[:, None])
            pos += 1
        return outs


class TextStreamer:
    """Prints the decoded text of a growing token list as it grows.

    SentencePiece decodes whole sequences (a character can span several byte
    tokens), so the text is re-decoded and only the new suffix is written;
    when a later token changes the tail (an incomplete UTF-8 byte run), the
    unstable tail is held back until it settles. Used as a context manager around the generation, it ends
    the line of text when an exception leaves it (end_line).
    """

    def __init__(self, tokenizer: Any, stream=None):
        self.tok, self.ids, self.printed = tokenizer, [], ""
        self.stream = stream or sys.stdout

    def __call__(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        stable = text.rstrip("\ufffd")  # a replacement char may become a real one with the next byte
        if stable.startswith(self.printed):
            self.stream.write(stable[len(self.printed) :])
            self.stream.flush()
            self.printed = stable

    def end_line(self) -> None:
        """End the line the text stopped on, when generation stops short (Ctrl-C, an error): the message that
        follows on stderr ("mnemo: interrupted", on the same terminal) then starts on a line of its own instead
        of after the text. On the way out of an error: a stream that cannot be written is left as it is."""
        if self.printed and not self.printed.endswith("\n"):
            try:
                self.stream.write("\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed pipe, a closed stream: the error on the way out says it
                pass

    def __enter__(self) -> TextStreamer:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:  # generation stopped short
            self.end_line()

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        if text.startswith(self.printed):
            self.stream.write(text[len(self.printed) :])
        self.stream.write("\n")
        self.stream.flush()
