"""Long-context evaluation: does the memory let the model use context beyond its segment?

Three measurements, all reading documents segment by segment with memory,
exactly as training does (segment s of a document is its tokens
[sT, (s+1)T) as inputs and [sT+1, (s+1)T+1) as targets; a slot's memory is
reset when it starts a new document):

* loss by position: mean next-token loss bucketed by the position p of the
  input token in its document (p tokens of the document precede it):
  [0, T), [T, 2T), [2T, 4T), [4T, 8T), ... Bucket [0, T) is segment 0, where
  memory holds nothing; later buckets show what memory adds.
* ablations: the same documents with the memory as trained, long-term memory
  off, short-term memory off, and both off (``MemoryTransformer.init_state``
  flags; the weights are the same).
* passkey retrieval: fresh synthetic documents (``mnemo.data_pipeline.passkey``)
  built on held-out filler, the key D segments before the question; greedy
  decoding of the answer digits; exact-match accuracy per D and depth.

Every function here is deterministic and makes the same sequence of forward
calls for the same inputs, so all ranks of a ZeRO-3 job can call it together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mnemo.data_pipeline.passkey import DEPTHS, filler_stream, make_multikey_sample, make_passkey_sample
from mnemo.evaluation.generate import SegmentReader
from mnemo.evaluation.inference import core_model, model_device
from mnemo.evaluation.progress import progress_bar, segments_to_read, teacher_forced_segments

LN2 = math.log(2.0)

# name -> (stm, ltm) flags of init_state, in table order.
ABLATIONS: dict[str, tuple[bool, bool]] = {
    "memory": (True, True),
    "no_ltm": (True, False),
    "no_stm": (False, True),
    "no_memory": (False, False),
}


# ------------------------------------------------------------------ helpers


def _has_memory(model: Any) -> tuple[bool, bool]:
    """(has STM, has LTM) of the model's architecture; unknown models: both."""
    args = getattr(core_model(model), "args", None)
    if args is None:
        return True, True
    return getattr(args, "stm_length", 1) > 0, getattr(args, "ltm_kind", "knn") != "none"


def bucket_lower(positions: np.ndarray, segment_len: int) -> np.ndarray:
    """Lower bound of each position's bucket: [0,T), [T,2T), [2T,4T), [4T,8T), ...

    positions [N] int (tokens of the document preceding the input token).
    """
    s = np.asarray(positions, dtype=np.int64) // segment_len
    # frexp(s) = m * 2**e with m in [0.5, 1): floor(log2 s) = e - 1, exact for integers.
    _, e = np.frexp(np.maximum(s, 1).astype(np.float64))
    return np.where(s == 0, 0, segment_len * (np.int64(1) << (e.astype(np.int64) - 1)))


# ---------------------------------------------------------- loss by position


