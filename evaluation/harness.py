"""lm-evaluation-harness through mnemo's memory: the ``mnemo`` LM of ``lm_eval`` and ``mnemo eval --lm-eval``.

``MnemoLM`` answers lm-eval's three request kinds the way mnemo reads a
document in training: every request is its own document, read from its
first token segment by segment, the memory state carried from segment to
segment (``scoring.continuation_scores``, ``generate.generate_batch``).
Several requests are read at once, one per stream slot; requests are sorted
by length so the slots of a batch end close together, and a slot that ends
early reads padding after its last token (causality keeps it out of what it
returns). There is no context window: a context of any length is read
whole, through memory.

* loglikelihood (context, continuation): tokenized as lm-eval's causal
  models do (``TemplateLM``): trailing whitespace of the context joins the
  continuation; the continuation's tokens are those of the pair's text
  encoded whole, after as many tokens as the context alone encodes to; an
  empty context is the EOS token.
* loglikelihood_rolling (text,): EOS, then the text, every token scored once.
* generate_until (context, gen_kwargs): greedy unless do_sample; stops at
  EOS, ``max_gen_toks`` or the first ``until`` string, which is cut off.

Importing this module imports lm_eval (seconds): only the harness path does.

Over 500 lines: the model lm-eval calls and what both lm-eval commands need around it (its generation
settings, the device and argument checks before lm-eval starts, the rule that tells lm-eval's user errors
from mnemo's bugs) are one adapter over one import of lm_eval.
"""

from __future__ import annotations

import contextlib
import json
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnemo.data_pipeline.errors import brief, clip, first_line
from mnemo.data_pipeline.redact import redact_uri
from mnemo.evaluation.errors import EvalError
from mnemo.evaluation.generate import check_sampling, generate_batch
from mnemo.evaluation.outputs import write_then_show
from mnemo.evaluation.progress import progress_bar
from mnemo.evaluation.inference import (
    DEVICE_ERRORS,
    check_memory,
    core_model,
    eval_mode,
    ltm_capacity_of,
    memory_errors,
    model_device,
    resolve_device,
    sized_ltm,
    store_bytes,
)
from mnemo.model.sizes import MAX_COUNT
from mnemo.evaluation.report import json_ready
from mnemo.evaluation.scoring import continuation_scores

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra is missing
    raise EvalError(f"lm-evaluation-harness is not installed ({e.name}): pip install 'mnemo[eval]'") from None

# (model, tokenizer, cfg) from a checkpoint, run or export dir and a device; set by the CLI layer (the loader lives
# in mnemo.train, above this part). Used when lm_eval builds the model from --model_args checkpoint=PATH.
Loader = Callable[[str, str], tuple[Any, Any, Any]]


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    """ "a,b" or ["a", "b,c"] -> ["a", "b", "c"]; EvalError when none is named."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not names:
        raise EvalError("--lm-eval: no task named")
    return names


def _positive(name: str, value: Any, high: int | None = None) -> int:
    """An integer in [1, high] from lm-eval's string arguments (--batch_size, --model_args KEY=N); EvalError
    naming it."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise EvalError(f"{name}: must be an integer >= 1, got {brief(value, 40)}")
    if high is not None and n > high:
        raise EvalError(f"{name}: must be <= {high}, got {brief(value, 40)}")
    return n


def lm_eval_device(device: str | None) -> str:
    """The torch device for lm_eval's --device (free text: cpu, cuda, cuda:1, auto); EvalError naming it when it
    is none of those (foo, mps, meta were torch's traceback) or names a CUDA device this host does not have."""
    import torch

    text = str(device or "auto")
    base, colon, index = text.partition(":")
    if base not in ("auto", "cpu", "cuda") or (colon and (base != "cuda" or not index.isdecimal())):
        raise EvalError(f"--device {brief(text)}: not a device mnemo runs on (auto, cpu, cuda or cuda:N)")
    dev = resolve_device(base)
    if colon:
        if not int(index) < torch.cuda.device_count():
            raise EvalError(f"--device {brief(text)}: this host has {torch.cuda.device_count()} CUDA devices")
        dev += f":{int(index)}"
    return dev


