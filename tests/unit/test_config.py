"""The typed config tree: loading, overrides, errors that name the key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mnemo.train.config import ConfigError, flatten, from_dict, load_config, to_dict, to_yaml
from tests.unit.config_keys import leaf_types

REPO_CONFIGS = ["configs/debug.yaml", "configs/small.yaml", "configs/medium.yaml", "configs/large.yaml"]


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.size in path or path.endswith("debug.yaml")


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(
        "configs/debug.yaml",
        [
            "train.lr=1e-3",
            "train.max_steps=7",
            "memory.long.layers=[1,3]",
            "tracking.enabled=false",
            "memory.long.kind=none",
        ],
    )
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.memory.long.layers == [1, 3]
    assert cfg.tracking.enabled is False and cfg.memory.long.kind == "none"


@pytest.mark.parametrize(
    "override,needle",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["train.max_steps=ten"], "train.max_steps: expected an integer"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
        (["zero.stage=4"], "zero.stage: must be 1, 2 or 3"),
        (["memory.long.kind=lsh"], "memory.long.kind: 'lsh' is not one of none, knn"),
        (["model.size=huge"], "model.size: unknown size 'huge'"),
        (["memory.long.layers=[9]"], "memory.long.layers[0]: layer 9 out of range"),
        (["train.lr"], "not of the form dotted.key=value"),
        (["train=1"], "override train: is a section"),
        (["train.lr.x=1"], "override train.lr.x: 'train.lr' is not a section"),
        (["train.passkey.fraction=1.5"], "train.passkey.fraction: must be in [0, 1]"),
        (
            ["train.passkey.start_distance=4", "train.passkey.max_distance=2"],
            "train.passkey.max_distance: must be >= train.passkey.start_distance",
        ),
        (["train.passkey.promote_window=0"], "train.passkey.promote_window: must be >= 1"),
        (["train.passkey.frac=0.5"], "unknown config key 'train.passkey.frac'"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'train\.batch_sise'"):
        load_config(p)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_round_trip_through_yaml_and_dict(tmp_path):
    cfg = load_config("configs/debug.yaml", ["train.seed=9"])
    p = tmp_path / "resolved.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["train.seed"] == 9 and flat["memory.long.capacity"] == cfg.memory.long.capacity


def test_resume_check_reads_a_pre_release_5_config_as_the_gated_unsmeared_layer():
    """Checkpoints written before memory.long.mix / smear_keys existed hold gated, unsmeared layers:
    resuming them needs the config that says so, and a model without long-term memory resumes as is."""
    from pathlib import Path

    import pytest

    from mnemo.train.config import load_config, to_dict
    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    def old_tree(kind: str) -> dict:
        tree = to_dict(load_config(None, [f"memory.long.kind={kind}"]))
        del tree["memory"]["long"]["mix"], tree["memory"]["long"]["smear_keys"]
        return tree

    def check(tree, *overrides):
        return check_resume_compatible(tree, load_config(None, list(overrides)), {}, "sha", {}, Path("ckpt"))

    with pytest.raises(UserError, match="memory.long.mix: changed from 'gate' to 'joint'"):
        check(old_tree("knn"), "memory.long.kind=knn")
    check(old_tree("knn"), "memory.long.kind=knn", "memory.long.mix=gate", "memory.long.smear_keys=false")
    check(old_tree("none"), "memory.long.kind=none")


def test_a_value_span_changed_at_resume_is_refused_and_one_older_than_it_reads_as_none():
    """memory.long.value_span adds weights (and carried inputs) to the long-term layers: another one at resume
    is refused naming it; a checkpoint written before the key existed had none (1), and resumes as such."""
    from pathlib import Path

    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    knn = ["memory.long.kind=knn"]
    old = to_dict(load_config(None, knn))
    del old["memory"]["long"]["value_span"]

    def check(*overrides):
        return check_resume_compatible(old, load_config(None, [*knn, *overrides]), {}, "sha", {}, Path("ckpt"))

    check()
    with pytest.raises(UserError, match=r"memory\.long\.value_span: changed from 1 to 17"):
        check("memory.long.value_span=17")


@pytest.mark.parametrize(
    "key,value,changed",
    [("value_mix", "input", "from 'fixed' to 'input'"), ("value_gate", "true", "from False to True")],
)
def test_a_value_mix_or_gate_changed_at_resume_is_refused_and_one_older_than_it_reads_as_without(key, value, changed):
    """memory.long.value_mix "input" and value_gate each add a projection to the long-term layers: another
    setting at resume is refused naming the key; a checkpoint written before the key existed had neither (one
    weight per head and offset, "fixed"; no gate)."""
    from pathlib import Path

    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    spanned = ["memory.long.kind=knn", "memory.long.value_span=5"]
    old = to_dict(load_config(None, spanned))
    del old["memory"]["long"][key]

    def check(*overrides):
        return check_resume_compatible(old, load_config(None, [*spanned, *overrides]), {}, "sha", {}, Path("ckpt"))

    check()
    with pytest.raises(UserError, match=rf"memory\.long\.{key}: changed {changed}"):
        check(f"memory.long.{key}={value}")


def test_resume_takes_long_term_layers_by_the_layers_they_name():
    """[-2] and [2] name one layer of the 4-layer debug size: the resume was refused as "changed ... unsafe"."""
    from pathlib import Path

    from mnemo.train.errors import UserError
    from mnemo.train.resume import check_resume_compatible

    old = to_dict(load_config(None, ["model.size=debug", "memory.long.layers=[2]"]))

    def check(layers):
        cfg = load_config(None, ["model.size=debug", f"memory.long.layers={layers}"])
        return check_resume_compatible(old, cfg, {}, "sha", {}, Path("ckpt"))

    assert check("[-2]") == ["memory.long.layers: [2] -> [-2]"]  # the spelling changed: said, not refused
    with pytest.raises(UserError, match=r"memory\.long\.layers: changed from \[2\] to \[-1\]"):
        check("[-1]")


def test_a_resume_redoes_steps_with_other_values_for_every_change_but_where_it_is_kept_and_tracked():
    """What the tracker is told makes the steps after a checkpoint log other values (train/tracking/sender.py logs
    them again then, else it keeps MLflow's points of them)."""
    from pathlib import Path

    from mnemo.train.resume import check_resume_compatible, redo_changes

    old = to_dict(load_config(None, ["model.size=debug"]))

    def redo(*overrides, world_size=2, universal=False):
        cfg = load_config(None, ["model.size=debug", *overrides])
        changes = check_resume_compatible(old, cfg, {}, "sha", {}, Path("ckpt"))
        return redo_changes(changes, {"world_size": 2}, world_size, universal)

    kept = ("run.name=b", "tracking.experiment=e", "checkpoint.interval=7", "data.num_workers=0", "train.max_time_s=9")
    assert redo(*kept) == []
    assert redo(*kept, "train.lr=0.5") == ["train.lr: 0.001 -> 0.5"]
    assert redo("train.max_steps=7", "eval.max_docs=3") == ["eval.max_docs: 32 -> 3", "train.max_steps: 100 -> 7"]
    assert redo(world_size=1) == ["world size: 2 -> 1"]
    assert redo(world_size=1, universal=True) == ["world size: 2 -> 1"]
    assert redo(universal=True) == ["engine state read through the universal checkpoint form"]


def _numeric_keys() -> list[tuple[str, type]]:
    """(dotted key, int or float) of every number in the config tree, lists of numbers included (not those
    of data.sources' items)."""
    import typing

    return [
        (key, tp)
        for key, tp in leaf_types()
        if "[0]" not in key and (tp in (int, float) or typing.get_args(tp) in ((int,), (float,)))
    ]


NUMERIC_KEYS = _numeric_keys()


def test_the_numeric_key_list_is_the_whole_tree():
    # A new number in the config tree joins the non-finite checks below by itself.
    keys = dict(NUMERIC_KEYS)
    assert {
        "train.lr",
        "train.max_steps",
        "memory.long.layers",
        "checkpoint.grace_period_s",
        "train.passkey.promote_exact",
        "eval.passkey_distances",
    } <= set(keys)
    assert len(keys) >= 40


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC_KEYS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused_everywhere(key, value):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"override {key}") and "expected" in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.max_steps=inf", "train.max_steps: expected an integer, got 'inf'"),
        ("train.batch_size=nan", "train.batch_size: expected an integer, got 'nan'"),
        ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
        ("train.lr=0", "train.lr: must be > 0"),
        ("train.beta1=1", "train.beta1: must be in [0, 1)"),
        ("train.beta1=-0.1", "train.beta1: must be in [0, 1)"),
        ("train.beta2=1.5", "train.beta2: must be in [0, 1)"),
        ("train.weight_decay=-0.01", "train.weight_decay: must be >= 0"),
        ("train.seed=-1", "train.seed: must be in [0, 2**64)"),
        ("train.seed=18446744073709551616", "train.seed: must be in [0, 2**64)"),
        ("train.max_time_s=-1", "train.max_time_s: must be >= 0"),
        ("checkpoint.grace_period_s=0", "checkpoint.grace_period_s: must be in (0, 65535]"),
        ("checkpoint.grace_period_s=-5", "checkpoint.grace_period_s: must be in (0, 65535]"),
        ("checkpoint.grace_period_s=65536", "checkpoint.grace_period_s: must be in (0, 65535]"),
        ("checkpoint.collective_timeout_s=0", "checkpoint.collective_timeout_s: must be in (0, 1e9]"),
        ("checkpoint.collective_timeout_s=-1", "checkpoint.collective_timeout_s: must be in (0, 1e9]"),
        ("checkpoint.collective_timeout_s=1e12", "checkpoint.collective_timeout_s: must be in (0, 1e9]"),
        ("memory.long.temperature_init=0", "memory.long.temperature_init: must be > 0"),
        ("memory.long.temperature_init=-2", "memory.long.temperature_init: must be > 0"),
        ("memory.long.ivf_probe=0", "memory.long.ivf_probe: must be >= 1"),
        ("memory.long.layers=[1,1]", "memory.long.layers[1]: layer 1 is also memory.long.layers[0]"),
        ("memory.long.layers=[3,-1]", "memory.long.layers[1]: layer -1 is also memory.long.layers[0]"),
        ("memory.long.layers=[nan]", "memory.long.layers[0]: expected an integer"),
        ("eval.max_docs=-1", "eval.max_docs: must be >= 0"),
        ("eval.max_doc_tokens=0", "eval.max_doc_tokens: must be >= 1"),
        ("eval.passkey_trials=-1", "eval.passkey_trials: must be >= 0"),
        ("eval.tasks=[niah_single_number, bogus]", "eval.tasks[1]: unknown task 'bogus'"),
        ("eval.tasks=[mqar:n=0]", "eval.tasks[0]: mqar: parameter n must be >= 1"),
        ("eval.tasks=[passkey, passkey]", "eval.tasks[1]: task 'passkey' named twice"),
        (
            'eval.tasks=[niah_multikey_k16, "niah_multikey:k=16"]',
            "eval.tasks[1]: 'niah_multikey_k16' and 'niah_multikey:k=16' are the same task",
        ),
        ('eval.tasks=["mqar:n=4,q=2", "mqar:q=2,n=4"]', "eval.tasks[1]: 'mqar:n=4,q=2' and 'mqar:q=2,n=4' are the"),
        (
            'eval.tasks=[passkey, "niah_multivalue:v=2000000"]',
            "eval.tasks[1]: niah_multivalue:v=2000000: parameter v=2000000: the question and answer take 4,000,004",
        ),
        (
            'train.passkey.tasks=["variable_tracking:h=200"]',  # (distractors may spread: only the tail is sure)
            "train.passkey.tasks: variable_tracking:h=200: parameter h=200: the question and answer take 404",
        ),
        (
            'eval.tasks=["niah_multivalue:v=100000000"]',
            "eval.tasks[0]: niah_multivalue: parameter v=100000000: 100000000 distinct",
        ),
        ("eval.task_trials=0", "eval.task_trials: must be >= 1"),
        ("train.passkey.tasks=[passkey, passkey]", "train.passkey.tasks: task 'passkey' named twice"),
        ("train.passkey.tasks=[passkey, mqar, passkey]", "train.passkey.tasks: task 'passkey' named twice"),
        (
            'train.passkey.tasks=["mqar:n=4,q=2", "mqar:q=2,n=4"]',
            "train.passkey.tasks: 'mqar:n=4,q=2' and 'mqar:q=2,n=4' are the same task",
        ),
        ("eval.task_distances=[1,-1]", "eval.task_distances: must be >= 0"),
        ("tracking.peak_flops=-1", "tracking.peak_flops: must be >= 0"),
        ("data.val_fraction=nan", "data.val_fraction: expected a finite number"),
    ],
)
def test_out_of_range_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "train.beta1=0",
        "train.beta2=0.999",
        "train.weight_decay=0",
        "train.seed=0",
        "train.seed=18446744073709551615",
        "train.max_time_s=0",
        "checkpoint.grace_period_s=65535",
        "checkpoint.collective_timeout_s=1e9",
        "memory.long.temperature_init=0.5",
        "memory.long.layers=[0,-1]",
        "eval.max_docs=0",
        "eval.passkey_trials=0",
        "tracking.peak_flops=0",
        "train.max_steps=1e3",
    ],
)
def test_edge_values_inside_the_ranges_are_accepted(override):
    load_config("configs/debug.yaml", [override])


