"""lm-evaluation-harness through mnemo's memory (evaluation.harness), on local task files: no downloads.

A random-init debug model as an export dir; three task YAMLs (multiple
choice, rolling log-likelihood, generate_until) over JSONL files this test
writes. lm-eval's numbers must equal mnemo's own scoring and generation,
and the long contexts (> 8 segments) must be read through memory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.stdlib import stdlib_texts, stdlib_tokenizer

T = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def _yaml(task: str, data: Path, body: str) -> str:
    head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
    return head + "test_split: test\n" + body + "metadata:\n  version: 1.0\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """(export dir, task dir, model, tokenizer, harness module) shared by the tests of this file."""
    from safetensors.torch import save_file

    from mnemo.model import MemoryTransformer, ModelArgs
    from mnemo.train.checkpoint import load_for_inference
    from mnemo.train.config import Config, to_dict

    root = tmp_path_factory.mktemp("lm_eval")
    tok = stdlib_tokenizer(root, 6, vocab_size=400)
    torch.manual_seed(0)
    args = ModelArgs(
        vocab_size=tok.vocab_size, stm_length=T, ltm_kind="knn", ltm_capacity=512, ltm_topk=4, ltm_layers=(2,)
    )
    m = MemoryTransformer(args).eval()
    with torch.no_grad():  # sharper than at init: greedy text then varies instead of repeating one token
        for name, p in m.named_parameters():
            if p.dim() == 2 and name != "tok_emb.weight":
                p.mul_(8.0)
    exp = root / "export"
    exp.mkdir()
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}  # tied head
    save_file(sd, str(exp / "model.safetensors"))
    (exp / "model_args.json").write_text(json.dumps(dataclasses.asdict(m.args)))
    cfg = Config()
    cfg.model.segment_len = T
    (exp / "config.json").write_text(json.dumps(to_dict(cfg)))
    shutil.copy(tok.path, exp / "tokenizer.model")

    from mnemo.evaluation import harness

    harness.offline_datasets(root / "hf_cache")  # local JSON only, cached in this test's tmp dir
    model, tokenizer, _ = load_for_inference(exp)

    texts = [t for t in stdlib_texts(12)[6:] if len(t) > 3000]
    tasks = root / "tasks"
    tasks.mkdir()
    # Multiple choice: one context of > 8 segments, two short ones.
    mc = [
        {"context": texts[0][:300], "choices": [" return None", " pass", " import os"], "label": 0},
        {"context": "def add(a, b):\n   ", "choices": [" return a + b", " return a - b"], "label": 0},
        {"context": "import sys\nprint(", "choices": ["sys.argv)", "'hello')", "1)"], "label": 2},
    ]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (tasks / "mc.yaml").write_text(
        _yaml(
            "mnemo_mc",
            tasks / "mc.jsonl",
            "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\n"
            "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n",
        )
    )
    ppl = [{"text": texts[1][:400]}, {"text": "x = 1\n"}, {"text": texts[2][:600]}]
    (tasks / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in ppl))
    (tasks / "ppl.yaml").write_text(
        _yaml(
            "mnemo_ppl",
            tasks / "ppl.jsonl",
            "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
            "metric_list:\n  - metric: word_perplexity\n",
        )
    )
    return exp, tasks, model, tokenizer, harness, texts


def test_multiple_choice_equals_mnemo_scoring_through_memory(env, capsys):
    from mnemo.evaluation.scoring import score_teacher_forced

    exp, tasks, model, tok, harness, _ = env
    res = harness.run_lm_eval(
        model,
        tok,
        T,
        "mnemo_mc",
        include_path=str(tasks),
        batch_size=4,
        log_samples=True,
        print_table=False,
        bootstrap_iters=0,
    )
    lm = res["mnemo_lm"]
    diffs, n_long, ltm_effect = [], 0, []
    for s in res["samples"]["mnemo_mc"]:
        for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
            # lm-eval's causal split: trailing whitespace joins the continuation, whose tokens are those of
            # the pair's text encoded whole after as many tokens as the context alone has.
            c = tok.encode(ctx.rstrip())
            whole = c + tok.encode(ctx + cont)[len(c) :]
            sample = {"tokens": whole, "answer_start": len(c), "answer_len": len(whole) - len(c)}
            _, loss = score_teacher_forced(model, [sample], T, batch_size=1)  # mnemo's own, one slot, no padding
            diffs.append(abs(float(resp[0][0]) - (-float(loss[0].sum()))))
            if len(c) > 8 * T:
                n_long += 1
                _, off = score_teacher_forced(model, [sample], T, 1, ltm=False)  # the same, long-term memory off
                ltm_effect.append(abs(float(off[0].sum() - loss[0].sum())))
    longest = max(max(r["pos"]) for r in lm.reads)
    with capsys.disabled():  # the measured figures, also under -s
        print(f"\nlm-eval vs mnemo scoring: {len(diffs)} continuations, max |diff| = {max(diffs):.3g} nats")
        print(f"memory read: {longest} tokens = {longest / T:.1f} segments of {T}; per batch {lm.reads}")
        print(f"long-term memory off changes the long context's scores by {min(ltm_effect):.3g}..{max(ltm_effect):.3g}")
    assert len(diffs) == 8 and max(diffs) <= 1e-5
    assert n_long == 3  # the long context's three choices: > 8 segments of T tokens
    # The slots read the long context through memory: tokens read and long-term entries filled per slot.
    assert longest > 8 * T and min(ltm_effect) > 1e-3  # what the store holds changes the answer's score
    for r in lm.reads:
        assert r["ltm_len"] == [min(p, 512) for p in r["pos"]] and min(r["pos"]) >= max(r["tokens"])
    acc = res["results"]["mnemo_mc"]["acc,none"]
    # The same task from the command line, --json: the same accuracy.
    from mnemo.cli import build_parser

    out = exp.parent / "mc.json"
    argv = ["eval", str(exp), "--lm-eval", "mnemo_mc", "--lm-eval-include", str(tasks), "--json", str(out)]
    args = build_parser().parse_args([*argv, "--limit", "3", "--batch-size", "2"])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "mnemo_mc" in captured.out  # lm-eval's table
    # stderr is no terminal here: no tqdm bar of mnemo's in it (a line a minute at most, none in a short run).
    assert "reading requests" not in captured.err
    assert json.loads(out.read_text())["results"]["mnemo_mc"]["acc,none"] == acc


def test_loglikelihood_rolling_equals_mnemo_scoring(env):
    from mnemo.evaluation.scoring import score_teacher_forced

    _, tasks, model, tok, harness, _ = env
    res = harness.run_lm_eval(
        model,
        tok,
        T,
        "mnemo_ppl",
        include_path=str(tasks),
        batch_size=3,
        log_samples=True,
        print_table=False,
        bootstrap_iters=0,
    )
    diffs = []
    for s in res["samples"]["mnemo_ppl"]:
        ids = [tok.eos_id, *tok.encode(s["doc"]["text"])]
        _, loss = score_teacher_forced(model, [{"tokens": ids, "answer_start": 1, "answer_len": len(ids) - 1}], T, 1)
        diffs.append(abs(float(s["resps"][0][0]) - (-float(loss[0].sum()))))
    print(f"rolling: max |diff| = {max(diffs):.3g} nats over {len(diffs)} documents")
    assert len(diffs) == 3 and max(diffs) <= 1e-5
    assert np.isfinite(res["results"]["mnemo_ppl"]["word_perplexity,none"])


def test_generate_until_equals_mnemo_greedy_generation(env):
    from mnemo.evaluation.generate import generate

    _, tasks, model, tok, harness, texts = env
    prompts = [texts[3][:250], "def main():\n    ", texts[4][:100]]  # the first: > 8 segments
    assert len(tok.encode(prompts[0])) > 8 * T
    ref = [tok.decode(generate(model, tok, tok.encode(p), T, 10, temperature=0.0)) for p in prompts]
    # A stop string from inside the first reference: generation must stop there and cut it off.
    stop = next(c for c in ref[0][2:] if c.isascii() and c.isalnum() and ref[0].find(c) >= 2)
    want = [r[: r.find(stop)] if stop in r else r for r in ref]
    (tasks / "gen.jsonl").write_text("".join(json.dumps({"context": p, "answer": "x"}) + "\n" for p in prompts))
    (tasks / "gen.yaml").write_text(
        _yaml(
            "mnemo_gen",
            tasks / "gen.jsonl",
            "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
            f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: 10\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n",
        )
    )
    res = harness.run_lm_eval(
        model,
        tok,
        T,
        "mnemo_gen",
        include_path=str(tasks),
        batch_size=3,
        log_samples=True,
        print_table=False,
        bootstrap_iters=0,
    )
    got = [s["resps"][0][0] for s in sorted(res["samples"]["mnemo_gen"], key=lambda s: s["doc_id"])]
    print(f"generate_until: {got!r} (stop {stop!r})")
    assert got == want and len(want[0]) < len(ref[0])


def test_generate_batch_slots_equal_single_generation(env):
    # Prompts of different lengths in lockstep slots, with sampling: each slot = generate() alone.
    from mnemo.evaluation.generate import generate, generate_batch

    _, _, model, tok, _, texts = env
    prompts = [tok.encode(texts[0][:80]), tok.encode("import os\n"), tok.encode(texts[1][:40])]
    kw = dict(temperature=1.0, top_p=0.9, seed=4)
    got = generate_batch(model, prompts, T, 6, eos_id=None, **kw)
    assert got == [generate(model, tok, p, T, 6, stop_at_eos=False, **kw) for p in prompts]
    assert [len(g) for g in got] == [6, 6, 6]
    stopped = generate_batch(
        model, prompts, T, 6, eos_id=None, should_stop=lambda r, ids: r == 1 and len(ids) == 3, **kw
    )
    assert [len(g) for g in stopped] == [6, 3, 6] and stopped[1] == got[1][:3]


def test_errors_are_one_line(env):
    from mnemo.evaluation.errors import EvalError

    exp, tasks, model, tok, harness, _ = env
    with pytest.raises(EvalError, match="no task"):
        harness.run_lm_eval(model, tok, T, " , ", include_path=str(tasks))
    with pytest.raises(EvalError, match="no such directory"):
        harness.run_lm_eval(model, tok, T, "mnemo_mc", include_path=str(tasks / "nope"))
    with pytest.raises(EvalError, match="checkpoint=PATH"):
        harness.MnemoLM()
    with pytest.raises(EvalError, match="unknown key.*ltm_capcity"):
        harness.MnemoLM(model=model, tokenizer=tok, segment_len=T, ltm_capcity=64)
    (tasks / "gone.yaml").write_text(_yaml("mnemo_gone", tasks / "gone.jsonl", "output_type: loglikelihood_rolling\n"))
    with pytest.raises(EvalError, match="gone.jsonl"):
        harness.run_lm_eval(model, tok, T, "mnemo_gone", include_path=str(tasks))
    (tasks / "gone.yaml").unlink()
    from mnemo.cli import build_parser
    from mnemo.train.errors import UserError

    for extra, msg in ((["--data", str(tasks), "--lm-eval", "mnemo_mc"], "separate"), ([], "--data DATA_DIR")):
        args = build_parser().parse_args(["eval", str(exp), *extra])
        with pytest.raises(UserError, match=msg):
            args.func(args)
    assert harness.cut_at_stop("abc\ndef", ["\n", "c"]) == "ab"


def test_bf16_on_cpu(env):
    # The GPU rule: every path also runs in bf16 on CPU. Scores close to fp32's, generation runs.
    import copy

    _, _, model, tok, harness, texts = env
    seq = tok.encode(texts[0][:120])
    lm32 = harness.MnemoLM(model=model, tokenizer=tok, segment_len=T)
    lm16 = harness.MnemoLM(model=copy.deepcopy(model).to(torch.bfloat16), tokenizer=tok, segment_len=T)
    (a, _), (b, _) = lm32.score_tokens([seq], [len(seq) - 20])[0], lm16.score_tokens([seq], [len(seq) - 20])[0]
    print(f"bf16 vs fp32 log-likelihood of 20 tokens after {len(seq) - 20}: {b:.3f} vs {a:.3f}")
    assert np.isfinite(b) and abs(a - b) < 0.1 * abs(a)
    from mnemo.evaluation.generate import generate_batch

    out = generate_batch(lm16.model, [seq, seq[:20]], T, 4, temperature=0.0)
    assert [len(o) for o in out] == [4, 4]


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"batch_size": 0}, "--batch_size: must be an integer >= 1, got 0"),
        ({"batch_size": "-3"}, "--batch_size: must be an integer >= 1, got '-3'"),
        ({"batch_size": "four"}, "--batch_size: must be an integer >= 1, got 'four'"),
        ({"ltm_capacity": "0"}, "ltm_capacity: must be an integer >= 1, got '0'"),
        ({"ltm_capacity": "lots"}, "ltm_capacity: must be an integer >= 1, got 'lots'"),
        ({"max_gen_toks": "-1"}, "max_gen_toks: must be an integer >= 1, got '-1'"),
    ],
)
def test_model_args_are_checked_before_the_checkpoint_loads(kw, needle):
    """A batch size of 0 or -3 (or a word) used to become 8 silently; a word as ltm_capacity was a traceback."""
    from mnemo.evaluation import harness
    from mnemo.evaluation.errors import EvalError

    with pytest.raises(EvalError) as e:
        harness.MnemoLM(checkpoint="/nonexistent/ckpt", **kw)  # no loader is called: checked first
    assert str(e.value) == needle


@pytest.mark.parametrize(
    "cap,needle",
    [
        ("99999999999", "ltm_capacity: must be <= 2147483647, got 99999999999"),  # was ModelArgs' ValueError
        ("2147483647", "the long-term store (2147483647 entries per layer, 2 slots) needs at least"),  # was 2 TB alloc
    ],
)
def test_lm_eval_cli_refuses_a_store_that_cannot_fit(env, capsys, cap, needle):
    """`mnemo lm-eval run --model mnemo --model_args checkpoint=CKPT,ltm_capacity=N`: a capacity above the bound
    or beyond the memory available is one `mnemo: error:` line (exit 2), not a traceback or an OOM kill."""
    from mnemo.cli import main

    exp, tasks, *_ = env
    argv = ["lm-eval", "run", "--model", "mnemo", "--model_args", f"checkpoint={exp},ltm_capacity={cap}"]
    argv += ["--tasks", "mnemo_mc", "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu"]
    assert main(argv) == 2
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("mnemo: error:")]
    # (rc 2 is exit_status's for an EvalError; lm-eval's own log handler may hold an earlier test's stream)
    assert len(err) == 1 and needle in err[0], text[-2000:]


def test_lm_eval_cli_argument_mistakes_are_one_line(env, capsys):
    """`mnemo lm-eval run ... --tasks nosuchtask` was lm-eval's ValueError "Tasks not found" under a traceback, exit
    1 (a bug's), where `mnemo eval --lm-eval nosuchtask` is one line, exit 2."""
    from mnemo.cli import main

    exp, tasks, *_ = env
    argv = ["lm-eval", "run", "--model", "mnemo", "--model_args", f"checkpoint={exp}", "--device", "cpu"]
    assert main([*argv, "--tasks", "nosuchtask", "--include_path", str(tasks)]) == 2
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("mnemo: error:")]
    assert err == ["mnemo: error: lm-eval: Tasks not found: nosuchtask"] and "Traceback" not in text, text[-2000:]


