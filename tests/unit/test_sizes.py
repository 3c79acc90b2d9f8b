"""Named sizes: each builds on the meta device, and its closed-form parameter
count and FLOPs per token agree with a direct count of the built model
(parameters: sum of numel; FLOPs: torch's FlopCounterMode over one forward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mnemo.model import SIZES, MemoryTransformer, ModelArgs, flops_per_token, param_count
from mnemo.model.sizes import REFERENCE_VOCAB

VOCAB = REFERENCE_VOCAB
T = 256  # tokens of the counted forward


def meta_model(size: str, **kw) -> MemoryTransformer:
    with torch.device("meta"):
        return MemoryTransformer(ModelArgs.from_size(size, VOCAB, **kw))


def counted_forward(model: MemoryTransformer, T: int) -> dict[str, int]:
    """FLOPs by aten op of one forward of [1, T] tokens with empty memory, on the meta device.

    On meta, SDPA runs its math decomposition, so attention shows up as two
    bmm per layer over the full [T, keys] rectangle (masked entries included).
    """
    with torch.device("meta"):
        tokens = torch.zeros(1, T, dtype=torch.long)
        state = model.init_state(1)
    counter = FlopCounterMode(display=False)
    with counter:
        model(tokens, state)
    return {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def within(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.mark.parametrize("size", sorted(SIZES))
def test_size_builds_on_meta_and_param_count_is_exact(size):
    for ltm in ("none", "knn"):
        model = meta_model(size, ltm_kind=ltm, ltm_layers=(-2,))
        assert all(p.is_meta for p in model.parameters())
        direct = sum(p.numel() for p in model.parameters())  # tied weights counted once
        n_ltm = 1 if ltm == "knn" else 0
        assert direct == param_count(SIZES[size], VOCAB, n_ltm) == model.expected_num_params()


@pytest.mark.parametrize("size", sorted(SIZES))
def test_flops_per_token_matches_a_flop_counter(size):
    counts = counted_forward(meta_model(size), T)
    dense, attn = counts.get("aten.mm", 0), counts.get("aten.bmm", 0)
    assert dense > 0 and attn > 0 and set(counts) <= {"aten.mm", "aten.bmm"}
    # Only the causal part of the [T, T] rectangle is model work: (T+1)/2T of it.
    direct = 3 * (dense + attn * (T + 1) / (2 * T)) / T  # training = forward + 2x backward
    assert within(MemoryTransformer.flops_per_token(meta_model(size), T), direct)
    assert within(flops_per_token(SIZES[size], VOCAB, context=T / 2), direct)


def test_flops_with_short_and_long_term_memory():
    M, N, k = 256, 1024, 16
    base = meta_model("small", stm_length=M)
    with_ltm = meta_model("small", stm_length=M, ltm_kind="knn", ltm_capacity=N, ltm_topk=k, ltm_layers=(3, -2))
    c0, c1 = counted_forward(base, T), counted_forward(with_ltm, T)
    # Short-term memory: every query also sees the M memory keys.
    frac = (T * M + T * (T + 1) / 2) / (T * (M + T))
    direct = 3 * (c0["aten.mm"] + c0["aten.bmm"] * frac) / T
    assert within(base.flops_per_token(T), direct)
    # Long-term memory adds, per LTM layer, the kNN search over the N stored
    # keys (a no-grad lookup: not model FLOPs by convention, so taken out) and
    # attention over the k retrieved keys.
    d = SIZES["small"].d_model
    search = 2 * 2 * T * N * d  # two LTM layers, [T, d] x [d, N] each
    extra = 3 * (c1["aten.bmm"] - c0["aten.bmm"] - search) / T
    assert c1["aten.mm"] == c0["aten.mm"]
    assert extra > 0
    assert within(with_ltm.flops_per_token(T) - base.flops_per_token(T), extra)


def test_nominal_sizes_are_what_their_names_say():
    # Nominal parameter counts at the reference vocabulary, +-15%.
    nominal = {"small": 125e6, "medium": 350e6, "large": 1.3e9, "xl": 7e9}
    for size, n in nominal.items():
        assert abs(param_count(SIZES[size], VOCAB) - n) <= 0.15 * n, size
    assert param_count(SIZES["debug"], 4096) < 2e6


@pytest.mark.parametrize("size", ["debug", "small"])
def test_gelu_mlp_and_untied_embeddings_are_counted_exactly(size):
    model = meta_model(size, mlp="gelu", tie_embeddings=False, ltm_kind="knn", ltm_layers=(-2,))
    direct = sum(p.numel() for p in model.parameters())
    assert direct == model.expected_num_params()
    # The GELU MLP (hidden 3/2 d_ff) has the SwiGLU MLP's parameters; untying adds one vocab x d matrix.
    assert direct == param_count(SIZES[size], VOCAB, 1) + VOCAB * SIZES[size].d_model
    counts = counted_forward(meta_model(size, mlp="gelu"), T)
    direct_flops = 3 * (counts["aten.mm"] + counts["aten.bmm"] * (T + 1) / (2 * T)) / T
    assert within(meta_model(size, mlp="gelu").flops_per_token(T), direct_flops)


def test_fan_in_init_uses_each_layers_fan_in():
    torch.manual_seed(0)
    d = SIZES["small"].d_model
    untied = MemoryTransformer(ModelArgs.from_size("debug", 4096, init="fan_in", mlp="gelu", tie_embeddings=False))
    a = untied.args
    assert within(untied.blocks[0].attn.q.weight.std().item(), (3 * a.d_model) ** -0.5, 0.05)
    assert within(untied.blocks[0].mlp.down.weight.std().item(), (3 * 3 * a.d_ff // 2) ** -0.5, 0.05)
    assert within(untied.tok_emb.weight.std().item(), 1.0, 0.05)
    assert within(untied.lm_head.weight.std().item(), (3 * a.d_model) ** -0.5, 0.05)
    # Tied, the embedding is the LM head too: it takes the head's scale, so first logits stay O(1).
    tied = MemoryTransformer(ModelArgs.from_size("debug", 4096, init="fan_in"))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert within(tied.tok_emb.weight.std().item(), (3 * a.d_model) ** -0.5, 0.05)
    # The default ("scaled") is unchanged: 0.02, residual projections / sqrt(2 L).
    scaled = meta_model("small")
    assert scaled.args.linear_std(d) == 0.02
    assert scaled.args.linear_std(d, residual_out=True) == pytest.approx(0.02 / (2 * 12) ** 0.5)


@pytest.mark.parametrize("tied", [False, True])
def test_flops_count_the_span_projections_of_queries_and_keys(tied):
    """qk_span S: the long-term layers' q and k each also project S - 1 inputs (tied: one matrix used twice),
    matmuls the MFU's FLOPs left out."""
    kw = dict(stm_length=64, ltm_kind="knn", ltm_capacity=256, ltm_topk=8, ltm_layers=(2,), ltm_smear_keys=False)
    plain, span = meta_model("debug", **kw), meta_model("debug", **kw, ltm_qk_span=5, ltm_qk_tied=tied)
    c0, c1 = counted_forward(plain, T), counted_forward(span, T)
    extra = 3 * (c1["aten.mm"] - c0["aten.mm"]) / T
    assert extra == 3 * 2 * 2 * 4 * SIZES["debug"].d_model ** 2  # 3x forward, 2 FLOPs, q and k, [4d, d]
    assert within(span.flops_per_token(T) - plain.flops_per_token(T), extra)