def test_eval_tasks_defaults_and_names():
    cfg = load_config("configs/debug.yaml")
    assert (cfg.eval.tasks, cfg.eval.task_distances, cfg.eval.task_trials) == ([], [1, 8], 100)
    cfg = load_config("configs/debug.yaml", ["eval.tasks=[niah_multikey:k=4, mqar_n16, passkey]"])
    assert cfg.eval.tasks == ["niah_multikey:k=4", "mqar_n16", "passkey"]


def test_the_documented_defaults_are_the_config_defaults():
    """docs/memory.md's configuration table is what a user reads before setting a key: a default changed in
    config.py and not there (as `memory.long.ivf_probe` once was) misleads them. Every row must name a key of
    the tree and show its default (`quoted` or bare, YAML spelling)."""
    import re
    from pathlib import Path

    import yaml

    from mnemo.train.config import Config

    defaults = flatten(Config())
    doc = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
    rows = re.findall(r"^\| `([a-z_]+(?:\.[a-z_]+)+)` \| ([^|]+) \|", doc.read_text(), flags=re.M)
    assert len(rows) >= 15, "the configuration table of docs/memory.md was not found"
    for key, shown in rows:
        assert key in defaults, f"docs/memory.md documents `{key}`, which is not a config key"
        assert yaml.safe_load(shown.strip().strip("`")) == defaults[key], (
            f"docs/memory.md shows `{key}` defaulting to {shown.strip()}, the config to {defaults[key]!r}"
        )


# --------------------------------------------------------------------------- #
# A remote dataset: the trainer reads the first dataset's manifest.json and tokenizer locally

SECRET = "S3cretPW"


def _data_dir(path):
    from tests.unit.launch_workspace import stub_data_dir

    return stub_data_dir(path)


@pytest.mark.parametrize("key", ["run.dir", "data.path", "data.cache_dir", "data.tokenizer", "init_from"])
def test_a_path_key_that_is_not_utf8_is_refused_naming_the_key(tmp_path, key):
    """run.dir=r<byte \\xff> was a UnicodeEncodeError traceback from streaming's shared memory, in the rank."""
    import os

    from mnemo.train.config import check_paths

    odd = os.fsdecode(b"r\xff")
    over = {"data.path": str(tmp_path), "run.dir": str(tmp_path / "run"), key: odd}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    with pytest.raises(ConfigError, match=rf"^{key}: 'r\\xff' is not valid UTF-8 \(rename it\)$"):
        check_paths(cfg)


