"""Generation with memory: segment-faithful decoding, sampling, determinism, the CLI."""

from __future__ import annotations

import dataclasses
import os
import io
import json
import sysconfig
import types
from pathlib import Path

import pytest
import torch

from mnemo.model import MemoryTransformer, ModelArgs
from mnemo.train.config import Config, to_dict
from mnemo.train.errors import UserError
from mnemo.cli import build_parser
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.generate import SegmentReader, TextStreamer, generate, sample_next

T = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(vocab: int, seed: int = 0) -> MemoryTransformer:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, stm_length=T, ltm_kind="knn", ltm_capacity=512, ltm_topk=4, ltm_layers=(2,))
    return MemoryTransformer(args).eval()


class _Tok:
    eos_id = 2

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_segment_reader_matches_training_segments():
    # Tokens fed one at a time see exactly what teacher-forced training segments see.
    m = _model(300)
    x = torch.randint(4, 300, (2, 3 * T + 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        st, ref = m.init_state(2), []
        for s0 in range(0, x.shape[1], T):
            lg, st = m(x[:, s0 : s0 + T], st)
            ref.append(lg)
        ref = torch.cat(ref, 1)  # [2, L, V]
        r = SegmentReader(m, m.init_state(2), T)
        got = torch.stack([r.feed(x[:, i : i + 1]) for i in range(x.shape[1])], 1)
        assert torch.allclose(got, ref, atol=1e-4)
        # Chunks of any size give the same last logits.
        r2 = SegmentReader(m, m.init_state(2), T)
        r2.feed(x[:, :5])
        assert torch.allclose(r2.feed(x[:, 5:40]), ref[:, 39], atol=1e-4)
        assert r2.pending.shape[1] == 40 % T
        # step mode commits every call: the state holds every token once.
        r3 = SegmentReader(m, m.init_state(2), T, mode="step")
        for i in range(10):
            r3.feed(x[:, i : i + 1])
        assert r3.state.pos.tolist() == [10, 10]


def test_sample_next():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, -1.0])
    assert sample_next(logits, 0.0, 1.0, g) == 1
    # top_p 0.5: only the most likely token (p ~ 0.84) survives.
    assert {sample_next(logits, 1.0, 0.5, g) for _ in range(50)} == {1}
    # no nucleus cut: several tokens appear
    assert len({sample_next(logits, 2.0, 1.0, g) for _ in range(200)}) >= 3


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 1e-320, 5e-324])
def test_sample_next_with_a_subnormal_temperature_is_greedy(temperature):
    # Was: logits / 1e-310 overflowed to inf, softmax gave NaN and torch.multinomial raised "invalid
    # multinomial distribution (sum of probabilities <= 0)" (mnemo generate --temperature 1e-310: exit 1).
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, -1.0, float("-inf")])
    assert {sample_next(logits, temperature, 1.0, g) for _ in range(20)} == {1}
    assert {sample_next(logits, temperature, 0.5, g) for _ in range(20)} == {1}
    assert {sample_next(logits - 5.0, temperature, 1.0, g) for _ in range(20)} == {1}  # all < 0
    assert {sample_next(torch.tensor([2.0, 0.0, 2.0]), temperature, 1.0, g) for _ in range(40)} == {0, 2}  # a tie


def test_seeds_that_differ_only_above_32_bits_draw_different_samples():
    """torch's CPU generator reads 32 bits of a seed: --seed 1, 2**32 + 1 and 2**64 - 2**32 + 1 printed the
    same text. Seeds below 2**32 keep the streams they drew before."""
    from mnemo.evaluation.inference import torch_seed

    m = _model(300)
    prompt = list(range(4, 4 + T + 3))
    out = {s: generate(m, _Tok(), prompt, T, 16, temperature=1.0, seed=s, stop_at_eos=False) for s in (1, 2**32 + 1)}
    out[2**64 - 2**32 + 1] = generate(
        m, _Tok(), prompt, T, 16, temperature=1.0, seed=2**64 - 2**32 + 1, stop_at_eos=False
    )
    assert len({tuple(v) for v in out.values()}) == 3
    assert [torch_seed(s) for s in (0, 1, 2**32 - 1)] == [0, 1, 2**32 - 1]
    assert len({torch_seed(s) for s in (2**32, 2**32 + 1, 2**33, 2**64 - 1)}) == 4
    assert all(0 <= torch_seed(s) < 2**32 for s in (2**32, 2**64 - 1))