def test_request_loop_out_of_memory_is_one_line(env, monkeypatch):
    """An allocation failure the pre-flight did not foresee, inside lm-eval's requests, is one EvalError."""
    from mnemo.evaluation import harness as h
    from mnemo.evaluation.errors import EvalError

    _, _, model, tok, harness, texts = env

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(h, "continuation_scores", boom)
    monkeypatch.setattr(h, "generate_batch", boom)
    lm = harness.MnemoLM(model=model, tokenizer=tok, segment_len=T)
    with pytest.raises(EvalError, match="out of memory.*lower --batch_size or ltm_capacity"):
        lm.score_tokens([tok.encode(texts[0][:50])], [3])

    class Req:
        args = ("def f():", {"until": ["\n"], "max_gen_toks": 2})

    with pytest.raises(EvalError, match="out of memory"):
        lm.generate_until([Req()])


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"top_p": 0}, "top_p: must be in (0, 1], got 0.0"),  # was read as 1.0: sampling from every token
        ({"top_p": 0.0, "do_sample": True, "temperature": 1}, "top_p: must be in (0, 1]"),
        ({"top_p": -0.5}, "top_p: must be in (0, 1], got -0.5"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"temperature": -1}, "temperature: must be a finite number >= 0"),
        ({"temperature": float("nan"), "do_sample": True}, "temperature: must be a finite number >= 0"),
        ({"top_p": "x"}, "top_p: not a number, got 'x'"),
        ({"temperature": "abc"}, "temperature: not a number, got 'abc'"),  # named the key no more than top_p's
        ({"max_gen_toks": -5}, "max_gen_toks must be a whole number >= 0, got -5"),
        ({"max_gen_toks": 2.5}, "max_gen_toks must be a whole number >= 0, got 2.5"),  # was truncated to 2
        ({"max_new_tokens": "2.5"}, "max_new_tokens must be a whole number >= 0, got '2.5'"),
    ],
)
def test_generation_kwargs_out_of_range_are_one_error_naming_the_task(kw, msg):
    """top_p: 0 became 1.0 (float(top_p or 1.0)), where -0.5 was refused; an out-of-range top_p or temperature
    was refused by generate_batch without naming generation_kwargs, which docs/lm_eval.md says errors name."""
    from mnemo.evaluation.errors import EvalError
    from mnemo.evaluation.harness import generation_settings

    with pytest.raises(EvalError) as e:
        generation_settings(kw, 256, "my_task")
    assert str(e.value).startswith("generation_kwargs (task my_task): ") and msg in str(e.value), str(e.value)
    with pytest.raises(EvalError, match=r"^generation_kwargs: "):
        generation_settings(kw, 256)