@pytest.mark.parametrize("url", [f"https://alice:{SECRET}@example.com/ds", "s3://bucket/ds", "gs://b/ds/"])
def test_a_remote_data_path_is_refused_naming_data_path_with_credentials_hidden(tmp_path, url):
    from mnemo.train.config import check_paths

    cfg = load_config(None, [f"data.path={url}", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    msg = str(e.value)
    # Before: "data.tokenizer: no such file: https:/alice:S3cretPW@example.com/ds/tokenizer.model".
    assert msg.startswith("data.path: ") and "is remote" in msg and "local" in msg, msg
    assert SECRET not in msg and ":/" + "/" in msg and "data.tokenizer" not in msg, msg
    cfg = load_config(None, [f"data.path={url}", f"data.tokenizer={tmp_path}/t.model", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"^data\.path: .* is remote"):  # its manifest.json is needed too
        check_paths(cfg)


def test_a_mixture_may_stream_its_later_sources_but_not_the_first(tmp_path):
    from mnemo.train.config import check_paths

    local = _data_dir(tmp_path / "local")
    remote = f"s3://u:{SECRET}@bucket/ds"
    cfg = load_config(None, [f"data.sources=[{{path: '{remote}'}}, {{path: {local}}}]", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.path: .* is remote.*list a local source first") as e:
        check_paths(cfg)
    assert SECRET not in str(e.value)
    cfg = load_config(None, [f"data.sources=[{{path: {local}}}, {{path: '{remote}'}}]", f"run.dir={tmp_path}/r"])
    check_paths(cfg)


@pytest.mark.parametrize("url", ["s3://[b/x", f"s3://u:{SECRET}@[b/x", "https://h]/ds"])
def test_a_later_source_url_that_cannot_be_split_is_one_line_naming_it(tmp_path, url):
    # Was: accepted here, then streaming's urlparse raised "ValueError: Invalid IPv6 URL" as a traceback in
    # every rank (the first source and data.path were refused as remote, a file:// one by its own check).
    from mnemo.train.config import check_paths

    local = _data_dir(tmp_path / "local")
    cfg = load_config(None, [f"data.sources=[{{path: {local}}}, {{path: '{url}'}}]", f"run.dir={tmp_path}/r"])
    with pytest.raises(
        ConfigError, match=r"^data\.sources\[1\]\.path '.*': not a valid URL \(Invalid IPv6 URL\)$"
    ) as e:
        check_paths(cfg)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("url", ["foo://host/ds", f"https://u:{SECRET}@example.com/ds", "HTTP://h/ds"])
def test_a_later_source_streaming_cannot_read_is_one_line_naming_it(tmp_path, url):
    # Was: accepted here and by `mnemo launch --dry-run`, then "ValueError: Unsupported remote path" as a
    # traceback in every rank at start-up.
    from mnemo.train.config import check_paths

    local = _data_dir(tmp_path / "local")
    cfg = load_config(None, [f"data.sources=[{{path: {local}}}, {{path: '{url}'}}]", f"run.dir={tmp_path}/r"])
    scheme = url.split(":")[0].lower()
    with pytest.raises(
        ConfigError,
        match=rf"^data\.sources\[1\]\.path: .*: streaming cannot read a {scheme}:// dataset \(it reads .*s3://",
    ) as e:
        check_paths(cfg)
    assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_the_streamed_schemes_are_streaming_s_own():
    # A copy (importing streaming costs a second of each config check): equal to the downloaders it has.
    from mnemo.data_pipeline.lean_imports import import_streaming
    from mnemo.data_pipeline.paths import STREAMED_SCHEMES

    import_streaming()
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    assert set(STREAMED_SCHEMES) == set(DOWNLOADER_MAPPINGS) - {"", "dbfs-uc"}


def test_a_remote_data_tokenizer_is_refused_and_a_file_url_is_its_path(tmp_path):
    from mnemo.train.config import check_paths, tokenizer_path

    data = _data_dir(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", "data.tokenizer=https://h/t.model", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: https://h/t\.model: give a local file"):
        check_paths(cfg)
    cfg = load_config(None, [f"data.path={data}", f"data.tokenizer=file://{tmp_path}/my%20tok.model"])
    assert tokenizer_path(cfg) == f"{tmp_path}/my tok.model"  # what the trainer opens
    assert tokenizer_path(load_config(None, [f"data.path=file://{data}"])) == f"{data}/tokenizer.model"


@pytest.mark.parametrize(
    "what, why",
    [
        ("fifo", "a FIFO (named pipe), not a regular file"),
        ("dir", "a directory, not a file"),
        ("missing", "no such file"),
    ],
)
def test_a_data_tokenizer_that_is_no_regular_file_is_named_as_such(tmp_path, what, why):
    """data.tokenizer a FIFO, /dev/zero or a folder said "no such file" (Path.is_file); named as verify names them."""
    from mnemo.train.config import check_paths

    data, tok = _data_dir(tmp_path / "data"), tmp_path / "t.model"
    if what == "fifo":
        os.mkfifo(tok)
    elif what == "dir":
        tok.mkdir()
    cfg = load_config(None, [f"data.path={data}", f"data.tokenizer={tok}", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=rf"^data\.tokenizer: {re.escape(why)}: {re.escape(str(tok))}$"):
        check_paths(cfg)


def test_a_data_cache_dir_that_cannot_be_a_folder_is_refused_before_any_rank(tmp_path):
    """data.cache_dir was never checked: a regular file there was each rank's NotADirectoryError traceback
    ('cachefile/node-HOST'), after run.dir's config.yaml and run.lock were written; launch --dry-run took it."""
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    (tmp_path / "cachefile").write_text("mine\n")
    base = [f"data.path={data}", f"run.dir={tmp_path}/r"]
    for cache, needle in [
        ("cachefile", "is not a directory"),
        ("cachefile/sub", f": {tmp_path / 'cachefile'} is not a"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_paths(load_config(None, [*base, f"data.cache_dir={tmp_path / cache}"]))
        assert str(e.value).startswith(f"data.cache_dir: {tmp_path / cache}") and needle in str(e.value), str(e.value)
    assert (tmp_path / "cachefile").read_text() == "mine\n" and not (tmp_path / "r").exists()
    check_paths(load_config(None, [*base, f"data.cache_dir={tmp_path}/new/cache"]))  # made by the ranks
    check_paths(load_config(None, [*base, f"data.cache_dir={tmp_path}"]))


def test_a_data_cache_dir_the_ranks_may_not_make_is_refused_before_any_rank(tmp_path, monkeypatch):
    """A data.cache_dir under a folder nobody may write passed the pre-flight (launch --dry-run said
    nothing) and failed in the ranks with a line naming no key."""
    import os
    from pathlib import Path

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    base = [f"data.path={data}", f"run.dir={tmp_path}/r"]
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    with pytest.raises(ConfigError, match=rf"^data.cache_dir: {locked}/cache: cannot be made in {locked}"):
        check_paths(load_config(None, [*base, f"data.cache_dir={locked}/cache"]))
    check_paths(load_config(None, [*base, f"data.cache_dir={tmp_path}/free/cache"]))


def test_an_existing_data_cache_dir_the_ranks_may_not_write_is_refused_before_any_rank(tmp_path, monkeypatch):
    """Writability was asked only of a data.cache_dir still to be made: an existing one that could not be
    written passed, and the ranks failed after config.yaml and run.lock were written. And a folder to make
    on a read-only mount was said to be '(Permission denied)'. Now both are asked, and the reason told."""
    import os
    import types
    from pathlib import Path

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    base = [f"data.path={data}", f"run.dir={tmp_path}/r"]
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() != 0:  # root passes permission bits: then access() is what the test sets
        locked.chmod(0o555)
    real_access, real_statvfs = os.access, os.statvfs
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(ConfigError, match=rf"^data.cache_dir: {locked}: cannot be written \(Permission denied\)"):
        check_paths(load_config(None, [*base, f"data.cache_dir={locked}"]))
    assert not (tmp_path / "r").exists()
    # A read-only mount: access() says no to root too; statvfs tells it from a permission.
    ro = types.SimpleNamespace(f_flag=os.ST_RDONLY)
    monkeypatch.setattr(os, "statvfs", lambda p: ro if Path(p) == locked else real_statvfs(p))
    with pytest.raises(ConfigError, match=rf"^data.cache_dir: {locked}: cannot be written \(Read-only file system\)"):
        check_paths(load_config(None, [*base, f"data.cache_dir={locked}"]))
    with pytest.raises(ConfigError, match=rf"^data.cache_dir: {locked}/sub: cannot be made in {locked} \(Read-only"):
        check_paths(load_config(None, [*base, f"data.cache_dir={locked}/sub"]))
    locked.chmod(0o755)
    check_paths(load_config(None, [*base, f"data.cache_dir={tmp_path}"]))  # an existing folder that may be written


# --------------------------------------------------------------------------- #
# The shards index.json lists: checked before any rank starts


def _index_with_one_shard(data, basename="part-00000/shard.00000.mds"):
    import json

    entry = {"raw_data": {"basename": basename, "bytes": 4}, "samples": 1}
    entry["zip_data"] = {"basename": basename + ".zstd", "bytes": 3}
    (data / "index.json").write_text(json.dumps({"version": 2, "shards": [entry]}))
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_documents": 1}))  # the one sample listed


def test_a_missing_shard_is_a_config_error_before_any_rank_starts(tmp_path):
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    _index_with_one_shard(data)
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    # Before: accepted; each rank then died in streaming ("path to remote dataset must be provided").
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert str(e.value) == (
        f"data.path: shard part-00000/shard.00000.mds.zstd: missing (listed in {data / 'index.json'})"
    )
    (data / "part-00000").mkdir()
    # A FIFO (or a folder) in the shard's place was called "missing" too; data verify names it.
    import os

    os.mkfifo(data / "part-00000" / "shard.00000.mds.zstd")
    with pytest.raises(ConfigError, match=r"mds\.zstd: a FIFO \(named pipe\), not a regular file \(listed"):
        check_paths(cfg)
    os.remove(data / "part-00000" / "shard.00000.mds.zstd")
    (data / "part-00000" / "shard.00000.mds").write_bytes((1).to_bytes(4, "little"))  # the raw file alone will do
    check_paths(cfg)


@pytest.mark.parametrize("compression", [None, "zstd", "zstd:7", "gz"])
@pytest.mark.parametrize("says", [5, 0, 10**12])
def test_a_shard_whose_sample_count_is_not_index_json_s_is_refused_before_any_rank(
    tmp_path, compression, says, monkeypatch
):
    # Was: trusted. 5 for a shard of 6 trained on 5 documents silently, 0 was streaming's "Stream contains no
    # samples" naming the run's cache, 10**12 an "out of host memory ... lower train.batch_size" blaming the
    # config. The count in the shard's header is read (one block decompressed), as `mnemo eval --data` checks it.
    import gzip
    import json

    import zstandard

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    raw = (6).to_bytes(4, "little") + bytes(100)  # an MDS header: the sample count first
    name = "part-00000/shard.00000.mds"
    entry = {"raw_data": {"basename": name, "bytes": len(raw)}, "samples": 6, "compression": compression}
    (data / "part-00000").mkdir()
    if compression is None:
        (data / name).write_bytes(raw)
    else:
        algo = compression.split(":")[0]
        packed = zstandard.ZstdCompressor().compress(raw) if algo == "zstd" else gzip.compress(raw)
        entry["zip_data"] = {"basename": f"{name}.{algo}", "bytes": len(packed)}
        (data / entry["zip_data"]["basename"]).write_bytes(packed)
    shown = entry["zip_data"]["basename"] if compression else name
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_documents": 6}))  # what the shard holds

    def index(samples):
        (data / "index.json").write_text(json.dumps({"version": 2, "shards": [{**entry, "samples": samples}]}))

    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    index(6)
    check_paths(cfg)
    index(says)
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert str(e.value) == f"data.path: shard {shown}: holds 6 samples, {data / 'index.json'} says {says}"
    monkeypatch.setenv("LOCAL_RANK", "1")  # a host's other ranks: its local rank 0 (or the launcher) read them
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_documents": says}))  # only the header differs
    check_paths(cfg)
    monkeypatch.setenv("LOCAL_RANK", "0")
    if compression:  # a file that is not what index.json says it is: one line naming the shard
        (data / shown).write_bytes(b"not compressed at all")
        with pytest.raises(ConfigError, match=rf"^data\.path: shard {shown}: does not decompress .*\(corrupted\)$"):
            check_paths(cfg)


def test_an_index_naming_a_file_outside_the_shard_names_is_refused_before_any_rank_starts(tmp_path):
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    _index_with_one_shard(data, basename="../../etc/passwd")
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"^data\.path: .*index\.json"):
        check_paths(cfg)


# --------------------------------------------------------------------------- #
# manifest.json's vocab_size sizes the model: checked against the tokenizer before any rank starts


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    from mnemo.data_pipeline.tokenizer import train_tokenizer

    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "c.txt").write_text(" ".join(f"word{i % 97} and more text {i}" for i in range(3000)) + "\n")
    return train_tokenizer([str(tmp / "c.txt")], tmp / "t.model", vocab_size=300)


def _manifest(**fields) -> dict:
    """The fields the trainer reads from a dataset's manifest.json (verify.read_manifest), with ``fields``."""
    from tests.unit.launch_workspace import STUB_DOCUMENTS

    # num_documents: the samples of stub_data_dir's index.json (the pre-start check compares them)
    base = dict(tokenizer_sha256="", vocab_size=300, eos_id=2, token_dtype="uint16", num_documents=STUB_DOCUMENTS)
    base["num_tokens"] = 9
    return {**base, **fields}


@pytest.mark.parametrize("missing", ["vocab_size", "eos_id", "num_documents"])
def test_a_manifest_without_a_field_the_trainer_reads_is_refused_before_any_rank(tmp_path, sp_tokenizer, missing):
    """Before: accepted by the pre-flight (a manifest without vocab_size was "the trainer's to refuse"), so
    every rank printed the error, followed by torchrun's traceback."""
    import json
    import shutil

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    shutil.copyfile(sp_tokenizer.path, data / "tokenizer.model")
    fields = _manifest(vocab_size=sp_tokenizer.vocab_size)
    del fields[missing]
    (data / "manifest.json").write_text(json.dumps(fields))
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=rf"^data\.path: .*manifest\.json: no '{missing}' \(not written by mnemo"):
        check_paths(cfg)


@pytest.mark.parametrize("vocab", ["abc", 0, -5, True, 1.5, 100, 10_000_000])
def test_a_manifest_vocab_size_that_is_not_the_tokenizers_is_refused(tmp_path, sp_tokenizer, vocab):
    import json
    import shutil

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    shutil.copyfile(sp_tokenizer.path, data / "tokenizer.model")
    manifest = data / "manifest.json"
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    manifest.write_text(json.dumps(_manifest(vocab_size=sp_tokenizer.vocab_size)))
    check_paths(cfg)
    # Before: accepted; the rank then failed on int("abc"), an empty embedding, an IndexError or memory.
    manifest.write_text(json.dumps(_manifest(vocab_size=vocab)))
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    msg = str(e.value)
    assert msg.startswith(f"data.path: {manifest}: vocab_size ") and "\n" not in msg, msg
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0:
        assert f"vocab_size {vocab} is not the vocab size {sp_tokenizer.vocab_size} of the tokenizer" in msg


def test_a_store_that_just_holds_max_distance_segments_is_accepted():
    """The pass key sits in segment 0 and is read at segment D: D x T stored entries keep it (configs/demo.yaml)."""
    over = ["train.passkey.fraction=0.5", "train.passkey.max_distance=8", "model.segment_len=64"]
    load_config("configs/debug.yaml", [*over, "memory.long.capacity=512"])
    with pytest.raises(ConfigError, match=r"^override train\.passkey\.max_distance: .* at least 512 .* 511"):
        load_config("configs/debug.yaml", [*over, "memory.long.capacity=511"])
    load_config("configs/debug.yaml", [*over, "memory.long.capacity=511", "train.passkey.fraction=0"])
    over = ["train.passkey.fraction=0.5", "train.passkey.max_distance=8", "model.segment_len=256"]
    with pytest.raises(ConfigError) as e:  # before: accepted, and trained with the key always evicted
        load_config("configs/debug.yaml", [*over, "memory.long.capacity=512"])
    assert str(e.value).startswith(
        "override train.passkey.max_distance: 8 segments of model.segment_len 256 need a long-term store of at "
        "least 2048 entries, more than memory.long.capacity 512"
    )


@pytest.mark.parametrize(
    "overrides,key",
    [
        (
            ["eval.passkey_trials=1", "eval.passkey_distances=[1, 1000000000000000000]"],
            "eval.passkey_distances[1]",
        ),
        (["eval.passkey_trials=1", "eval.passkey_distances=[100000000]"], "eval.passkey_distances[0]"),
        (["eval.passkey_trials=1", "eval.passkey_distances=[131072]"], "eval.passkey_distances[0]"),
        (["eval.tasks=[passkey]", "eval.task_distances=[1000000]"], "eval.task_distances[0]"),
        (
            ["train.passkey.fraction=0.5", "memory.long.kind=none", "train.passkey.max_distance=1000000"],
            "train.passkey.max_distance",
        ),
    ],
)
def test_distances_whose_documents_cannot_be_built_are_refused_before_any_is_built(overrides, key):
    """eval.passkey_distances had no upper bound: 10**30 was numpy's "Maximum allowed dimension exceeded"
    traceback (launch --dry-run and train), 10**8 asked numpy for 95 GiB, 10**6 took 29 s and 2 GB, in the
    pre-flight that builds a whole document. A distance in use is now bounded by (D + 1) x T <= 2**24 tokens,
    the limit of `mnemo prepare`'s passkey documents, in validate()."""
    over = ["model.segment_len=128", *overrides]
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", over)
    msg = str(e.value)
    assert msg.startswith(f"override {key}: D = ") and "16,777,216" in msg and "\n" not in msg, msg


def test_distances_whose_documents_fit_or_are_not_used_are_accepted():
    base = ["model.segment_len=128"]
    load_config("configs/debug.yaml", [*base, "eval.passkey_trials=1", "eval.passkey_distances=[131071]"])
    load_config("configs/debug.yaml", [*base, "eval.passkey_trials=0", "eval.passkey_distances=[1000000]"])
    load_config("configs/debug.yaml", [*base, "eval.task_distances=[1000000]"])  # no eval.tasks


_HUGE = "1" + "0" * 400


@pytest.mark.parametrize("key", [k for k, tp in NUMERIC_KEYS if tp is int or tp == list[int]])
def test_a_whole_number_past_int64_is_refused_for_every_integer_key(key):
    """1 followed by 400 zeros passed validation: train.max_tokens was an OverflowError in the schedule
    (train/schedule.py), train.spike.window one in train/spikes.py, in a rank, after run.dir was written to."""
    is_list = key in {k for k, tp in NUMERIC_KEYS if tp == list[int]}
    for sign in ("", "-"):
        value = f"[{sign}{_HUGE}]" if is_list else f"{sign}{_HUGE}"
        with pytest.raises(ConfigError) as e:
            load_config("configs/debug.yaml", [f"{key}={value}"])
        msg = str(e.value)
        where = f"{key}[0]" if is_list else key
        bound = "must be in [0, 2**64)" if key == "train.seed" else f"must be {'<' if not sign else '>'}= "
        assert msg.startswith(f"override {where}: {bound}") and len(msg) < 200, msg


def test_int64_whole_numbers_are_accepted_and_a_token_budget_of_one_is_exact():
    from mnemo.train.config import MAX_INT
    from mnemo.train.schedule import total_steps

    cfg = load_config("configs/debug.yaml", [f"train.max_tokens={MAX_INT}", f"train.spike.window={MAX_INT}"])
    assert total_steps(cfg, 1) == -(-MAX_INT // (cfg.model.segment_len * cfg.memory.bptt_segments))
    cfg.train.max_tokens = int(_HUGE)  # past validation's bound: the step count is still exact, not a float
    assert total_steps(cfg, 1) == -(-int(_HUGE) // (cfg.model.segment_len * cfg.memory.bptt_segments))
    with pytest.raises(ConfigError, match=r"^override train\.max_tokens: must be <= 9223372036854775807, got 9"):
        load_config("configs/debug.yaml", [f"train.max_tokens={MAX_INT + 1}"])


def test_max_steps_may_be_0_when_a_token_budget_sets_the_steps():
    """Before: 'train.max_steps: must be >= 1', though max_tokens > 0 leaves it unused (train/schedule.py)."""
    from mnemo.train.schedule import total_steps

    cfg = load_config("configs/debug.yaml", ["train.max_steps=0", "train.max_tokens=1000"])
    assert total_steps(cfg, 2) >= 1
    for over in (["train.max_steps=0"], ["train.max_steps=-1", "train.max_tokens=1000"]):
        with pytest.raises(
            ConfigError, match=r"^override train\.max_steps: must be >= 1 \(or 0 with a train\.max_tokens budget\)"
        ):
            load_config("configs/debug.yaml", over)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("tracking.uri=foo://bar", "unknown scheme 'foo'"),
        ("tracking.uri=localhost:5000", "unknown scheme 'localhost'"),
        ("tracking.uri=5", "MLFLOW_ALLOW_FILE_STORE=true"),  # a bare path is a file store
        ("tracking.uri=file:///tmp/nope", "MLFLOW_ALLOW_FILE_STORE=true"),
        ("tracking.uri=http://", "no host"),
        ("tracking.uri=Sqlite:///x.db", "lower case"),
        ("tracking.uri=postgresql+a+b://h/db", "unknown database scheme"),
        ("tracking.uri=databricks-uc", "Unity Catalog"),
        ("tracking.uri=http://[fe80::1%eth0:5000", "not a valid URI (Invalid IPv6 URL)"),  # was a traceback
        ("tracking.uri=http://mlflow.example:5000]", "not a valid URI (Invalid IPv6 URL)"),
        ("tracking.experiment=" + "e" * 501, "501 characters, over MLflow's limit of 500"),
        ("tracking.experiment=a\tb", "control character"),  # an override's string is taken as written
        ("tracking.experiment=a\nb", "control character"),
        ("tracking.experiment=   ", "only blanks"),
    ],
)
def test_a_tracking_uri_or_experiment_mlflow_cannot_use_is_refused_before_any_rank(
    tmp_path, monkeypatch, override, needle
):
    # Before: only rank 0's tracker found out, after the engine and the data were built; the other ranks then
    # died in their next collective (gloo "Connection closed by peer", torchrun's ChildFailedError).
    from mnemo.train.config import check_paths

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    data = _data_dir(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", override])
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert str(e.value).startswith(key + ": ") and needle in str(e.value), str(e.value)
    off = [f"data.path={data}", f"run.dir={tmp_path / 'run'}", override, "tracking.enabled=false"]
    check_paths(load_config(None, off))  # not used, not checked


def test_the_tracking_defaults_from_the_environment_are_checked_too_and_a_password_is_not_shown(tmp_path, monkeypatch):
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"foo://alice:{SECRET}@host")
    with pytest.raises(ConfigError, match=r"^tracking\.uri \(empty: \$MLFLOW_TRACKING_URI\): 'foo://\*\*\*@host'") as e:
        check_paths(cfg)
    assert SECRET not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://u:{SECRET}@mlflow.example:5000]")
    with pytest.raises(ConfigError, match=r"^tracking\.uri \(empty: \$MLFLOW_TRACKING_URI\): .*not a valid URI") as e:
        check_paths(cfg)
    assert SECRET not in str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "x\ty")
    with pytest.raises(ConfigError, match=r"^tracking\.experiment \(empty: \$MLFLOW_EXPERIMENT_NAME\): .*control"):
        check_paths(cfg)
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", "tracking.experiment=ok"])
    check_paths(cfg)  # the config's own value wins over the environment's


@pytest.mark.parametrize(
    "uri, shown, why",
    [
        (f"alice:{SECRET}@mlflow.example:5000", "'***@mlflow.example:5000'", "no scheme:// before its user:password@"),
        (f"https:/alice:{SECRET}@mlflow.example", "'https:/***@mlflow.example'", "no host after https://"),
        (f"https:{SECRET}@mlflow.example", "'***@mlflow.example'", "no host after https://"),
    ],
)
def test_a_tracking_uri_without_its_slashes_is_refused_without_its_password(tmp_path, monkeypatch, uri, shown, why):
    # Before: 'alice:PASS@host' was "unknown scheme 'alice'" with the URI shown whole (no scheme:// to redact).
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    assert str(e.value).startswith(f"tracking.uri: {shown}: {why}") and SECRET not in str(e.value), str(e.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ConfigError) as e:
        check_paths(load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}"]))
    assert str(e.value).startswith(f"tracking.uri (empty: $MLFLOW_TRACKING_URI): {shown}: {why}"), str(e.value)


def test_a_sqlite_uri_may_hold_a_blank_in_its_path(tmp_path):
    """A blank in sqlite:///PATH is read as written by SQLAlchemy and by MLflow (which makes the folder): the
    blank check for passwords refused sqlite:////data/my runs/x.db, and its advice (%20) failed."""
    from mnemo.train.config import check_paths
    from mnemo.train.tracking.common import uri_problem

    data = _data_dir(tmp_path / "data")
    uri = f"sqlite:///{tmp_path}/my runs\u00a0x/x.db"
    check_paths(load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}"]))
    assert uri_problem(f"sqlite:///{tmp_path}/a\nb/x.db").startswith("holds a blank or control character (U+000A")


def test_a_sqlite_store_whose_path_is_too_long_for_sqlite_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """SQLite opens no database whose absolute path is over 504 bytes (512 with room for "-journal"): a run.dir
    of ~500 bytes failed at start-up with "unable to open database file", after config.yaml, run.lock and the
    data cache were written. Refused now by the pre-flight, naming the cause and the ways out."""
    import sqlite3

    from mnemo.train.config import check_paths

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = _data_dir(tmp_path / "data")

    def run_dir_of(n: int) -> Path:  # a run dir whose mlflow.db is an n-byte path (names of <= 200 bytes)
        d, left = tmp_path / "r", n - len(str(tmp_path / "r")) - len("/mlflow.db")
        while left > 0:
            d, left = d / ("d" * min(200, left - 1)), left - min(200, left - 1) - 1
        assert len(str(d / "mlflow.db")) == n, (left, len(str(d / "mlflow.db")))
        return d

    fits, run_dir = run_dir_of(504), run_dir_of(505)
    fits.mkdir(parents=True)
    sqlite3.connect(fits / "mlflow.db").execute("create table t(x)")  # the longest path SQLite takes
    check_paths(load_config(None, [f"data.path={data}", f"run.dir={fits}"]))
    run_dir.mkdir(parents=True)
    with pytest.raises(sqlite3.OperationalError, match="unable to open database file"):  # one byte more
        sqlite3.connect(run_dir / "mlflow.db")
    run_dir.rmdir()
    with pytest.raises(ConfigError) as e:
        check_paths(load_config(None, [f"data.path={data}", f"run.dir={run_dir}"]))
    why = str(e.value)
    assert why.startswith("run.dir: ") and "\n" not in why, why
    assert "absolute path is 505 bytes long, over SQLite's limit of 504" in why, why
    assert why.endswith("use a shorter run.dir, set tracking.uri to a store elsewhere, or tracking.enabled=false")
    assert not run_dir.exists()
    uri = f"sqlite:///{run_dir}/mlflow.db"
    with pytest.raises(ConfigError, match=r"^tracking\.uri: .*505 bytes long.*use a shorter path"):
        check_paths(load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}"]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # the run dir's database is not used
    check_paths(load_config(None, [f"data.path={data}", f"run.dir={run_dir}"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    check_paths(load_config(None, [f"data.path={data}", f"run.dir={run_dir}", "tracking.enabled=false"]))


@pytest.mark.parametrize("blank", [" ", "\t", "\n", "\xa0", "\u2028", "\x7f"])
def test_a_tracking_uri_with_a_blank_or_control_character_is_refused_without_its_password(tmp_path, blank):
    # Before: a password with a blank escaped redaction, so it was shown in warnings and saved in config.yaml,
    # meta.json, MLflow params, SLURM scripts and ssh command lines; now such a URI never gets that far.
    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    uri = f"http://alice:PW{blank}{SECRET}@127.0.0.1:1"
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    why = str(e.value)
    assert why.startswith("tracking.uri: 'http://***@127.0.0.1:1': holds a blank or control character (U+"), why
    assert "percent-encode it as %" in why and SECRET not in why and "PW" not in why and "\n" not in why


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///abs/mlflow.db",
        "sqlite:///relative.db",
        "sqlite+pysqlite:///x.db",
        "http://127.0.0.1:5000",
        "HTTPS://alice:p%40ss@mlflow.example",
        "postgresql://u:p@db.example/mlflow",
        "postgresql+psycopg2://db.example/mlflow",
        "mysql+pymysql://db.example/mlflow",
        "mssql://db.example/mlflow",
        "databricks",
        "databricks://profile",
    ],
)
def test_the_tracking_uris_mlflow_opens_are_accepted(tmp_path, uri, monkeypatch):
    from mnemo.train.config import check_tracking
    from mnemo.train.tracking import common

    # The URI forms; whether this machine has each database driver is test_tracking's driver test.
    monkeypatch.setattr(common, "db_driver_problem", lambda uri: None)
    check_tracking(load_config(None, [f"tracking.uri={uri}", "tracking.experiment=a name, with: punctuation/é"]))


def test_a_file_store_is_accepted_where_mlflow_allows_it(monkeypatch):
    from mnemo.train.config import check_tracking

    for allow in ("true", "True", "1"):
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", allow)
        check_tracking(load_config(None, ["tracking.uri=file:///tmp/mlruns"]))
        check_tracking(load_config(None, ["tracking.uri=./mlruns"]))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")  # MLflow refuses that value
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        check_tracking(load_config(None, ["tracking.uri=./mlruns"]))


def test_passkey_episodes_that_cannot_fit_the_segment_are_refused_before_any_rank(tmp_path, sp_tokenizer):
    """Before: accepted by the pre-flight; each rank refused it ("passkey: the key sentence needs N tokens but the
    segment has room for M"), naming no key, after the run dir's config.yaml, run.lock and data cache were written."""
    import json
    import re
    import shutil

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    shutil.copyfile(sp_tokenizer.path, data / "tokenizer.model")
    (data / "manifest.json").write_text(json.dumps(_manifest(vocab_size=sp_tokenizer.vocab_size)))
    base = [f"data.path={data}", f"run.dir={tmp_path}/r", "train.passkey.fraction=0.5", "train.passkey.max_distance=1"]
    check_paths(load_config(None, [*base, "model.segment_len=256"]))
    for extra, needle in (
        ([], r"the key sentence needs \d+ tokens but the segment has room for \d+"),
        (["train.passkey.tasks=[mqar:n=16]"], r"mqar:n=16: 16 facts of up to \d+ tokens"),
    ):
        cfg = load_config(None, [*base, "model.segment_len=64", *extra])
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        msg = str(e.value)
        assert re.match(rf"^train\.passkey: {needle}.*; model\.segment_len is {cfg.model.segment_len} ", msg), msg
        assert "raise model.segment_len" in msg and "\n" not in msg
    assert not (tmp_path / "r").exists()
    check_paths(load_config(None, [*base, "model.segment_len=64", "train.passkey.fraction=0"]))  # no episodes


def test_a_passkey_evaluation_that_cannot_be_built_is_refused_before_any_rank(tmp_path, sp_tokenizer):
    """Before: accepted by the pre-flight; the run trained to its first eval.interval, then stopped on "passkey:
    the question needs N tokens, more than the segment length T" before that step's checkpoint (and again
    after every relaunch). A tokenizer that does not round-trip got the segment advice, which cannot help."""
    import json
    import shutil

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    shutil.copyfile(sp_tokenizer.path, data / "tokenizer.model")
    (data / "manifest.json").write_text(json.dumps(_manifest(vocab_size=sp_tokenizer.vocab_size)))
    base = [f"data.path={data}", f"run.dir={tmp_path}/r", "train.passkey.fraction=0", "eval.passkey_trials=2"]
    check_paths(load_config(None, [*base, "model.segment_len=64", "eval.passkey_distances=[1,4]"]))
    cfg = load_config(None, [*base, "model.segment_len=16", "memory.short.length=16", "eval.passkey_distances=[1]"])
    with pytest.raises(ConfigError) as e:
        check_paths(cfg)
    msg = str(e.value)
    assert msg.startswith("eval.passkey_trials: the question needs "), msg
    for key in ("eval.passkey_distances D=1", "model.segment_len 16", "eval.passkey_trials=0"):
        assert key in msg, msg
    assert "\n" not in msg and not (tmp_path / "r").exists()
    check_paths(load_config(None, [*base[:-1], "model.segment_len=16", "memory.short.length=16"]))  # trials 0


def test_a_tokenizer_that_does_not_round_trip_pass_keys_gets_no_segment_advice(tmp_path):
    """Before: "train.passkey: passkey: the tokenizer does not round-trip ...; raise model.segment_len", which
    cannot help, and the in-run passkey evaluation passed the pre-flight and stopped the run at its first eval."""
    import json

    from mnemo.train.config import check_paths

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, normalizers, pre_tokenizers

    from mnemo.data_pipeline.tokenizer import Tokenizer

    words = "the pass key is what remember it . ? 0 1 2 3 4 5 6 7 8 9".split()
    tk = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *words])}, "[UNK]")
    )
    tk.normalizer, tk.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(tmp_path / "lower.json"))
    vocab = Tokenizer(str(tmp_path / "lower.json")).vocab_size
    data = _data_dir(tmp_path / "data")
    (data / "manifest.json").write_text(json.dumps(_manifest(vocab_size=vocab)))
    base = [f"data.path={data}", f"run.dir={tmp_path}/r", "train.passkey.fraction=0", "eval.passkey_trials=2"]
    lossy = [*base, f"data.tokenizer={tmp_path / 'lower.json'}", "model.segment_len=64"]
    for extra, key in (
        ([], "eval.passkey_trials"),
        (["eval.passkey_trials=0", "train.passkey.fraction=0.5"], "train.passkey"),
    ):
        with pytest.raises(ConfigError) as e:
            check_paths(load_config(None, [*lossy, *extra]))
        msg = str(e.value)
        assert msg.startswith(f"{key}: the tokenizer does not round-trip "), msg
        # The episodes' own sentence, not the pre-flight's stand-in filler ("The grass is green..."), which
        # the user never wrote (the train.passkey message used to quote it).
        assert "' The pass key is '" in msg and "grass" not in msg, msg
        assert "lossless tokenizer" in msg and "segment_len" not in msg, msg