@register_model("mnemo")
class MnemoLM(TemplateLM):
    """lm-eval's view of a mnemo model: every request read as its own document, through memory.

    Built from a loaded model (``MnemoLM(model=m, tokenizer=tok, segment_len=T)``)
    or by lm_eval from ``--model_args checkpoint=PATH`` (with ``use_loader``).
    ``reads`` records, per loglikelihood batch, the tokens each slot read and
    the long-term store entries it filled (``MemoryState.pos`` / ``ltm_len``).
    """

    loader: Loader | None = None

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        segment_len: int | None = None,
        checkpoint: str | None = None,
        batch_size: int | str | None = 8,
        device: str | None = None,
        ltm_capacity: int | str | None = None,
        max_gen_toks: int | str = 256,
        max_batch_size: Any = None,  # lm_eval passes it; batches here are --batch_size slots
        **unknown: Any,
    ):
        super().__init__()
        if unknown:  # a misspelt --model_args key would otherwise be ignored silently
            raise EvalError(
                f"--model_args: unknown key(s) {', '.join(sorted(unknown))} of --model mnemo "
                "(checkpoint, ltm_capacity, max_gen_toks)"
            )
        # Checked before a checkpoint loads.
        auto = batch_size is None or str(batch_size).strip().lower().startswith("auto")  # lm-eval's "auto[:N]"
        self.batch_size = 8 if auto else _positive("--batch_size", batch_size)
        # The bound of `mnemo eval --ltm-capacity` and ModelArgs (model/sizes.py): above it the store's resize
        # raised ModelArgs' ValueError as a traceback at the first request.
        cap = None if ltm_capacity in (None, "") else _positive("ltm_capacity", ltm_capacity, MAX_COUNT)
        self.ltm_capacity = cap
        self.max_gen_toks = _positive("max_gen_toks", max_gen_toks)
        import torch

        # Sampled generations: request i draws from seed + i. lm-eval seeds torch with its --seed (default 1234)
        # before it builds the model, so that flag sets the samples; the same at any batch size.
        self.seed = torch.initial_seed() % (1 << 31)
        if model is None:
            if checkpoint is None:
                raise EvalError("lm_eval --model mnemo: give --model_args checkpoint=PATH")
            if MnemoLM.loader is None:
                raise EvalError("lm_eval --model mnemo: run it as `mnemo lm-eval ...` (it loads checkpoints)")
            dev = lm_eval_device(device)
            model, tokenizer, cfg = MnemoLM.loader(str(checkpoint), dev)
            segment_len = segment_len or cfg.model.segment_len
        if tokenizer is None or not segment_len:
            raise EvalError("MnemoLM: a model needs its tokenizer and segment_len")
        self.model, self.tok, self.T = model, tokenizer, int(segment_len)
        self._device = model_device(model)
        self.reads: list[dict[str, list[int]]] = []
        # Which flags lower the memory a batch needs (`mnemo eval --lm-eval` sets its own).
        self.advice = "lower --batch_size or ltm_capacity in --model_args"
        args = getattr(core_model(model), "args", None)
        if cap is not None and args is not None:  # before any task is built (a late one was glued to its bar)
            if args.ltm_kind == "none":
                raise EvalError("ltm_capacity: the checkpoint has no long-term memory (memory.long.kind: none) to size")
            if cap < args.ltm_topk:
                raise EvalError(f"ltm_capacity {cap}: must be >= the model's top-k ({args.ltm_topk})")
        if checkpoint is not None:  # loaded here (`mnemo lm-eval`): refuse a store that cannot fit, before a request
            self.check_memory_fit()

    def check_memory_fit(self) -> None:
        """EvalError when ``batch_size`` slots of the long-term store (``ltm_capacity`` or the model's) cannot
        fit in the memory available now (``inference.check_memory``): the stores are allocated per batch, and
        a 2**31 - 1 capacity failed in torch's allocator with a traceback, 4,000,000 x 64 slots was killed."""
        cap = self.ltm_capacity or ltm_capacity_of(self.model)
        if cap:
            what = f"the long-term store ({cap} entries per layer, {self.batch_size} slots)"
            check_memory(self.model, store_bytes(self.model, self.batch_size, cap, self.T), 0, what, self.advice)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """No chat template: ``--apply_chat_template`` is refused in one line (lm-eval's base class raised its
        NotImplementedError under a traceback, while building the requests)."""
        if chat_template:
            raise EvalError(
                "--apply_chat_template: mnemo's models have no chat template (a base language model); leave it out"
            )
        return ""

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        return self.chat_template(True) or ""

    # ------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return int(self.tok.eos_id)

    @property
    def tokenizer_name(self) -> str:
        return "mnemo-sentencepiece-" + str(getattr(self.tok, "sha256", "")).strip()[:16]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return [int(t) for t in self.tok.encode(string)]  # no BOS/EOS: documents start with their text

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode([int(t) for t in tokens])

    # ------------------------------------------------------------ scoring
    def score_tokens(
        self, seqs: Sequence[Sequence[int]], starts: Sequence[int], progress: bool = False
    ) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of seqs[i][starts[i]:], every one of them the argmax), batched over slots."""
        out: list[tuple[float, bool] | None] = [None] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
        todo = [i for i in order if starts[i] < len(seqs[i])]
        for i in order:
            if starts[i] >= len(seqs[i]):
                out[i] = (0.0, True)  # nothing to score
        # A bar on a terminal, a line a minute in a log (lm-eval's own bars go to the same stderr).
        bar = progress_bar(len(todo), "reading requests", progress, unit="requests", prog="mnemo lm-eval")
        with eval_mode(self.model), sized_ltm(self.model, self.ltm_capacity), memory_errors(self.advice):
            for c in range(0, len(todo), self.batch_size):
                chunk = todo[c : c + self.batch_size]
                if bar is not None:
                    bar.update(len(chunk))
                am, nll, state = continuation_scores(
                    self.model, [seqs[i] for i in chunk], [starts[i] for i in chunk], self.T, pad_id=self.eot_token_id
                )
                self.reads.append(
                    {
                        "tokens": [len(seqs[i]) - 1 for i in chunk],
                        "pos": state.pos.tolist(),
                        "ltm_len": state.ltm_len.tolist(),
                    }
                )
                for r, i in enumerate(chunk):
                    truth = np.asarray(seqs[i][starts[i] :], dtype=np.int64)
                    out[i] = (-float(nll[r].sum()), bool((am[r] == truth).all()))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        seqs = [list(ctx) + list(cont) for _, ctx, cont in requests]
        res = self.score_tokens(seqs, [len(ctx) for _, ctx, _ in requests], progress=not disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        seqs = [[self.eot_token_id] + self.tok_encode(t) for t in texts]  # EOS conditions the first token
        res = [ll for ll, _ in self.score_tokens(seqs, [1] * len(seqs), progress=not disable_tqdm)]
        for t, r in zip(texts, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), r)
        return res

    # ------------------------------------------------------------ generation
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # the same generation settings share a batch
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        with eval_mode(self.model), sized_ltm(self.model, self.ltm_capacity), memory_errors(self.advice):
            for idx in groups.values():
                first = requests[idx[0]]
                kw = generation_settings(first.args[1], self.max_gen_toks, getattr(first, "task_name", None))
                until = kw.get("until") or []
                until = [until] if isinstance(until, str) else [str(u) for u in until]
                temperature = kw["temperature"] if kw["do_sample"] else 0.0
                top_p = kw["top_p"]
                max_new = kw["max_gen_toks"]
                prompts = {i: self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in idx}
                order = sorted(idx, key=lambda i: -len(prompts[i]))
                for c in range(0, len(order), self.batch_size):
                    chunk = order[c : c + self.batch_size]

                    def stop(slot: int, ids: list[int], until: list[str] = until) -> bool:
                        return any(u in self.tok_decode(ids) for u in until)  # a stop string is complete

                    gen = generate_batch(
                        self.model,
                        [prompts[i] for i in chunk],
                        self.T,
                        max_new,
                        temperature=temperature,
                        top_p=top_p,
                        # One seed per request (its place in lm-eval's list, the same at any batch size):
                        # a task's repeats of one prompt are independent samples, not one sample 4 times.
                        seed=[self.seed + i for i in chunk],
                        eos_id=self.eot_token_id,
                        should_stop=stop if until else None,
                    )
                    for i, ids in zip(chunk, gen):
                        out[i] = cut_at_stop(self.tok_decode(ids), until)
                        self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out  # type: ignore[return-value]


# lm-eval's names of max_gen_toks (normalize_gen_kwargs reads the first one given, in this order).
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def generation_settings(raw: Any, default_max: int, task: str | None = None) -> dict[str, Any]:
    """A task's generation_kwargs as lm-eval's own models read them (lm_eval.models.utils.normalize_gen_kwargs:
    max_new_tokens, max_tokens, max_completion_tokens as aliases of max_gen_toks; sampling on when do_sample
    is not given and temperature > 0), checked: EvalError naming generation_kwargs (of ``task``, when known)
    and the key, not a traceback, empty answers or a value lm-eval silently truncates (max_gen_toks: 2.5 was
    2). The raw values are checked, before normalize_gen_kwargs converts them."""
    from lm_eval.models.utils import normalize_gen_kwargs

    where = f"generation_kwargs (task {clip(task, 60)})" if task else "generation_kwargs"
    if raw is not None and not isinstance(raw, dict):
        raise EvalError(f"{where}: a mapping expected, got {brief(raw)}")
    raw = dict(raw or {})
    for key in MAX_TOKEN_KEYS:
        value = raw.get(key)
        if value is not None and not _whole_number(value):
            raise EvalError(f"{where}: {key} must be a whole number >= 0, got {brief(value)}")
    for key in ("temperature", "top_p"):
        value = raw.get(key)
        try:
            float(0.0 if value is None else value)
        except (TypeError, ValueError):
            raise EvalError(f"{where}: {key}: not a number, got {brief(value)}") from None
    kw = normalize_gen_kwargs(raw, default_max)
    # Not "x or default": top_p: 0 became 1.0, sampling from every token where the task asked for none.
    kw["temperature"] = float(kw.get("temperature", 0.0))
    top_p = kw.get("top_p")
    kw["top_p"] = 1.0 if top_p is None else float(top_p)
    try:  # generate_batch's own check, here to name the task's generation_kwargs
        check_sampling(kw["temperature"], kw["top_p"])
    except EvalError as e:
        raise EvalError(f"{where}: {e}") from None
    return kw


def _whole_number(value: Any) -> bool:
    """Whether a task's max_gen_toks is an integer >= 0 (an int, 4.0, or a string of one), which int() keeps."""
    if isinstance(value, str):
        return value.strip().isdecimal()
    if isinstance(value, float):
        return value.is_integer() and value >= 0
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (lm-eval's generate_until contract)."""
    cut = min((text.find(u) for u in until if u and u in text), default=len(text))
    return text[:cut]


def use_loader(loader: Loader) -> None:
    """How ``MnemoLM`` loads ``--model_args checkpoint=PATH`` (the CLI layer passes mnemo.train's loader)."""
    MnemoLM.loader = loader


def task_manager(tasks: Sequence[str], include_path: str | None):
    """lm-eval's TaskManager: only the tasks under ``include_path`` when they are all there (indexing lm-eval's
    thousands of built-in task files takes seconds), else those and the built-in ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise EvalError(f"--lm-eval-include: no such directory: {include_path}")
        own = TaskManager(include_path=str(include_path), include_defaults=False)
        if set(tasks) <= set(own.all_tasks):
            return own
    tm = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise EvalError(f"--lm-eval: unknown lm-eval task(s): {', '.join(unknown)}")
    return tm


# datasets' builders of local files: without data_files (or data_dir) they read the matching files of the
# current directory as the task's data.
LOCAL_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


def check_local_data_sets(tm: Any, tasks: Sequence[str]) -> None:
    """EvalError for a task whose dataset_path is a local file format (json, csv, ...) without
    dataset_kwargs data_files or data_dir, before lm-eval reads anything: datasets read the *.jsonl files of
    the current directory as its documents (and failed on them with DatasetGenerationError)."""
    for name in tasks:
        entry = tm.task_index.get(name)
        cfg = getattr(entry, "cfg", None) or {}
        kwargs = cfg.get("dataset_kwargs") or {}
        if cfg.get("custom_dataset"):
            continue  # its own reader: dataset_path unread
        if cfg.get("dataset_path") in LOCAL_FILE_BUILDERS and not (
            isinstance(kwargs, dict) and (kwargs.get("data_files") or kwargs.get("data_dir"))
        ):
            where = f" ({entry.yaml_path})" if getattr(entry, "yaml_path", None) else ""
            raise EvalError(
                f"--lm-eval: task {clip(name, 60)}{where}: dataset_path {cfg['dataset_path']} needs dataset_kwargs: "
                "data_files (without them datasets reads the files of the current directory)"
            )


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    segment_len: int,
    tasks: str | Sequence[str],
    *,
    include_path: str | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    ltm_capacity: int | None = None,
    log_samples: bool = False,
    json_out: str | None = None,
    labels: dict[str, str] | None = None,
    print_table: bool = True,
    bootstrap_iters: int = 100000,
) -> dict[str, Any]:
    """``mnemo eval --lm-eval``: lm-eval's ``simple_evaluate`` of ``tasks`` on a loaded mnemo model.

    Prints lm-eval's results table (print_table), writes the results as JSON
    to ``json_out`` (with ``labels`` under "mnemo"), and returns lm-eval's
    results dict (its "samples" with log_samples); the adapter is under
    results["mnemo_lm"] (not JSON).
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    names = split_tasks(tasks)
    if limit is not None and limit <= 0:
        raise EvalError(f"--limit: must be > 0, got {limit}")
    lm = MnemoLM(
        model=model, tokenizer=tokenizer, segment_len=segment_len, batch_size=batch_size, ltm_capacity=ltm_capacity
    )
    lm.advice = "lower --batch-size or --ltm-capacity"
    lm.check_memory_fit()  # the store is allocated per batch: refuse one that cannot fit now
    tm = task_manager(names, include_path)
    check_local_data_sets(tm, names)
    try:
        with lm_eval_user_errors():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,  # lm-eval's default; 0 skips stderrs of non-mean metrics
            )
    except FileNotFoundError as e:  # a task's data_files that are not there
        raise EvalError(f"--lm-eval: {e}") from None
    if results is None:
        raise EvalError("lm-eval returned no results")

    def doc() -> dict[str, Any]:
        kept = {k: v for k, v in results.items() if k != "samples"}
        kept["mnemo"] = {"segment_len": int(segment_len), "model": type(core_model(model)).__name__, **(labels or {})}
        return json_ready(kept)

    # The JSON first: a table that fails to print must not lose the evaluation (on a full disk: the table anyway).
    write_then_show(
        json_out, doc, lambda: print(make_table(results)) if print_table else None, default=handle_non_serializable
    )
    results["mnemo_lm"] = lm
    return results