def test_generation_kwargs_defaults_and_values_in_range():
    from mnemo.evaluation.harness import generation_settings

    kw = generation_settings({}, 256)
    assert (kw["temperature"], kw["top_p"], kw["max_gen_toks"], kw["do_sample"]) == (0.0, 1.0, 256, False)
    kw = generation_settings({"top_p": None, "temperature": 0}, 256)
    assert (kw["temperature"], kw["top_p"]) == (0.0, 1.0)
    kw = generation_settings({"top_p": 0.5, "temperature": 0.7, "max_new_tokens": 3}, 256)
    assert (kw["temperature"], kw["top_p"], kw["max_gen_toks"], kw["do_sample"]) == (0.7, 0.5, 3, True)
    assert generation_settings({"max_gen_toks": 4.0}, 256)["max_gen_toks"] == 4  # a whole number, as 4
    assert generation_settings({"max_tokens": "7"}, 256)["max_gen_toks"] == 7


def test_generate_until_reads_generation_kwargs_as_lm_eval_does(env, monkeypatch):
    """generate_until read only max_gen_toks, do_sample and temperature: a task's max_new_tokens: 3 gave
    256 tokens, temperature: 1.0 without do_sample decoded greedily, every request sampled from seed 0 (a
    task's repeats were one sample 4 times), and max_gen_toks: abc was a traceback, -5 empty answers."""
    from mnemo.evaluation.errors import EvalError

    _, _, model, tok, harness, _ = env
    lm = harness.MnemoLM(model=model, tokenizer=tok, segment_len=T, batch_size=2)

    class Req:
        def __init__(self, kw):
            self.args = ("def f(a, b):\n    return", kw)

    asked = []
    real = harness.generate_batch

    def spy(*a, **k):
        out = real(*a, **k)
        asked.append((a[3], [len(ids) for ids in out]))  # (max_new_tokens, new tokens per prompt)
        return out

    monkeypatch.setattr(harness, "generate_batch", spy)
    lm.generate_until([Req({"until": ["QQQ"], "max_new_tokens": 3})])
    assert asked == [(3, [3])]
    sampled = lm.generate_until([Req({"until": ["QQQ"], "max_gen_toks": 12, "temperature": 1.0})] * 4)
    greedy = lm.generate_until([Req({"until": ["QQQ"], "max_gen_toks": 12})])[0]
    assert len(set(sampled)) > 1 and any(s != greedy for s in sampled)
    # The same samples at another batch size: request i draws from seed + i.
    lm1 = harness.MnemoLM(model=model, tokenizer=tok, segment_len=T, batch_size=1)
    lm1.seed = lm.seed
    assert lm1.generate_until([Req({"until": ["QQQ"], "max_gen_toks": 12, "temperature": 1.0})] * 4) == sampled
    for bad in ({"max_gen_toks": "abc"}, {"max_gen_toks": -5}, {"temperature": "hot"}):
        with pytest.raises(EvalError, match="generation_kwargs"):
            lm.generate_until([Req({"until": ["QQQ"], **bad})])
    named = Req({"until": ["QQQ"], "top_p": 0})
    named.task_name = "t1"  # as lm-eval's Instance has it
    with pytest.raises(EvalError, match=r"^generation_kwargs \(task t1\): top_p: must be in \(0, 1\]"):
        lm.generate_until([named])