def test_a_tokenizer_that_loses_only_the_stand_in_filler_passes_the_pass_key_pre_flights(
    tmp_path, sp_tokenizer, monkeypatch
):
    """The pre-flights fit episodes with a stand-in filler; the runs fill with corpus token ids, which need no
    round trip. A tokenizer that does not give the stand-in's words back (here: "grass") but does the pass-key
    sentences was refused by both pre-flights, for text the user never wrote."""
    import json
    import shutil

    import mnemo.data_pipeline.tokenizer as tokenizer_module
    from mnemo.train.config import check_paths

    real = tokenizer_module.SentencePieceTokenizer

    class LosesGrass:
        def __init__(self, path):
            self.inner = real(path)
            self.eos_id, self.vocab_size = self.inner.eos_id, self.inner.vocab_size

        def encode(self, text):
            return self.inner.encode(text)

        def decode(self, ids):
            return self.inner.decode(ids).replace("grass", "gras")

    monkeypatch.setattr(tokenizer_module, "Tokenizer", LosesGrass)
    data = _data_dir(tmp_path / "data")
    shutil.copyfile(sp_tokenizer.path, data / "tokenizer.model")
    (data / "manifest.json").write_text(json.dumps(_manifest(vocab_size=sp_tokenizer.vocab_size)))
    base = [f"data.path={data}", f"run.dir={tmp_path}/r", "model.segment_len=256"]  # this tokenizer spells out
    check_paths(load_config(None, [*base, "train.passkey.fraction=0", "eval.passkey_trials=2"]))
    check_paths(load_config(None, [*base, "train.passkey.fraction=0.5", "eval.passkey_trials=0"]))