def test_training_seeds_that_differ_only_above_32_bits_init_different_weights(monkeypatch):
    """train.seed took [0, 2**64), but 1 and 2**32 + 1 gave the same initial weights (torch reads 32 bits)."""
    from mnemo.train.trainer import Trainer

    weights = []
    for seed in (1, 2**32 + 1):
        t = Trainer.__new__(Trainer)
        t.cfg = types.SimpleNamespace(train=types.SimpleNamespace(seed=seed))
        t.info = types.SimpleNamespace(rank=0)
        t._seed()
        weights.append(torch.randn(8))
    assert not torch.equal(weights[0], weights[1])


def test_generate_long_prompt_deterministic():
    m = _model(300)
    prompt = torch.randint(4, 300, (9 * T + 5,), generator=torch.Generator().manual_seed(2)).tolist()  # 10 segments
    seen, segs = [], []
    a = generate(
        m,
        _Tok(),
        prompt,
        T,
        24,
        temperature=1.0,
        top_p=0.9,
        seed=5,
        on_token=seen.append,
        on_prompt_segment=lambda i, n: segs.append((i, n)),
        stop_at_eos=False,
    )
    b = generate(m, _Tok(), prompt, T, 24, temperature=1.0, top_p=0.9, seed=5, stop_at_eos=False)
    c = generate(m, _Tok(), prompt, T, 24, temperature=1.0, top_p=0.9, seed=6, stop_at_eos=False)
    assert len(a) == 24 and a == b and seen == a
    assert a != c
    assert segs == [(i, 10) for i in range(10)]
    # Greedy continuation = argmax of the teacher-forced logits, token by token.
    g = generate(m, _Tok(), prompt, T, 3, temperature=0.0, stop_at_eos=False)
    full = torch.tensor(prompt + g)[None]
    with torch.no_grad():
        st, logits = m.init_state(1), []
        for s0 in range(0, full.shape[1], T):
            lg, st = m(full[:, s0 : s0 + T], st)
            logits.append(lg)
        logits = torch.cat(logits, 1)[0]
    assert [int(logits[len(prompt) - 1 + i].argmax()) for i in range(3)] == g
    with pytest.raises(EvalError, match="empty"):
        generate(m, _Tok(), [], T, 3)


def test_generate_stops_at_eos():
    class EosModel:
        def init_state(self, b, stm=True, ltm=True, device=None, dtype=None):
            return None

        def __call__(self, tokens, state, logits=True):
            lg = torch.zeros(*tokens.shape, 8)
            lg[..., 2] = 10.0  # EOS always
            return lg, state

        def eval(self):
            pass

    assert generate(EosModel(), _Tok(), [5, 6], 4, 10, temperature=0.0) == []


def test_text_streamer_holds_incomplete_characters():
    class ByteTok:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    s = TextStreamer(ByteTok(), out)
    for b in "hé!".encode("utf-8"):
        s(b)
    s.finish()
    assert out.getvalue() == "hé!\n"


def test_text_streamer_ends_the_line_of_text_cut_short_only():
    class ByteTok:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    for text, shown in [("ab", "ab\n"), ("ab\n", "ab\n"), ("", "")]:
        out = io.StringIO()
        s = TextStreamer(ByteTok(), out)
        for b in text.encode("utf-8"):
            s(b)
        s.end_line()
        assert out.getvalue() == shown