def cli_main(argv: Sequence[str], loader: Loader) -> int:
    """``mnemo lm-eval ARGS``: lm-eval's own command line (``lm_eval ARGS``) with ``--model mnemo`` available."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    use_loader(loader)
    check_device_first(argv)
    old = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        with lm_eval_user_errors():
            cli_evaluate()
    finally:
        sys.argv = old
    return 0


def check_device_first(argv: Sequence[str]) -> None:
    """EvalError for a ``--device`` that ``--model mnemo`` cannot run on, before lm-eval starts: it indexes every
    task it knows (seconds) before it builds the model, where ``MnemoLM`` checks the device as well. Without
    ``--device`` (or a ``--config`` that may set it) lm-eval asks for cuda: on a host without CUDA that is
    refused here as a flag not given, not as ``--device cuda``, which the user never typed."""
    args = list(argv)
    if any(a in ("-h", "--help") for a in args):
        return  # lm-eval's help, whatever else the line holds
    pairs = [(a, b) for a, b in zip(args, [*args[1:], None])]
    values = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith(("--model=", "--device="))}
    values.update({a: b for a, b in pairs if a in ("--model", "-M", "--device") and b is not None})
    if values.get("--model", values.get("-M")) != "mnemo":
        return
    if "--device" in values:
        lm_eval_device(values["--device"])
        return
    import torch

    configured = any(a in ("--config", "-C") or a.startswith(("--config=", "-C=")) for a in args)
    if not configured and not torch.cuda.is_available():
        raise EvalError("--device not given: lm-eval then asks for cuda, and this host has none; add --device cpu")


@contextlib.contextmanager
def lm_eval_user_errors() -> Iterator[None]:
    """lm-eval's own errors, and those of the ``datasets`` it reads task data with, as one EvalError line: raised
    while lm-eval checks its arguments, builds the tasks and reads their documents ("Tasks not found", "No tasks
    specified", --limit 0 or -1, a task file's value or data set lm-eval cannot use), they are the user's. The
    rule is where the error was raised: the innermost frame of lm-eval's, datasets' or mnemo's own code in its
    traceback. One of mnemo's (the model answering a request, a check of mnemo's) stays as it is: a bug's
    traceback, or mnemo's own one-line error. OSError and MemoryError pass as they are (exit_status tells a
    missing file, a full disk, no memory left), and so do DEVICE_ERRORS. The original error is the EvalError's
    cause: --debug shows its traceback."""
    try:
        yield
    except (EvalError, OSError, MemoryError, *DEVICE_ERRORS):
        # Nor a device's fault (out of memory, a CUDA error: an asynchronous one of mnemo's own kernel surfaces at
        # lm-eval's next synchronizing call): not the user's task file, and memory_errors says what to lower.
        raise
    except Exception as e:
        if not _raised_by_lm_eval(e):
            raise
        raise EvalError(_user_error_line(e)) from e


def _raised_by_lm_eval(e: BaseException) -> bool:
    """Whether the innermost frame of lm-eval's, datasets' or mnemo's code in ``e``'s traceback is lm-eval's or
    datasets' (frames of other code, the standard library's or jinja2's, are passed over)."""
    theirs = False
    for frame, _ in traceback.walk_tb(e.__traceback__):
        package = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if package in ("lm_eval", "datasets"):
            theirs = True
        elif package == "mnemo":
            theirs = False
    return theirs