# A huge size passed the checks (lower bounds only) and crashed inside a rank: torch's "Overflow when unpacking
# long long", an allocation of 93 TiB, numpy's 1.42 PiB, or no error at all while a rank grew to 20 GB.
@pytest.mark.parametrize(
    "override,needle",
    [
        # Past int64: the bound of every integer key (train/config.py MAX_INT) is named first.
        ("memory.long.capacity=99999999999999999999", "memory.long.capacity: must be <= 9223372036854775807, got 9999"),
        ("memory.long.capacity=100000000000", "memory.long.capacity: must be <= 2147483647, got 100000000000"),
        ("memory.short.length=99999999999", "memory.short.length: must be <= 2147483647 (0 = off), got 9999"),
        ("model.segment_len=99999999999999", "model.segment_len: must be <= 2147483647, got 99999999999999"),
        ("memory.bptt_segments=1000000000", "memory.bptt_segments: must be <= 1024, got 1000000000"),
        ("memory.long.qk_span=100000", "memory.long.qk_span: must be <= 64 (1 = each token alone), got 100000"),
        ("memory.long.value_span=65", "memory.long.value_span: must be <= 64 (1 = each token alone), got 65"),
        ("memory.long.value_span=0", "memory.long.value_span: must be >= 1 (1 = each token alone), got 0"),
        ("memory.long.topk=2147483648", "memory.long.topk: must be <= 2147483647"),
        ("memory.long.ivf_probe=2147483648", "memory.long.ivf_probe: must be <= 2147483647"),
        ("train.batch_size=2147483648", "train.batch_size: must be <= 2147483647"),
    ],
)
def test_a_size_too_large_for_any_tensor_is_refused_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [override])
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "override",
    ["memory.long.capacity=2147483647", "memory.bptt_segments=1024", "memory.long.qk_span=64", "model.segment_len=2"],
)
def test_the_largest_sizes_inside_the_bounds_load(override):
    load_config("configs/debug.yaml", [override])  # the memory they need is check_memory_fit's to judge


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["memory.long.capacity=2147483647"], "memory.long.capacity"),
        (["memory.short.length=2147483647"], "memory.short.length"),
        (["model.segment_len=1000000000"], "model.segment_len"),  # was killed (exit 137) with no message
        (["memory.bptt_segments=1024", "model.segment_len=1000", "train.batch_size=100000"], "memory.bptt_segments"),
    ],
)
def test_a_config_whose_memory_cannot_fit_this_machine_is_refused_naming_the_key(overrides, key):
    from mnemo.train.config import check_memory_fit

    cfg = load_config("configs/debug.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        check_memory_fit(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{key}: training needs at least ") and "GiB available: lower " in msg, msg
    assert "\n" not in msg