def test_generate_interrupted_says_so_on_a_line_of_its_own(tmp_path, capsys, monkeypatch):
    # Was: Ctrl-C during `mnemo generate` printed "mnemo: interrupted" after the streamed text, on its line
    # (`...sh ikpognmnemo: interrupted`): the text did not end with a newline.
    import mnemo.evaluation.generate as gen
    from mnemo.train.errors import exit_status

    exp = _export_dir(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def fibonacci(n):\n    a, b = 0, 1\n")
    sample, calls = gen.sample_next, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) > 6:
            raise KeyboardInterrupt
        return 65 + len(calls)  # printable text without a newline

    monkeypatch.setattr(gen, "sample_next", interrupted)
    argv = ["generate", str(exp), "--prompt-file", str(prompt), "--max-tokens", "50", "--temperature", "0"]
    args = build_parser().parse_args(argv)
    assert exit_status(lambda: args.func(args)) == 130
    got = capsys.readouterr()
    assert sample is not interrupted and got.err.endswith("mnemo: interrupted\n")
    assert got.out.endswith("\n") and got.out.rstrip("\n") and not got.out[:-1].endswith("\n"), repr(got.out)


def _export_dir(root: Path) -> Path:
    """A random-init debug model as an export dir that load_for_inference reads."""
    from safetensors.torch import save_file

    from mnemo.data_pipeline.tokenizer import train_from_texts

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]
    tok = train_from_texts(
        [f.read_text(encoding="utf-8", errors="replace") for f in files],
        root / "tokenizer.model",
        vocab_size=400,
        num_threads=1,
    )
    m = _model(tok.vocab_size)
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(root / "model.safetensors"))
    (root / "model_args.json").write_text(json.dumps(dataclasses.asdict(m.args)))
    cfg = Config()
    cfg.model.segment_len = T
    (root / "config.json").write_text(json.dumps(to_dict(cfg)))
    return root


