"""The config loader: defaults < YAML (with base includes) < key=value, every key and type checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from medssl.config import load_config, save_config, to_dict
from medssl.errors import ConfigError


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError(f"train.max_steps must be positive, got {self.max_steps}")


@dataclass
class Root:
    output_dir: str = "runs/x"
    mode: Literal["online", "offline", "disabled"] = "disabled"
    precision: Literal["bf16", "no"] = "bf16"
    tags: list[str] = field(default_factory=list)
    note: str | None = None
    train: Train = field(default_factory=Train)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {max_steps: 5, lr: 1}\nmode: offline\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {max_steps: 7}\ntags: [a, b]\n")
    cfg = load_config(Root, child, ["train.lr=0.5", "note=hello", "train.betas=[0.8,0.9]"])
    assert cfg.train.max_steps == 7          # child beats base
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)  # override beats both
    assert cfg.mode == "offline"             # from base
    assert cfg.tags == ["a", "b"]
    assert cfg.note == "hello"
    assert cfg.train.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.max_step=3", "unknown key 'train.max_step'"),
        ("mode=sometimes", "mode must be one of online | offline | disabled"),
        ("train.max_steps=1.5", "train.max_steps must be a whole number"),
        ("train.max_steps=0", "train.max_steps must be positive"),
        ("train.betas=[1]", "train.betas needs 2 values"),
        ("novalue", "is not key=value"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("|", r"\|").replace("[", r"\[")):
        load_config(Root, None, [override])


def test_missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Root, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Root, bad)


def test_saved_config_round_trips_with_git_sha(tmp_path):
    cfg = load_config(Root, None, ["train.max_steps=3"])
    save_config(cfg, tmp_path / "config.yaml", extra={"window": {"center": 40}})
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["git_sha"]
    assert saved["window"] == {"center": 40}
    saved.pop("git_sha"), saved.pop("window")
    assert saved == to_dict(cfg)
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(saved))
    assert load_config(Root, tmp_path / "plain.yaml", []) == cfg


def test_bare_yaml_no_means_the_choice_it_spells():
    assert load_config(Root, None, ["precision=no"]).precision == "no"
    with pytest.raises(ConfigError, match="mode must be one of"):
        load_config(Root, None, ["mode=no"])


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-6 as the string '1e-6'; a float field takes it as the number it spells.
    assert load_config(Root, None, ["train.lr=1e-6"]).train.lr == 1e-6
    (tmp_path / "c.yaml").write_text("train: {lr: 5E-4}\n")
    assert load_config(Root, tmp_path / "c.yaml").train.lr == 5e-4
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load_config(Root, None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="train.max_steps must be a whole number"):
        load_config(Root, None, ["train.max_steps=1e3"])


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.lr=-.inf", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("train.betas=[.nan, 0.9]", r"train.betas\[0\]"),
])
def test_nonfinite_floats_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
        load_config(Root, None, [override])
