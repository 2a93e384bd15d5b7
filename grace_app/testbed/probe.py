"""A known-answer ImageNet probe for the evaluation engine: an ImageNet-layout folder (``val/<wnid>/<file>``, the
files of RobustBench's test subset) holding template images at chosen contrasts, and a [0,1]-input linear model
whose clean and robust answers on them are known in closed form (``TemplateModel``). The tests compare our attacks
with pyautoattack and ``robustbench.eval.benchmark`` on it, and ``bench/eval_speed.py`` times both on it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["CONTRAST", "TemplateModel", "make_imagenet", "loaded_template_model"]

CONTRAST = [0.1, 0.02]  # 0.1: provably robust at 4/255 (all four AutoAttack attacks run fully on it); 0.02: not


class TemplateModel(nn.Module):
    """[0,1]-input 1000-way linear model: logit_c = (t_c - .5) . (x - .5); a decoy class with bias 1 wins once the
    true logit drops below 1. For a template image at contrast c the true logit is 192 c and an l_inf attack can
    lower it by at most 384 eps = 6.0 at 4/255 (other logits stay below ~1.5): c = 0.1 (19.2) is robust, c = 0.02
    (3.84) is not."""

    input_range = (0, 1)

    def __init__(self, templates: dict[int, torch.Tensor]):
        super().__init__()
        w = torch.zeros(1000, 3 * 16 * 16)
        for label, t in templates.items():
            w[label] = t.flatten() - 0.5
        self.lin = nn.Linear(w.shape[1], 1000)
        self.lin.weight.data = w
        self.lin.bias.data.zero_()
        self.lin.bias.data[next(c for c in range(999, -1, -1) if c not in templates)] = 1.0
        self.pretrained_cfg = {"input_size": (3, 16, 16), "crop_pct": 1.0, "interpolation": "bicubic",
                               "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(x, 16)
        return self.lin(x.flatten(1) - 0.5)


def make_imagenet(root: Path, contrast=CONTRAST, sub: str = "val"):
    """One template image per contrast under ``root/sub/<wnid>/`` (the first files of RobustBench's ImageNet test
    subset); returns ``({label: template}, [(path, label), ...])``."""
    import robustbench

    helper = Path(robustbench.__file__).parent / "helper_files"
    wnids = sorted(json.loads((helper / "imagenet_class_to_id_map.json").read_text()))
    for w in wnids:
        (root / sub / w).mkdir(parents=True, exist_ok=True)
    files = (helper / "imagenet_test_image_ids.txt").read_text().split()[:len(contrast)]
    g = torch.Generator().manual_seed(0)
    templates, images = {}, []
    for f, c in zip(files, contrast):
        label = wnids.index(f.split("/")[0])
        t = (torch.rand(3, 16, 16, generator=g) > 0.5).float()
        img = (0.5 + c * (t - 0.5)).permute(1, 2, 0).numpy()
        Image.fromarray(np.round(img * 255).astype("uint8")).save(root / sub / f, format="PNG")
        templates[label] = t
        images.append((root / sub / f, label))
    return templates, images


def loaded_template_model(model):
    """The model as a ``registry.LoadedModel`` with the 1000 ImageNet class names."""
    from eval_suites.imagenet import imagenet_classnames
    from registry import LoadedModel

    return LoadedModel(model, "Template2026Tiny", imagenet_classnames()[0])