@pytest.mark.parametrize("device", ["foo", "mps", "meta", "cuda:x", "cpu:0", "cuda:99"])
def test_lm_eval_cli_refuses_a_device_mnemo_does_not_run_on(env, capsys, device):
    """lm_eval's --device is free text: foo, mps and meta were torch's traceback (exit 1) once the model loaded."""
    from mnemo.cli import main

    exp, tasks, *_ = env
    argv = ["lm-eval", "run", "--model", "mnemo", "--model_args", f"checkpoint={exp}", "--device", device]
    argv += ["--tasks", "mnemo_mc", "--include_path", str(tasks), "--limit", "2"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mnemo: error:")]
    want = "this host has" if device == "cuda:99" and torch.cuda.is_available() else "not a device mnemo runs on"
    if device == "cuda:99" and not torch.cuda.is_available():
        want = "--device cuda: no CUDA device available"
    assert len(err) == 1 and err[0].startswith("mnemo: error: --device ") and want in err[0], err


def test_a_bad_device_is_refused_before_lm_eval_starts_and_by_the_model_itself(env, monkeypatch):
    """lm-eval indexes every task it knows (~4 s) before it builds the model: `--device foo` is refused first
    (both argument forms, --model mnemo only); the model's own check stays for a device given another way."""
    import lm_eval.__main__

    from mnemo.evaluation import harness
    from mnemo.evaluation.errors import EvalError

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: pytest.fail("lm-eval started"))
    monkeypatch.setattr(harness.MnemoLM, "loader", harness.MnemoLM.loader)  # cli_main sets it: restored after
    for argv in (["run", "--model", "mnemo", "--device", "foo"], ["run", "--model=mnemo", "--device=mps"]):
        with pytest.raises(EvalError, match=r"^--device '(foo|mps)': not a device mnemo runs on"):
            harness.cli_main(argv, loader=lambda *a, **k: None)
    harness.check_device_first(["run", "--model", "hf", "--device", "mps"])  # another model's business
    exp = env[0]
    with pytest.raises(EvalError, match=r"^--device 'meta': not a device mnemo runs on"):
        harness.MnemoLM(checkpoint=str(exp), device="meta")


