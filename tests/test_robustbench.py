"""`import robustbench` and `robustbench.eval.benchmark` work after `import grace_plugin` (pyautoattack shim)."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")  # AutoAttack's many tiny ops (tests/conftest.py)


class TemplateModel(nn.Module):
    """A [0,1]-input 1000-way linear classifier that recognises each test image's template with a margin."""

    def __init__(self, templates: dict[int, torch.Tensor], margin: float):
        super().__init__()
        w = torch.zeros(1000, templates[next(iter(templates))].numel())
        for label, t in templates.items():
            w[label] = (t.flatten() - 0.5)
        self.lin = nn.Linear(w.shape[1], 1000)
        self.lin.weight.data = w * margin
        self.lin.bias.data.zero_()
        decoy = next(c for c in range(999, -1, -1) if c not in templates)
        self.lin.bias.data[decoy] = 1.0  # wins once the true logit is pushed below 1

    def forward(self, x):
        return self.lin(x.flatten(1) - 0.5)


def _imagenet_folder(root: Path, n: int):
    import robustbench

    helper = Path(robustbench.__file__).parent / "helper_files"
    wnids = sorted(json.loads((helper / "imagenet_class_to_id_map.json").read_text()))
    for w in wnids:
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
    files = (helper / "imagenet_test_image_ids.txt").read_text().split()[:n]
    templates = {}
    g = torch.Generator().manual_seed(0)
    for f in files:
        label = wnids.index(f.split("/")[0])
        t = (torch.rand(3, 16, 16, generator=g) > 0.5).float()
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(root / "val" / f, format="PNG")
        templates[label] = t
    return templates


def test_import_and_benchmark_imagenet_linf(tmp_path):
    import grace_plugin  # noqa: F401

    import robustbench
    from robustbench.eval import benchmark
    from torchvision import transforms

    assert getattr(__import__("autoattack"), "__grace_shim__", False)
    templates = _imagenet_folder(tmp_path, n=2)
    prep = transforms.ToTensor()
    model = TemplateModel(templates, margin=1.0).eval()
    clean, robust = benchmark(model, n_examples=2, dataset="imagenet", threat_model="Linf", data_dir=str(tmp_path),
                              eps=0.5, batch_size=2, preprocessing=prep)
    assert clean == 1.0 and robust == 0.0  # a huge eps breaks it: the attacks really ran
    # at 4/255 the true logit (192 per unit margin) loses at most 768 * 0.5 * 4/255 = 6: provably robust
    clean, robust = benchmark(model, n_examples=2, dataset="imagenet", threat_model="Linf", data_dir=str(tmp_path),
                              eps=4 / 255, batch_size=2, preprocessing=prep)
    assert clean == 1.0 and robust == 1.0
    assert hasattr(robustbench, "load_model")


def test_autoattack_hook_is_lazy_and_never_shadows_a_real_autoattack(tmp_path):
    """``import grace_plugin`` builds no ``autoattack`` (pyautoattack is imported only when ``autoattack`` is); a real
    ``autoattack`` on the path wins over the hook."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys, grace_plugin; before = 'pyautoattack' in sys.modules; import autoattack; "
            "print(before, getattr(autoattack, '__grace_shim__', False), getattr(autoattack, 'REAL', False), "
            "'pyautoattack' in sys.modules)")

    def run(extra):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([*extra, str(root)]))
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert run([]) == ["False", "True", "False", "True"]
    (tmp_path / "autoattack").mkdir()
    (tmp_path / "autoattack" / "__init__.py").write_text("REAL = True\n")
    assert run([str(tmp_path)]) == ["False", "False", "True", "False"]