def test_the_memory_check_counts_the_state_of_every_slot_and_each_local_rank(monkeypatch):
    import mnemo.evaluation.inference as inference
    from mnemo.train.config import check_memory_fit

    asked = []
    monkeypatch.setattr(inference, "available_bytes", lambda where, total=False: asked.append(where) or 2**30)
    # debug size: 4 layers of d_model 128; fp32 on this CPU-only config. Short-term: 4 slots x 4 layers x
    # 64 entries x 2 x 128 x 4 bytes = 1 MiB; the long-term store (1 layer) grows with the capacity.
    cfg = load_config("configs/debug.yaml", ["train.device=cpu", "memory.long.capacity=262144"])  # 1 GiB
    with pytest.raises(
        ConfigError, match=r"^memory\.long\.capacity: training needs at least 1\.0 GiB of memory on cpu"
    ):
        check_memory_fit(cfg)
    cfg = load_config("configs/debug.yaml", ["train.device=cpu", "memory.long.capacity=131072"])  # 0.5 GiB
    check_memory_fit(cfg)
    with pytest.raises(ConfigError, match=r"needs at least 1\.0 GiB of memory on cpu \(2 ranks x train\.batch_size 4"):
        check_memory_fit(cfg, ranks=2)  # local ranks share the host
    assert set(asked) == {"cpu"}


