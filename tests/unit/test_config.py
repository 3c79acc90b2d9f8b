"""The typed config tree: loading, overrides, errors that name the key."""

from __future__ import annotations

import pytest

from mnemo.train.config import ConfigError, flatten, from_dict, load_config, to_dict, to_yaml

REPO_CONFIGS = ["configs/debug.yaml", "configs/small.yaml", "configs/medium.yaml", "configs/large.yaml"]


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.size in path or path.endswith("debug.yaml")


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config("configs/debug.yaml", ["train.lr=1e-3", "train.max_steps=7", "memory.long.layers=[1,3]",
                                             "tracking.enabled=false", "memory.long.kind=none"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and cfg.memory.long.layers == [1, 3]
    assert cfg.tracking.enabled is False and cfg.memory.long.kind == "none"


@pytest.mark.parametrize("override,needle", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["nosuch.key=1"], "unknown config key 'nosuch'"),
    (["train.max_steps=ten"], "train.max_steps: expected an integer"),
    (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
    (["zero.stage=4"], "zero.stage: must be 1, 2 or 3"),
    (["memory.long.kind=lsh"], "memory.long.kind: 'lsh' is not one of none, knn"),
    (["model.size=huge"], "model.size: unknown size 'huge'"),
    (["memory.long.layers=[9]"], "memory.long.layers[0]: layer 9 out of range"),
    (["train.lr"], "not of the form dotted.key=value"),
    (["train=1"], "'train' is a section"),
    (["train.passkey.fraction=1.5"], "train.passkey.fraction: must be in [0, 1]"),
    (["train.passkey.start_distance=4", "train.passkey.max_distance=2"],
     "train.passkey.max_distance: must be >= train.passkey.start_distance"),
    (["train.passkey.promote_window=0"], "train.passkey.promote_window: must be >= 1"),
    (["train.passkey.frac=0.5"], "unknown config key 'train.passkey.frac'"),
])
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
    from mnemo.train.trainer import _check_resume_compatible

    def old_tree(kind: str) -> dict:
        tree = to_dict(load_config(None, [f"memory.long.kind={kind}"]))
        del tree["memory"]["long"]["mix"], tree["memory"]["long"]["smear_keys"]
        return tree

    def check(tree, *overrides):
        return _check_resume_compatible(tree, load_config(None, list(overrides)), {}, "sha", {}, Path("ckpt"))

    with pytest.raises(UserError, match="memory.long.mix: changed from 'gate' to 'joint'"):
        check(old_tree("knn"), "memory.long.kind=knn")
    check(old_tree("knn"), "memory.long.kind=knn", "memory.long.mix=gate", "memory.long.smear_keys=false")
    check(old_tree("none"), "memory.long.kind=none")