def test_generate_cli(tmp_path, capsys):
    exp = _export_dir(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def fibonacci(n):\n    a, b = 0, 1\n" * 12)  # > 8 segments of 16 tokens
    p = build_parser()  # the mnemo CLI's own parser

    def run(*extra):
        args = p.parse_args(["generate", str(exp), "--prompt-file", str(prompt), "--max-tokens", "20", *extra])
        assert args.func(args) == 0
        return capsys.readouterr()

    first, second = run("--seed", "3"), run("--seed", "3")
    assert first.out == second.out and len(first.out) > 1
    assert "segments of 16" in first.err
    args = p.parse_args(["generate", str(exp), "--prompt-file", str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="nope.txt"):
        args.func(args)


def test_generate_reports_reading_a_long_prompt_in_a_log(tmp_path, capsys, monkeypatch):
    """With stderr not a terminal (a log, nohup, SLURM) `mnemo generate` said nothing while it read the prompt
    (a 128K-token prompt: 7 min 23 s): it now writes mnemo eval's progress lines (LineProgress; here one per
    segment, the interval set to 0 instead of a minute)."""
    import mnemo.evaluation.progress as progress

    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)
    exp = _export_dir(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def fibonacci(n):\n    a, b = 0, 1\n" * 12)  # > 8 segments of 16 tokens
    argv = ["generate", str(exp), "--prompt-file", str(prompt), "--max-tokens", "2", "--temperature", "0"]
    args = build_parser().parse_args(argv)
    assert not __import__("sys").stderr.isatty()
    assert args.func(args) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mnemo generate: reading prompt: ")]
    n = int(err.split("tokens = ")[1].split()[0])  # "prompt: N tokens = S segments of T"
    assert n > 8 and len(lines) >= n - 1, err
    assert "segments (100%)" in lines[-1] and "min left" in lines[-1]


def test_generate_refuses_a_store_too_large_for_the_machine_and_takes_ltm_capacity(tmp_path, capsys):
    """A model_args.json with ltm_capacity 2**31 - 1 (a model trained on a bigger machine, or a received one) gave an
    allocation traceback from init_state; --ltm-capacity had no counterpart in generate to lower it."""
    exp = _export_dir(tmp_path)
    a = json.loads((exp / "model_args.json").read_text())
    (exp / "model_args.json").write_text(json.dumps(dict(a, ltm_capacity=2**31 - 1)))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def f(x):\n    return x\n" * 4)
    argv = ["generate", str(exp), "--prompt-file", str(prompt), "--max-tokens", "3", "--temperature", "0"]
    args = build_parser().parse_args(argv)
    with pytest.raises(EvalError, match=r"^the long-term store \(2147483647 entries per layer\) needs at least"):
        args.func(args)
    args = build_parser().parse_args([*argv, "--ltm-capacity", "64"])
    assert args.func(args) == 0 and "(3 tokens generated)" in capsys.readouterr().err


def test_a_prompt_with_a_byte_order_mark_reads_as_prepare_reads_it(tmp_path, capsys):
    """A BOM (Notepad writes one) became three byte tokens that training never saw (prepare drops it); a UTF-16
    prompt with its BOM was refused as not UTF-8."""
    exp = _export_dir(tmp_path)
    text = "def f(x):\n    return x\n"
    outs = []
    for name, data in (("plain", text.encode()), ("bom8", b"\xef\xbb\xbf" + text.encode())):
        (tmp_path / name).write_bytes(data)
        args = build_parser().parse_args(
            ["generate", str(exp), "--prompt-file", str(tmp_path / name), "--max-tokens", "4", "--temperature", "0"]
        )
        assert args.func(args) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out
    assert outs[0].err.splitlines()[0] == outs[1].err.splitlines()[0]  # "prompt: N tokens = ..."
    (tmp_path / "u16").write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    args = build_parser().parse_args(
        ["generate", str(exp), "--prompt-file", str(tmp_path / "u16"), "--max-tokens", "4", "--temperature", "0"]
    )
    assert args.func(args) == 0 and capsys.readouterr().out == outs[0].out


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_generate_refuses_a_non_finite_or_negative_temperature(temperature):
    """NaN made every probability NaN (torch.multinomial failed mid-generation); a negative one meant greedy."""
    m = _model(300)
    with pytest.raises(EvalError, match="temperature: must be a finite number >= 0"):
        generate(m, _Tok(), [5, 6, 7], T, 4, temperature=temperature, stop_at_eos=False)
    with pytest.raises(EvalError, match="top_p: must be in"):
        generate(m, _Tok(), [5, 6, 7], T, 4, temperature=1.0, top_p=float("nan"), stop_at_eos=False)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--temperature", "nan"], "--temperature: must be a finite number >= 0 (0 = greedy), got nan"),
        (["--temperature", "inf"], "--temperature: must be a finite number >= 0 (0 = greedy), got inf"),
        (["--temperature", "-0.5"], "--temperature: must be a finite number >= 0 (0 = greedy), got -0.5"),
        (["--top-p", "nan"], "--top-p: must be in (0, 1], got nan"),
        (["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
        (["--max-tokens", "-1"], "--max-tokens: must be >= 0, got -1"),
        (["--seed", "-1"], "--seed: must be in [0, 2**64 - 1], got -1"),
        (["--seed", str(2**64)], "--seed: must be in [0, 2**64 - 1], got 18446744073709551616"),
        (["--ltm-capacity", "0"], "--ltm-capacity: must be >= 1, got 0"),
        (["--ltm-capacity", "99999999999999999999"], "--ltm-capacity: must be <= 2147483647, got 99999999999999999999"),
    ],
)
def test_generate_cli_checks_sampling_flags_before_loading(tmp_path, flags, needle):
    """Checked first: neither the prompt file nor the checkpoint is read (here neither exists)."""
    args = build_parser().parse_args(
        ["generate", str(tmp_path / "no-ckpt"), "--prompt-file", str(tmp_path / "no-prompt.txt"), *flags]
    )
    with pytest.raises(UserError) as e:
        args.func(args)
    assert str(e.value) == needle


def test_deepspeeds_messages_go_to_stderr_not_into_the_generated_text(tmp_path):
    """`mnemo generate CKPT > out.txt` put DeepSpeed's import warning ("Setting accelerator to CPU") and its
    consolidation messages ("Processing zero checkpoint ...") into out.txt: they are printed to stdout, some
    through a logger holding the stdout of DeepSpeed's import. consolidated_state_dict now runs them with
    stdout sent to stderr (stdout_to_stderr), fd 1 included; stdout is the generated text alone after."""
    import os
    import subprocess
    import sys

    script = (
        "import logging, os, sys\n"
        "from mnemo.train.checkpoint import stdout_to_stderr\n"
        "bound = logging.StreamHandler(sys.stdout)\n"  # a logger made before, holding the real stdout
        "log = logging.getLogger('early'); log.addHandler(bound); log.propagate = False\n"
        "print('text-before', flush=True)\n"
        "with stdout_to_stderr():\n"
        "    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint\n"
        "    from deepspeed.utils import logger\n"
        "    logger.warning('ds-logger'); log.warning('early-logger'); print('ds-print')\n"
        "    os.write(1, b'c-level\\n')\n"
        "print('text-after')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "text-before\ntext-after\n", res.stdout
    for line in ("ds-logger", "early-logger", "ds-print", "c-level"):
        assert line in res.stderr


def test_prompt_file_that_is_not_a_file_or_is_empty_is_named_before_loading(tmp_path):
    """A FIFO, a directory or /dev/stdin was 'no such file'; an empty file was reported after the model load."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "empty.txt").write_text("")
    for prompt, needle in (
        (fifo, "a FIFO (named pipe), not a regular file"),
        (tmp_path, "a directory, not a file"),
        (tmp_path / "empty.txt", "is empty"),
        (tmp_path / "nope.txt", "no such file"),
    ):
        # The checkpoint does not exist: the prompt is checked first.
        args = build_parser().parse_args(["generate", str(tmp_path / "no-ckpt"), "--prompt-file", str(prompt)])
        with pytest.raises(UserError) as e:
            args.func(args)
        assert str(e.value).startswith(f"--prompt-file: {prompt}") and needle in str(e.value), str(e.value)


def test_a_huge_prompt_file_is_refused_before_it_is_read(tmp_path):
    """A 2 GiB prompt was read whole and tokenized (std::bad_alloc, SIGABRT exit 134; 200 MB reached 11 GB)."""
    import resource

    prompt = tmp_path / "huge.txt"
    prompt.write_text("a")
    os.truncate(prompt, 2 << 30)  # sparse: nothing on disk
    args = build_parser().parse_args(["generate", str(tmp_path / "no-ckpt"), "--prompt-file", str(prompt)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(UserError) as e:
        args.func(args)
    assert str(e.value) == (
        f"--prompt-file: {prompt}: 2,147,483,648 bytes, over the 16,777,216-byte bound for this file (16 MiB, some "
        "4 million tokens)"
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: never read


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_sample_next_refuses_a_diverged_models_logits(bad, temperature, top_p):
    """Logits of a run that diverged (train.lr=1e25: weights near 1e25, the forward NaN) made torch.multinomial
    raise "invalid multinomial distribution" (mnemo generate: a traceback, exit 1), and greedy decoding pick
    token 0 silently: now an EvalError (one line, exit 2). -inf on some tokens stays a token never chosen."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 3.0, 1.0, -1.0])
    if bad == "all -inf":
        logits = torch.full((4,), float("-inf"))
    else:
        logits[2] = float(bad)
    with pytest.raises(EvalError, match="NaN or infinity"):
        sample_next(logits, temperature, top_p, g)
    assert sample_next(torch.tensor([0.0, 3.0, float("-inf")]), temperature, top_p, g) == 1
