import pytest

from grace_plugin.config import ConfigError, TrainConfig, apply_overrides, parse_overrides
from grace_plugin.finetune import build_config


def test_overrides_are_typed_and_nested():
    d = parse_overrides(["train.lr=3e-5", "recipe.rank_levels=[0, 1, 2]", "recipe.lora=false"])
    assert d == {"train": {"lr": 3e-5}, "recipe": {"rank_levels": [0, 1, 2], "lora": False}}
    cfg = apply_overrides(TrainConfig(), {"lr": "1e-3", "steps": 5})
    assert cfg.lr == 1e-3 and cfg.steps == 5


@pytest.mark.parametrize("bad", ["train.lr", "=3", "train..lr=1"])
def test_malformed_set(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_unknown_field_names_valid_choices():
    with pytest.raises(ConfigError, match="unknown config field 'train.lrr'.*valid fields:.*lr"):
        build_config("ft", overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected a number"):
        build_config("ft", overrides=["train.lr=abc"])


def test_yaml_then_set_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.5\n  batch_size: 7\nrecipe:\n  rho: 0.2\n")
    cfg = build_config("grace", config_file=f, overrides=["train.lr=0.25"], steps=3)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.recipe.rho, cfg.train.steps) == (0.25, 7, 0.2, 3)