def _user_error_line(e: BaseException) -> str:
    """``e``'s message, naming the task lm-eval was building or reading when ``e`` was raised (a frame of its
    TaskConfig or Task in the traceback); the task's generation_kwargs' own error where they are at fault
    (lm-eval's TaskConfig runs float() on temperature as it builds the task: ``generation_settings`` says which
    key of which task). A data set's error adds its cause (datasets' own line names no file or reason)."""
    try:  # lm-eval's internals: a version that moved them still gets the plain line, not an ImportError
        from lm_eval.api.task import Task
        from lm_eval.config.task import TaskConfig
    except ImportError:
        return f"lm-eval: {clip(redact_uri(first_line(e)), 300)}"

    config = None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        obj = frame.f_locals.get("self")
        obj = getattr(obj, "_config", obj) if isinstance(obj, Task) else obj
        config = obj if isinstance(obj, TaskConfig) else config
    # Credentials hidden before any cut: a cut inside user:token@host would leave the token for exit_status's
    # redaction of the whole line to miss (datasets' errors quote the URLs they read).
    msg = redact_uri(first_line(e))
    cause = "" if e.__cause__ is None else redact_uri(first_line(e.__cause__))
    if cause and cause not in msg:
        msg += f" ({cause})"
    if config is None:
        return f"lm-eval: {clip(msg, 300)}"
    name = clip(str(config.task), 60)
    if isinstance(config.generation_kwargs, dict):
        try:
            generation_settings(config.generation_kwargs, 1, name)
        except EvalError as at_fault:  # naming the key
            return str(at_fault)
    return f"lm-eval: task {name}: {clip(msg, 300)}"


def offline_datasets(cache_dir: str | os.PathLike) -> None:
    """Make ``datasets`` read local files only, caching under ``cache_dir`` (tests; air-gapped machines)."""
    import datasets.config
    import huggingface_hub.constants

    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(cache_dir))
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_DATASETS_CACHE = Path(cache_dir)
    huggingface_hub.constants.HF_HUB_OFFLINE = True