def test_the_memory_check_counts_the_attention_scores_of_a_step(monkeypatch):
    """Segments and a short-term memory of 4096 tokens at 64 slots passed the check (1.6 GiB counted) and
    failed at the first step with an allocation traceback: one joint layer's fp32 scores are
    B x H x T x (M+T) x 4 = 64 x 4 x 4096 x 8192 x 4 bytes = 32 GiB, held twice by its softmax."""
    import mnemo.evaluation.inference as inference
    from mnemo.train.config import check_memory_fit

    monkeypatch.setattr(inference, "available_bytes", lambda where, total=False: 23 * 2**30)  # the tester's host
    big = ["train.device=cpu", "train.batch_size=64", "model.segment_len=4096", "memory.short.length=4096"]
    with pytest.raises(ConfigError) as e:
        check_memory_fit(load_config("configs/debug.yaml", big))
    msg = str(e.value)
    assert msg.startswith("model.segment_len: training needs at least 84.3 GiB of memory on cpu"), msg
    assert "attention scores 72.0 GiB" in msg and "\n" not in msg, msg
    # A lower bound: measured, this run's peak RSS was 4.3 GiB (its estimate 1.2 GiB); it must pass there.
    monkeypatch.setattr(inference, "available_bytes", lambda where, total=False: int(4.3 * 2**30))
    fits = ["train.device=cpu", "train.batch_size=16", "model.segment_len=1024", "memory.short.length=1024"]
    check_memory_fit(load_config("configs/debug.yaml", fits))


@pytest.mark.parametrize(
    "overrides",
    [
        "train.batch_size=64 model.segment_len=4096 memory.short.length=4096 memory.long.mix=gate",
        "train.batch_size=64 model.segment_len=8192 memory.short.length=0 memory.long.kind=none",
    ],
)
def test_the_memory_check_counts_the_activations_every_layer_keeps(monkeypatch, tmp_path, overrides):
    """Both passed the check on the tester's host (23 GiB, 21 GiB available) and were killed by the kernel
    (exit 137) at about 21 GB: only joint layers' scores were counted, but SDPA's CPU kernel holds no scores
    (measured: its activations grow with B x T); what every block keeps for the backward (about 40 KiB a
    token at the debug size) and the [memory ; segment] mask SDPA keeps (8 GiB here) were left out.
    Measured at 1/16 of the batch: 1.9 and 2.0 GiB over the process, estimated 1.4 and 1.4."""
    import mnemo.evaluation.inference as inference
    from mnemo.train.config import check_memory_fit

    monkeypatch.setattr(inference, "available_bytes", lambda where, total=False: 21 * 2**30)
    data = _data_dir(tmp_path / "data")  # the logits count with the manifest's vocab_size
    tiny = ["train.device=cpu", f"data.path={data}", "memory.long.capacity=128", "memory.long.topk=4"]
    with pytest.raises(ConfigError) as e:
        check_memory_fit(load_config("configs/debug.yaml", [*tiny, *overrides.split()]))
    msg = str(e.value)
    assert msg.startswith("model.segment_len: training needs at least ") and "\n" not in msg, msg


def test_the_step_estimate_stays_below_measured_peaks():
    """training_step_parts against the peak RSS of real `mnemo train` runs on CPU (debug size, vocab 300,
    2 steps; about 1 GiB of it is Python, torch and DeepSpeed): a lower bound, so a run that fits is never
    refused. Measured when the attention scores were added to it."""
    from mnemo.train.config import training_step_parts

    measured = {  # overrides -> peak RSS, MiB
        "train.batch_size=16 model.segment_len=1024 memory.short.length=1024": 4402,
        "train.batch_size=8 model.segment_len=512 memory.short.length=512 memory.bptt_segments=3": 2219,
        "train.batch_size=16 model.segment_len=1024 memory.short.length=1024 model.activation_checkpointing=true": 4099,
        "train.batch_size=16 model.segment_len=1024 memory.short.length=1024 memory.long.mix=gate": 2391,
        "train.batch_size=16 model.segment_len=1024 memory.short.length=0 memory.long.layers=[1,2,3]": 4026,
    }
    for overrides, peak in measured.items():
        parts, _, _ = training_step_parts(load_config("configs/debug.yaml", overrides.split()), 300)
        assert sum(parts.values()) < (peak - 900) * 2**20, (overrides, parts)
        assert parts["attention scores"] > 0