def test_lm_eval_device_names():
    from mnemo.evaluation.harness import lm_eval_device

    assert lm_eval_device(None) == lm_eval_device("auto") in ("cpu", "cuda")
    assert lm_eval_device("cpu") == "cpu"


def test_an_ltm_capacity_the_model_cannot_use_is_refused_before_any_task(env):
    """ltm_capacity=64 on a model without long-term memory was silently ignored (exit 0), and one below the top-k
    was caught only at the first request, after the tasks were built (its line glued to the progress bar)."""
    import dataclasses

    from mnemo.evaluation.errors import EvalError
    from mnemo.model import MemoryTransformer

    _, _, model, tok, harness, _ = env
    with pytest.raises(EvalError, match=r"^ltm_capacity 1: must be >= the model's top-k \(4\)$"):
        harness.MnemoLM(model=model, tokenizer=tok, segment_len=T, ltm_capacity=1)
    none = MemoryTransformer(dataclasses.replace(model.args, ltm_kind="none", ltm_layers=()))
    with pytest.raises(EvalError, match="no long-term memory"):
        harness.MnemoLM(model=none, tokenizer=tok, segment_len=T, ltm_capacity=64)
    assert harness.MnemoLM(model=model, tokenizer=tok, segment_len=T, ltm_capacity=4).ltm_capacity == 4