@torch.inference_mode()
def _position_losses(
    model: Any,
    docs: Sequence[np.ndarray],
    segment_len: int,
    batch_size: int,
    stm: bool,
    ltm: bool,
    progress: bool = False,
    bucket_len: int | None = None,
) -> tuple[dict[int, float], dict[int, int], dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Summed loss and token count per bucket lower bound, in all and per document ([n_docs] each).

    The documents are read in segments of ``segment_len``; the buckets are those of
    ``bucket_len`` (default ``segment_len``): a baseline read with another segment
    length is bucketed by the memory model's, so that a bucket is the same token
    positions in both (``ablation_table``).

    B slots read documents in order; a slot that finishes its document takes
    the next one and its memory is reset. The tail segment of a document is
    padded; padding comes after the real tokens, so causality keeps it out of
    their predictions, and the slot is reset before its next document.
    """
    T = int(segment_len)
    docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    docs = [d for d in docs if d.size >= 2]
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    doc_sums: dict[int, np.ndarray] = {}  # bucket -> [n_docs] summed loss (bootstrap over documents)
    doc_counts: dict[int, np.ndarray] = {}  # bucket -> [n_docs] tokens
    if not docs:
        return sums, counts, doc_sums, doc_counts
    B = max(1, min(int(batch_size), len(docs)))
    device = model_device(model)
    state = core_model(model).init_state(B, stm=stm, ltm=ltm, device=device)
    slot_doc = [-1] * B
    slot_off = [0] * B
    next_doc = 0
    desc = f"loss by position (stm={stm}, ltm={ltm})"
    bar = progress_bar(segments_to_read([d.size for d in docs], T), desc, progress)
    while True:
        reset = np.zeros(B, dtype=bool)
        for b in range(B):
            d = slot_doc[b]
            if d >= 0 and slot_off[b] < docs[d].size - 1:
                continue  # still inside its document
            if next_doc < len(docs):
                slot_doc[b], slot_off[b], reset[b] = next_doc, 0, True
                next_doc += 1
            else:
                slot_doc[b] = -1
        if all(d < 0 for d in slot_doc):
            break
        x = np.zeros((B, T), dtype=np.int64)
        y = np.zeros((B, T), dtype=np.int64)
        valid = np.zeros((B, T), dtype=bool)
        pos = np.zeros((B, T), dtype=np.int64)
        for b in range(B):
            if slot_doc[b] < 0:
                continue  # idle slot: reads padding, its outputs are ignored
            o = slot_off[b]
            chunk = docs[slot_doc[b]][o : o + T + 1]
            n = chunk.size - 1
            x[b, :n], y[b, :n], valid[b, :n] = chunk[:-1], chunk[1:], True
            pos[b, :n] = o + np.arange(n)
            slot_off[b] = o + T
        if reset.any():
            state = state.reset(torch.from_numpy(reset).to(device))
        logits, state = model(torch.from_numpy(x).to(device), state)  # [B, T, V]
        nll = (
            F.cross_entropy(logits.float().flatten(0, 1), torch.from_numpy(y).to(device).flatten(), reduction="none")
            .view(B, T)
            .double()
            .cpu()
            .numpy()
        )
        lower = bucket_lower(pos[valid], int(bucket_len or T))
        vals = nll[valid]
        which = np.broadcast_to(np.asarray(slot_doc, dtype=np.int64)[:, None], (B, T))[valid]  # document of each
        for lo in np.unique(lower):
            sel = lower == lo
            sums[int(lo)] = sums.get(int(lo), 0.0) + float(vals[sel].sum())
            counts[int(lo)] = counts.get(int(lo), 0) + int(sel.sum())
            np.add.at(doc_sums.setdefault(int(lo), np.zeros(len(docs))), which[sel], vals[sel])
            np.add.at(doc_counts.setdefault(int(lo), np.zeros(len(docs))), which[sel], 1.0)
        if bar is not None:
            bar.update(int(sum(d >= 0 for d in slot_doc)))
    if bar is not None:
        bar.close()
    return sums, counts, doc_sums, doc_counts


def _summarize(
    sums: dict[int, float],
    counts: dict[int, int],
    doc_sums: dict[int, np.ndarray] | None = None,
    doc_counts: dict[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    total_n = sum(counts.values())
    total = sum(sums.values()) / total_n if total_n else float("nan")
    out = {
        "loss_by_position": {str(k): sums[k] / counts[k] for k in sorted(sums)},
        "tokens_by_position": {str(k): counts[k] for k in sorted(counts)},
        "loss": total,
        "bits_per_token": total / LN2,
        "tokens": total_n,
    }
    if doc_sums is not None and doc_counts is not None:
        # Per document and bucket (not JSON): what the bootstrap intervals resample.
        out["doc_loss_sums"] = {str(k): doc_sums[k] for k in sorted(doc_sums)}
        out["doc_token_counts"] = {str(k): doc_counts[k] for k in sorted(doc_counts)}
    return out


def loss_by_position(
    model: Any, docs: Sequence[np.ndarray], segment_len: int, batch_size: int, stm: bool = True, ltm: bool = True
) -> dict[str, float]:
    """Mean loss per position bucket: {"0": x, "128": y, "256": z, ...} plus
    "loss" (all tokens), "bits_per_token" and "tokens".

    Bucket keys are the bucket's lower bound (digit strings); the other keys
    are not digits. docs: token ids of whole documents (EOS last, as stored).
    """
    s = _summarize(*_position_losses(model, docs, segment_len, batch_size, stm, ltm)[:2])
    out: dict[str, float] = dict(s["loss_by_position"])
    out.update(loss=s["loss"], bits_per_token=s["bits_per_token"], tokens=float(s["tokens"]))
    return out


def ablation_table(
    model: Any,
    docs: Sequence[np.ndarray],
    segment_len: int,
    batch_size: int,
    names: Sequence[str] = tuple(ABLATIONS),
    progress: bool = False,
    bucket_len: int | None = None,
) -> dict[str, dict[str, Any]]:
    """{ablation: {"loss_by_position", "tokens_by_position", "loss", "bits_per_token", "tokens",
    "doc_loss_sums", "doc_token_counts"}}: the last two {bucket: [n_docs] array} per document (not JSON).

    Memory the architecture does not have cannot be switched off, so
    configurations that coincide (e.g. "no_ltm" of a model without LTM) are
    computed once and share the result. ``bucket_len`` (default ``segment_len``):
    the segment length whose buckets the positions fall in, e.g. the memory
    model's for a baseline read with another segment length.
    """
    has_stm, has_ltm = _has_memory(model)
    done: dict[tuple[bool, bool], dict[str, Any]] = {}
    out = {}
    for name in names:
        stm, ltm = ABLATIONS[name]
        key = (stm and has_stm, ltm and has_ltm)
        if key not in done:
            done[key] = _summarize(
                *_position_losses(model, docs, segment_len, batch_size, key[0], key[1], progress, bucket_len)
            )
        out[name] = done[key]
    return out


# ------------------------------------------------------------------ passkey


@torch.inference_mode()
def score_greedy(
    model: Any, samples: Sequence[dict], segment_len: int, batch_size: int, stm: bool = True, ltm: bool = True
) -> list[np.ndarray]:
    """Greedy answers: for each sample the answer_len tokens the model generates after its prompt.

    The prompt (tokens[:answer_start]) is read segment by segment from the
    document start, carrying the memory; then each answer token is the argmax
    of the last logits and is fed back (``evaluation.generate.SegmentReader``: the
    tokens of the last segment see each other as in training, so a model
    without short-term memory still sees the question). Samples with the same
    prompt and answer length share a batch.
    """
    T = int(segment_len)
    device = model_device(model)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((int(s["answer_start"]), int(s["answer_len"])), []).append(i)
    preds: list[np.ndarray | None] = [None] * len(samples)
    for (start, alen), idx in groups.items():
        for c in range(0, len(idx), batch_size):
            chunk = idx[c : c + batch_size]
            prompt = torch.from_numpy(
                np.stack([np.asarray(samples[i]["tokens"][:start], dtype=np.int64) for i in chunk])
            ).to(device)  # [b, P]
            reader = SegmentReader(model, core_model(model).init_state(len(chunk), stm=stm, ltm=ltm, device=device), T)
            last = reader.feed(prompt)  # [b, V]
            out = []
            for j in range(alen):
                nxt = last.argmax(-1)  # [b]
                out.append(nxt)
                if j + 1 < alen:
                    last = reader.feed(nxt[:, None])
            got = torch.stack(out, dim=1).cpu().numpy()  # [b, alen]
            for r, i in enumerate(chunk):
                preds[i] = got[r]
    return preds  # type: ignore[return-value]


@torch.inference_mode()
def continuation_scores(
    model: Any,
    seqs: Sequence[Sequence[int]],
    starts: Sequence[int],
    segment_len: int,
    stm: bool = True,
    ltm: bool = True,
    pad_id: int = 0,
    tick: Callable[[int], Any] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    """One batch, one slot per sequence: (argmax, loss) at each token of seqs[r][starts[r]:], and the final state.

    Slot r reads seqs[r] (without its last token) from its first token,
    segment by segment with memory, as training reads a document; starts[r]
    >= 1 (the first token has nothing to predict it). Shorter sequences are
    padded with ``pad_id`` after their end: causality keeps the padding out of
    their predictions. Returns per slot argmax [n_r] and loss [n_r] (nats,
    n_r = len(seqs[r]) - starts[r]) and the memory state after the longest
    input (its ``pos``: tokens read per slot, padding included). ``tick(k)``
    after each segment: k slots had inputs in it (summed: ``segments_to_read``).
    """
    T = int(segment_len)
    device = model_device(model)
    lens = [len(s) for s in seqs]
    if any(not 1 <= int(a) <= n for a, n in zip(starts, lens)):
        raise ValueError("continuation_scores: every start must be in [1, len(seq)]")
    B, end = len(seqs), max(lens) - 1  # inputs: everything before the last token of the longest sequence
    toks = np.full((B, max(lens)), int(pad_id), dtype=np.int64)
    for r, s in enumerate(seqs):
        toks[r, : lens[r]] = np.asarray(s, dtype=np.int64)
    x = torch.from_numpy(toks).to(device)  # [B, L]
    lo_r = np.asarray(starts, dtype=np.int64) - 1  # first predicting input position per slot
    hi_r = np.asarray(lens, dtype=np.int64) - 1  # one past the last predicting input position
    state = core_model(model).init_state(B, stm=stm, ltm=ltm, device=device)
    am = np.zeros((B, max(end, 1)), dtype=np.int64)
    nll = np.zeros((B, max(end, 1)), dtype=np.float64)
    for s0 in range(0, end, T):
        s1 = min(s0 + T, end)
        need = bool(((lo_r < s1) & (hi_r > s0)).any())  # some slot predicts a scored token in this segment
        logits, state = model(x[:, s0:s1], state, logits=need)  # [B, <=T, V]
        if tick is not None:
            tick(int((hi_r > s0).sum()))
        if need:
            lg = logits.float()
            am[:, s0:s1] = lg.argmax(-1).cpu().numpy()
            loss = F.cross_entropy(lg.flatten(0, 1), x[:, s0 + 1 : s1 + 1].flatten(), reduction="none")
            nll[:, s0:s1] = loss.view(B, s1 - s0).double().cpu().numpy()
    preds = [am[r, lo_r[r] : hi_r[r]] for r in range(B)]
    losses = [nll[r, lo_r[r] : hi_r[r]] for r in range(B)]
    return preds, losses, state


def score_teacher_forced(
    model: Any,
    samples: Sequence[dict],
    segment_len: int,
    batch_size: int,
    stm: bool = True,
    ltm: bool = True,
    tick: Callable[[int], Any] | None = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(argmax [answer_len], loss [answer_len]) at each answer token, reading the true tokens.

    One pass over each document, segment by segment: no decoding loop. Greedy
    decoding reproduces the answer exactly when every one of these argmaxes
    is the answer token (by induction: each greedy step then sees the same
    tokens as this pass), so exact match computed here equals greedy exact
    match, at the cost of reading the document once. Samples with the same
    answer start and length share a batch (``continuation_scores``, which
    calls ``tick``; summed: ``teacher_forced_segments``).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((int(s["answer_start"]), int(s["answer_len"])), []).append(i)
    preds: list[Any] = [None] * len(samples)
    losses: list[Any] = [None] * len(samples)
    for (start, alen), idx in groups.items():
        for c in range(0, len(idx), batch_size):
            chunk = idx[c : c + batch_size]
            seqs = [np.asarray(samples[i]["tokens"][: start + alen], dtype=np.int64) for i in chunk]
            am, nll, _ = continuation_scores(
                model, seqs, [start] * len(chunk), segment_len, stm=stm, ltm=ltm, tick=tick
            )
            for r, i in enumerate(chunk):
                preds[i], losses[i] = am[r], nll[r]
    return preds, losses


def cell_stats(samples: Sequence[dict], preds: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(exact match [n] bool, fraction of answer tokens right [n]): per document; callers average them over the
    documents (each counts once, whatever its answer's length)."""
    exact, digit = [], []
    for s, p in zip(samples, preds):
        a0, n = int(s["answer_start"]), int(s["answer_len"])
        truth = np.asarray(s["tokens"][a0 : a0 + n])
        hit = np.asarray(p) == truth
        exact.append(bool(hit.all()))
        digit.append(float(hit.mean()))
    return np.array(exact), np.array(digit)


def passkey_samples(
    tokenizer: Any,
    filler: Any,
    segment_len: int,
    distance: int,
    depths: Sequence[str] = tuple(DEPTHS),
    trials: int = 30,
    seed: int = 0,
    n_keys: int = 1,
) -> list[dict]:
    """The ``trials`` documents of one distance: depths in turn, a function of (seed, D, n_keys) only."""
    stream = filler_stream(filler)
    rng = np.random.default_rng([int(seed), int(distance), int(n_keys)])
    out = []
    for i in range(trials):
        dp = depths[i % len(depths)]
        if n_keys == 1:
            s = make_passkey_sample(tokenizer, stream, distance, dp, segment_len, rng)
        else:
            s = make_multikey_sample(tokenizer, stream, distance, n_keys, segment_len, rng, depth=dp)
        s["depth"] = dp
        out.append(s)
    return out


def passkey_report(
    model: Any,
    tokenizer: Any,
    filler_docs: Any,
    segment_len: int,
    distances: Sequence[int],
    depths: Sequence[str] = tuple(DEPTHS),
    trials: int = 30,
    seed: int = 0,
    batch_size: int = 16,
    n_keys: int = 1,
    stm: bool = True,
    ltm: bool = True,
    progress: bool = False,
    decode: str = "teacher_forced",
) -> dict[str, Any]:
    """Passkey retrieval in detail.

    ``trials`` documents per distance D, depths taken in turn (trial i at
    depths[i % len(depths)]). n_keys > 1 uses the multi-key variant (several
    "door" facts, the question names one). Samples depend only on (seed, D,
    n_keys), so the memory model and a baseline see the same documents.
    Exact match is that of greedy decoding; decode="teacher_forced" computes
    it in one pass over each document (see score_teacher_forced), "greedy"
    runs the decoding loop (slower; same exact match).
    Returns {"accuracy": {D: acc}, "by_depth": {D: {depth: acc}},
    "digit_accuracy": {D: fraction of answer tokens whose argmax is right, per
    document, averaged over the documents (teacher-forced; chance 0.1)}, "answer_loss": {D: nats per answer token}
    (teacher-forced only), "trials": n, "exact_count": {D: documents answered exactly}}.
    """
    if decode not in ("teacher_forced", "greedy"):
        raise ValueError(f"unknown decode {decode!r}")
    T = int(segment_len)
    stream = filler_stream(filler_docs)
    acc, by_depth, digit_acc, ans_loss, hits = {}, {}, {}, {}, {}
    # Every distance's documents first (in distance order, as the filler stream is read): the bar's total.
    by_d = {D: passkey_samples(tokenizer, stream, T, D, depths, trials, seed, n_keys) for D in distances}
    desc = "passkey" if n_keys == 1 else f"passkey ({n_keys} keys)"
    if decode == "greedy":  # its decoding loop reads on: a tick per distance
        bar = progress_bar(len(distances), desc, progress, unit="distances")
    else:
        bar = progress_bar(sum(teacher_forced_segments(ss, T) for ss in by_d.values()), desc, progress)
    tick = bar.update if bar is not None and decode != "greedy" else None  # per segment read
    for D in distances:
        samples = by_d[D]
        if decode == "greedy":
            preds = score_greedy(model, samples, T, batch_size, stm=stm, ltm=ltm)
        else:
            preds, losses = score_teacher_forced(model, samples, T, batch_size, stm=stm, ltm=ltm, tick=tick)
            ans_loss[str(D)] = float(np.mean([x.mean() for x in losses])) if trials else float("nan")
        exact, digit = cell_stats(samples, preds)
        cell = [s["depth"] for s in samples]
        acc[str(D)] = float(exact.mean()) if trials else float("nan")
        hits[str(D)] = int(exact.sum())
        digit_acc[str(D)] = float(digit.mean()) if trials else float("nan")
        by_depth[str(D)] = {dp: float(exact[[c == dp for c in cell]].mean()) for dp in depths if dp in cell}
        if bar is not None and decode == "greedy":
            bar.update(1)
    if bar is not None:
        bar.close()
    rep = {
        "accuracy": acc,
        "by_depth": by_depth,
        "digit_accuracy": digit_acc,
        "trials": int(trials),
        "exact_count": hits,
    }
    if ans_loss:
        rep["answer_loss"] = ans_loss
    return rep