@pytest.mark.parametrize("path", [*REPO_CONFIGS, "configs/demo.yaml", "configs/tasks.yaml"])
def test_the_shipped_configs_fit_the_memory_check(path, monkeypatch):
    """On the reference machine (24 GiB, of which 20 available to a run), whatever else runs here now: the
    check read this host's MemAvailable, and a busy machine failed small.yaml (18.0 GiB needed, 15.2 free)."""
    from mnemo.evaluation import inference
    from mnemo.train.config import check_memory_fit

    cfg = load_config(path, ["train.device=cpu"])
    monkeypatch.setattr(inference, "available_bytes", lambda device, total=False: 20 * 2**30)
    check_memory_fit(cfg)
    monkeypatch.setattr(inference, "available_bytes", lambda device, total=False: 2**20)  # the check can fail
    with pytest.raises(ConfigError, match="GiB of memory on cpu"):
        check_memory_fit(cfg)


def test_mnemo_train_refuses_a_state_too_large_before_writing_anything(tmp_path, capsys):
    """`memory.long.capacity=100000000000` failed in init_state with a traceback after the run dir was made."""
    from mnemo.cli import main

    data = _data_dir(tmp_path / "data")
    run = tmp_path / "run"
    for argv in (
        ["train", "configs/debug.yaml"],
        ["launch", "configs/debug.yaml", "--nproc-per-node", "1"],
    ):
        rc = main([*argv, f"data.path={data}", f"run.dir={run}", "train.device=cpu", "memory.long.capacity=2147483647"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert err[0].startswith("mnemo: error: memory.long.capacity: training needs at least "), err
        assert not run.exists()
    # A dry run (its ranks may run elsewhere) checks the bounds only.
    rc = main(
        [
            "launch",
            "configs/debug.yaml",
            "--dry-run",
            f"data.path={data}",
            f"run.dir={run}",
            "memory.long.capacity=2147483647",
        ]
    )
    assert rc == 0, capsys.readouterr().err


def test_tied_queries_and_keys_need_a_span():
    """memory.long.qk_tied shares the span's projection between queries and keys: without a span
    (qk_span 1) there is nothing to share, refused naming both keys; with one it reaches the model."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", ["memory.long.kind=knn", "memory.long.qk_tied=true"])
    assert "memory.long.qk_tied: needs memory.long.qk_span >= 2 (it is 1" in str(e.value) and "\n" not in str(e.value)
    tied = ["memory.long.kind=knn", "memory.long.qk_tied=true", "memory.long.qk_span=5"]
    with pytest.raises(ConfigError) as e:  # smear_keys defaults to true
        load_config("configs/debug.yaml", tied)
    assert "memory.long.qk_tied: needs memory.long.smear_keys: false" in str(e.value), str(e.value)
    tied.append("memory.long.smear_keys=false")
    cfg = load_config("configs/debug.yaml", tied)
    assert cfg.memory.long.qk_tied is True and cfg.memory.long.qk_span == 5
    from mnemo.train.engine import model_args_from_config

    args = model_args_from_config(cfg, 4096)
    assert args.ltm_qk_tied is True and args.ltm_qk_span == 5


def test_a_value_span_reaches_the_model():
    cfg = load_config("configs/debug.yaml", ["memory.long.kind=knn", "memory.long.value_span=17"])
    from mnemo.train.engine import model_args_from_config

    assert cfg.memory.long.value_span == 17 and model_args_from_config(cfg, 4096).ltm_value_span == 17


@pytest.mark.parametrize(
    "key,on,bad,field,want,default,needs",
    [
        # value_mix "input" chooses the weights of a value span's earlier values per token.
        ("value_mix", "input", "learned", "ltm_value_mix", "input", "fixed", "'input' needs"),
        # value_gate scales each earlier token's share of a value span; a non-boolean is refused.
        ("value_gate", "true", "2", "ltm_value_gate", True, False, "needs"),
    ],
)
def test_a_value_mix_or_gate_reaches_the_model_and_needs_a_value_span(key, on, bad, field, want, default, needs):
    """Without a value span (1) there is nothing to choose or scale, which is one line naming both keys before
    any process starts; a bad value is refused naming the key; the setting reaches the model's arguments."""
    from mnemo.train.engine import model_args_from_config

    knn = ["memory.long.kind=knn"]
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [*knn, f"memory.long.{key}={on}"])
    assert f"memory.long.{key}: {needs} memory.long.value_span >= 2 (it is 1" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=f"memory.long.{key}"):
        load_config("configs/debug.yaml", [*knn, "memory.long.value_span=5", f"memory.long.{key}={bad}"])
    cfg = load_config("configs/debug.yaml", [*knn, "memory.long.value_span=5", f"memory.long.{key}={on}"])
    for got, expected in (
        (getattr(model_args_from_config(cfg, 4096), field), want),
        (getattr(model_args_from_config(load_config("configs/debug.yaml", knn), 4096), field), default),
    ):
        assert got == expected and type(got) is type(expected)


def test_init_from_with_a_named_checkpoint_to_resume_is_refused_naming_both_keys():
    """`init_from=A checkpoint.resume=B` resumed from B and never read A (the trainer runs init_from only when
    nothing is resumed): refused in validate(), before any process starts. With auto (a relaunch goes on from
    the run's own checkpoints) or never, init_from is what starts the run."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", ["init_from=runs/base", "checkpoint.resume=runs/other/checkpoints/step_5"])
    msg = str(e.value)
    assert msg.startswith("override init_from: 'runs/base' with checkpoint.resume='runs/other/checkpoints/step_5'")
    assert "\n" not in msg, msg
    for resume in ("auto", "never"):
        cfg = load_config("configs/debug.yaml", ["init_from=runs/base", f"checkpoint.resume={resume}"])
        assert (cfg.init_from, cfg.checkpoint.resume) == ("runs/base", resume)
    load_config("configs/debug.yaml", ["init_from=", "checkpoint.resume=runs/other/checkpoints/step_5"])


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["eval.passkey_trials=3", "eval.passkey_distances=[]"], "eval.passkey_distances"),
        (["eval.tasks=[mqar]", "eval.task_distances=[]"], "eval.task_distances"),
    ],
)
def test_an_empty_distance_list_of_an_evaluation_in_use_is_refused(overrides, key):
    """eval.passkey_distances=[] with passkey trials, or eval.task_distances=[] with eval.tasks, was accepted
    and scored nothing (the tasks' accuracy plot was drawn empty, with a matplotlib warning). Refused in one
    line, as an empty train.passkey.tasks or memory.long.layers is; an empty list of an evaluation that is
    off is fine."""
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", overrides)
    msg = str(e.value)
    assert msg.startswith(f"override {key}: must name at least one distance while ") and "\n" not in msg, msg
    load_config("configs/debug.yaml", ["eval.passkey_trials=0", "eval.passkey_distances=[]", "eval.task_distances=[]"])


def test_a_checkpoint_config_breaking_a_start_rule_still_loads():
    """init_from with checkpoint.resume=PATH, and an empty distance list of an evaluation in use, are refused
    when a run starts (load_config); a checkpoint's saved config (from_dict, as eval/generate/export read it)
    that a run of before those rules wrote still loads."""
    from mnemo.train.config import from_dict

    cfg = load_config("configs/debug.yaml")
    tree = to_dict(cfg)
    tree["init_from"], tree["checkpoint"]["resume"] = "runs/base", "runs/a/checkpoints/step_00000004"
    tree["eval"]["passkey_trials"], tree["eval"]["passkey_distances"] = 3, []
    tree["eval"]["tasks"], tree["eval"]["task_distances"] = ["mqar"], []
    got = from_dict(tree)
    assert got.init_from == "runs/base" and got.eval.passkey_distances == [] and got.eval.task_distances == []


def test_an_index_listing_a_shard_twice_is_refused_before_any_rank(tmp_path):
    """index.json listing its one shard twice: training read each document twice per epoch, no error (only
    `mnemo data verify` counted). The pre-start check compares its samples with manifest.json's num_documents."""
    import json

    from mnemo.train.config import check_paths

    data = _data_dir(tmp_path / "data")
    cfg = load_config(None, [f"data.path={data}", f"run.dir={tmp_path}/r"])
    check_paths(cfg)
    index = json.loads((data / "index.json").read_text())
    (data / "index.json").write_text(json.dumps({**index, "shards": index["shards"] * 2}))
    with pytest.raises(
        ConfigError,
        match=r"^data\.path: \S+index\.json: its shards hold 8192 samples, manifest\.json says 4096 documents",
    ):
        check_paths(cfg)