def _gen_task(tasks: Path, name: str, generation_kwargs: str) -> None:
    """A generate_until task over mc.jsonl (its contexts as prompts) with the given generation_kwargs line."""
    body = "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\n"
    (tasks / f"{name}.yaml").write_text(
        _yaml(name, tasks / "mc.jsonl", body + f"generation_kwargs: {generation_kwargs}\n")
    )


@pytest.mark.parametrize(
    "extra, line",
    [
        # lm-eval's TaskConfig ran float() on it while building the task: a traceback, exit 1
        (["--tasks", "mnemo_hot"], "generation_kwargs (task mnemo_hot): temperature: not a number, got 'abc'"),
        ([], "lm-eval: No tasks specified, or no tasks found."),  # lm-eval's evaluator, not its _cli
        (
            ["--tasks", "mnemo_mc", "--limit", "0"],
            "lm-eval: task mnemo_mc: task.build_requests() did not find any docs",
        ),
    ],
)
def test_lm_eval_cli_user_mistakes_in_lm_eval_itself_are_one_line(env, capsys, extra, line):
    """Only ValueErrors of lm-eval's _cli and evaluate_config were one line: a task's temperature: abc, no --tasks
    or --limit 0 (raised while lm-eval builds the tasks or their requests) were tracebacks, exit 1."""
    from mnemo.cli import main

    exp, tasks, *_ = env
    _gen_task(tasks, "mnemo_hot", '{until: ["\\n"], max_gen_toks: 4, temperature: abc}')
    argv = ["lm-eval", "run", "--model", "mnemo", "--model_args", f"checkpoint={exp}", "--device", "cpu"]
    try:
        assert main([*argv, *extra, "--include_path", str(tasks)]) == 2
    finally:
        (tasks / "mnemo_hot.yaml").unlink()
    text = capsys.readouterr().err
    err = [ln for ln in text.splitlines() if ln.startswith("mnemo: error:")]
    # (rc 2, not a bug's 1; no "Traceback" check: lm-eval's log handler may hold an earlier test's closed stream)
    assert len(err) == 1 and line in err[0], text[-2000:]


