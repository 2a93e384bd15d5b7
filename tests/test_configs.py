"""Every paper config in configs/paper/ is valid for the recipe its file is named after (no silent typos)."""
from pathlib import Path

import pytest

from grace_plugin.finetune import build_config
from grace_plugin.recipes import list_recipes

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_config_loads(path):
    assert path.stem in list_recipes()
    cfg = build_config(path.stem, config_file=path)
    assert cfg.train.epochs and cfg.train.lr > 0


def test_every_recipe_has_a_paper_config():
    assert sorted(p.stem for p in CONFIGS) == list_recipes()