@pytest.mark.parametrize(
    "qk_span,tied,mix,gate",
    [
        (1, False, "fixed", False),
        (5, True, "fixed", False),
        (3, False, "fixed", False),
        (5, True, "input", False),
        (5, True, "input", True),
        (3, False, "fixed", True),
    ],
)
def test_a_value_span_is_counted_in_params_and_flops(qk_span, tied, mix, gate):
    """value_span S': the long-term layers' values mix in the S' - 1 values before (a weight per head and
    offset), and project the values of the S' - 1 inputs carried from the last segment (W_v on S' - 1 more
    rows per segment): both counted exactly, beside a query/key span of any kind. Value mix "input" adds
    the keys' part of the weights ([d, (S'-1) H] per layer, one row of it per token); the value gate each token's
    factor ([d, H] per layer, one row per token read: the segment's and the S' - 1 carried)."""
    kw = dict(stm_length=64, ltm_kind="knn", ltm_capacity=256, ltm_topk=8, ltm_layers=(1, 2), ltm_smear_keys=False)
    kw.update(ltm_qk_span=qk_span, ltm_qk_tied=tied)
    plain = meta_model("debug", **kw)
    spanned = meta_model("debug", **kw, ltm_value_span=7, ltm_value_mix=mix, ltm_value_gate=gate)
    d, h = SIZES["debug"].d_model, SIZES["debug"].n_heads
    chosen = d * 6 * h if mix == "input" else 0
    gated = d * h if gate else 0
    for m in (plain, spanned):
        assert sum(p.numel() for p in m.parameters()) == m.expected_num_params()
    assert spanned.expected_num_params() - plain.expected_num_params() == 2 * (6 * h + chosen + gated)  # 2 layers
    c0, c1 = counted_forward(plain, T), counted_forward(spanned, T)
    extra = 3 * (c1["aten.mm"] - c0["aten.mm"]) / T
    # 3x forward, 2 FLOPs, 2 layers: 6 rows of [d, d] per segment, and [d, 6 H] per token with "input"; with the
    # gate [d, H] per token and per carried row.
    assert extra == 3 * 2 * 2 * (6 * d**2 / T + chosen + gated * (T + 6) / T)
    assert within(spanned.flops_per_token(T) - plain.flops_per_token(T), extra)