def test_lm_eval_user_errors_name_the_task_and_keep_the_cause(env):
    """`mnemo eval --lm-eval`: a task's temperature: abc was lm-eval's ValueError under a traceback; the rule
    (raised in lm-eval's or datasets' code: the user's) keeps the original as the cause, which --debug shows."""
    from mnemo.evaluation.errors import EvalError

    _, tasks, model, tok, harness, _ = env
    _gen_task(tasks, "mnemo_hot", '{until: ["\\n"], max_gen_toks: 4, temperature: abc}')
    try:
        with pytest.raises(EvalError) as e:
            harness.run_lm_eval(model, tok, T, "mnemo_hot", include_path=str(tasks), print_table=False)
    finally:
        (tasks / "mnemo_hot.yaml").unlink()
    assert str(e.value) == "generation_kwargs (task mnemo_hot): temperature: not a number, got 'abc'"
    assert isinstance(e.value.__cause__, ValueError)  # lm-eval's own, under the line (exit_status's --debug)


def test_an_error_raised_in_mnemo_under_lm_eval_stays_a_bug(env, monkeypatch):
    """The rule is where the error was raised: mnemo's own code answering lm-eval's requests is a bug's traceback."""
    _, tasks, model, tok, harness, _ = env

    def broken(*args, **kwargs):
        raise ValueError("a bug in mnemo")

    monkeypatch.setattr(harness, "continuation_scores", broken)  # called by MnemoLM.score_tokens
    with pytest.raises(ValueError, match="a bug in mnemo"):
        harness.run_lm_eval(model, tok, T, "mnemo_mc", include_path=str(tasks), limit=1, print_table=False)


def test_a_device_error_raised_in_lm_eval_is_not_the_users(env, monkeypatch):
    """A CUDA error of mnemo's own kernel surfaces at lm-eval's next synchronizing call, in lm-eval's code: read
    by where it was raised, it was "lm-eval: CUDA error: ..." as if the task file were at fault."""
    import lm_eval.evaluator

    _, tasks, model, tok, harness, _ = env

    def fault(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", fault)  # called by lm-eval's simple_evaluate
    with pytest.raises(torch.AcceleratorError, match="device-side assert"):
        harness.run_lm_eval(model, tok, T, "mnemo_mc", include_path=str(tasks), limit=1, print_table=False)


def test_apply_chat_template_is_refused_in_one_line(env):
    """lm-eval's base class raised NotImplementedError ("please implement 'apply_chat_template'") under a
    traceback: mnemo's models have no chat template, and --apply_chat_template says so."""
    import lm_eval

    from mnemo.evaluation.errors import EvalError

    _, tasks, model, tok, harness, _ = env
    lm = harness.MnemoLM(model=model, tokenizer=tok, segment_len=T)
    assert lm.chat_template(False) == ""
    with pytest.raises(EvalError, match=r"^--apply_chat_template: mnemo's models have no chat template"):
        lm_eval.simple_evaluate(
            model=lm,
            tasks=["mnemo_mc"],
            task_manager=harness.task_manager(["mnemo_mc"], str(tasks)),
            apply_chat_template=True,
            limit=1,
        )


def test_no_device_given_on_a_host_without_cuda_names_the_missing_flag(monkeypatch):
    """lm-eval asks for cuda when --device is not given: `mnemo lm-eval run --model mnemo ...` without it failed
    with "--device cuda: no CUDA device available", naming a flag the user never gave."""
    import lm_eval.__main__

    from mnemo.evaluation import harness
    from mnemo.evaluation.errors import EvalError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: pytest.fail("lm-eval started"))
    monkeypatch.setattr(harness.MnemoLM, "loader", harness.MnemoLM.loader)  # cli_main sets it: restored after
    for argv in (["run", "--model", "mnemo", "--tasks", "t"], ["run", "-M", "mnemo"]):
        with pytest.raises(EvalError, match=r"^--device not given: lm-eval then asks for cuda.*add --device cpu$"):
            harness.cli_main(argv, loader=lambda *a, **k: None)
    harness.check_device_first(["run", "--model", "mnemo", "--config", "c.yaml"])  # may set the device
    harness.check_device_first(["run", "--model", "hf"])  # another model's business
    harness.check_device_first(["run", "--model", "mnemo", "--help"])  # lm-eval's help, not a refusal


def test_a_local_format_task_without_data_files_is_refused_before_reading(env, tmp_path, monkeypatch):
    """`dataset_path: json` without data_files: datasets read the *.jsonl files of the current directory as the
    task's documents, and failed on them with DatasetGenerationError under a traceback."""
    from mnemo.evaluation.errors import EvalError

    _, tasks, model, tok, harness, _ = env
    (tmp_path / "notes.jsonl").write_text("not json\n")
    monkeypatch.chdir(tmp_path)
    (tasks / "nofiles.yaml").write_text("task: mnemo_nofiles\ndataset_path: json\n")
    try:
        with pytest.raises(EvalError) as e:
            harness.run_lm_eval(model, tok, T, "mnemo_nofiles", include_path=str(tasks), print_table=False)
    finally:
        (tasks / "nofiles.yaml").unlink()
    assert str(e.value).startswith(
        f"--lm-eval: task mnemo_nofiles ({tasks / 'nofiles.yaml'}): dataset_path json needs dataset_kwargs: data_files"
    ), str(e.value)
    # A task with its own reader (custom_dataset) never reads dataset_path: not refused for it.
    entry = type("Entry", (), {"cfg": {"dataset_path": "json", "custom_dataset": "reader"}, "yaml_path": None})
    harness.check_local_data_sets(type("TM", (), {"task_index": {"t": entry}}), ["t"])
