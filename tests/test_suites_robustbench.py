"""Our attacks equal pyautoattack and robustbench.eval.benchmark on the same tiny model and ImageNet-layout folder;
ModelInfo JSON round-trips through RobustBench's dataclass; corruption accuracy/mCE equal RobustBench's own."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grace_app.testbed.probe import TemplateModel, loaded_template_model, make_imagenet

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 4 / 255


def _direct_tensors(images):
    """Independent of our loaders: PIL -> [0,1] float."""
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                     for p, _ in images])
    return x, torch.tensor([y for _, y in images])


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    templates, images = make_imagenet(root)
    return root, TemplateModel(templates).eval(), images


@pytest.fixture(scope="module")
def ours(imagenet, tmp_path_factory):
    """Our suites: adv:apgd-ce and adv:autoattack on the ImageNet folder (RobustBench subset), with JSON output."""
    from eval_suites.context import SuiteContext
    from eval_suites.engine import run_suites

    root, model, _ = imagenet
    out = tmp_path_factory.mktemp("out")
    ctx = SuiteContext(id_set=("imagenet", root), eps=EPS, n_adv=2, n_imagenet=2, batch_size=2, out_dir=out,
                       model_info_name="Template2026Tiny")
    return run_suites(loaded_template_model(model), ["id", "adv:apgd-ce", "adv:autoattack"], ctx), out


def test_autoattack_and_apgd_equal_pyautoattack_and_benchmark(imagenet, ours):
    import pyautoattack
    from robustbench.eval import benchmark

    from grace_plugin.data.transforms import eval_transform

    root, model, images = imagenet
    report, _ = ours
    x, y = _direct_tensors(images)
    aa = pyautoattack.AutoAttack(model, eps=EPS, norm="Linf", version="standard", seed=0)
    aa.verbose = False
    direct_aa = 100.0 * float((model(aa.run_standard_evaluation(x, y, batch_size=2)[0]).argmax(-1) == y).float().mean())
    ce = pyautoattack.AutoAttack(model, attacks=["apgd-ce"], eps=EPS, norm="Linf", version="custom", seed=0)
    ce.verbose = False
    direct_ce = 100.0 * float((model(ce.run_standard_evaluation(x, y, batch_size=2)[0]).argmax(-1) == y).float().mean())
    clean, robust = benchmark(model, n_examples=2, dataset="imagenet", threat_model="Linf", data_dir=str(root),
                              eps=EPS, batch_size=2, preprocessing=eval_transform(model.pretrained_cfg))
    s = report["suites"]
    assert direct_aa == direct_ce == 100.0 * robust == 50.0  # the closed form: the c=0.1 image survives
    assert s["adv:autoattack"]["robust_acc"] == direct_aa and s["adv:apgd-ce"]["robust_acc"] == direct_ce
    assert s["adv:autoattack"]["clean_acc"] == 100.0 * clean == 100.0 == report["axes"]["id"]
    assert s["adv:autoattack"]["n"] == 2 and s["adv:autoattack"]["subset"] == "robustbench-imagenet-5000"


def test_model_info_round_trips_through_robustbench(ours):
    from robustbench.utils import ModelInfo

    report, out = ours
    path = out / "model_info" / "imagenet" / "Linf" / "Template2026Tiny.json"
    assert report["suites"]["adv:autoattack"]["model_info"] == str(path)
    d = json.loads(path.read_text())
    assert dataclasses.asdict(ModelInfo(**d)) == d
    assert d["eps"] == "4/255" and d["clean_acc"] == "100.00" and d["autoattack_acc"] == "50.00"
    assert d["dataset"] == "imagenet"
    assert (out / "model_info" / "imagenet" / "Linf" / "Template2026Tiny_apgd-ce.json").is_file()


def test_cli_robustbench_suite(imagenet, tmp_path, capsys):
    from grace_app.cli import main

    root, model, _ = imagenet
    # the CLI resolves --model through the registry; a LoadedModel stands in for a registered [0,1] model
    import registry

    orig = registry.load_model
    registry.load_model = lambda spec, device="cpu": loaded_template_model(model)
    try:
        rc = main(["eval", "--model", "x", "--suite", "robustbench", "--imagenet-dir", str(root), "--n-imagenet", "2",
                   "--batch-size", "2", "--eps", "0.5", "--out", str(tmp_path), "--no-progress"])
    finally:
        registry.load_model = orig
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "report.json").read_text())
    rb = rep["suites"]["robustbench"]
    assert rb["runner"] == "robustbench.eval.benchmark" and rb["clean_acc"] == 100.0 and rb["robust_acc"] == 0.0
    d = json.loads(Path(rb["model_info"]).read_text())
    assert d["autoattack_acc"] == "0.00" and d["eps"] == "0.5"


def test_corruptions_equal_robustbench(tmp_path, monkeypatch):
    """Our corruptions suite vs robustbench.eval.benchmark(threat_model='corruptions') run in a folder holding an
    unaggregated_results.csv whose AlexNet row carries the shipped reference errors (B5)."""
    import pandas as pd
    from robustbench.eval import benchmark

    from eval_suites.imagenet import CORRUPTIONS
    from eval_suites.leaderboard import alexnet_errors
    from eval_suites.context import SuiteContext
    from eval_suites.engine import run_suites

    # two variants of the 2-image subset (both correct / the second one unreadable at contrast 0.002); each of the
    # 75 corruption cells is a symlink to one of them (75 x 1000 real class folders would dominate the run time)
    templates, _ = make_imagenet(tmp_path / "variants", [1.0, 1.0], sub="a")
    make_imagenet(tmp_path / "variants", [1.0, 0.002], sub="b")
    rng = np.random.default_rng(0)
    for c in CORRUPTIONS:
        for s in range(1, 6):
            (tmp_path / "ImageNet-C" / c).mkdir(parents=True, exist_ok=True)
            (tmp_path / "ImageNet-C" / c / str(s)).symlink_to(tmp_path / "variants" / rng.choice(["a", "b"]))
    make_imagenet(tmp_path / "clean", [1.0, 1.0])
    model = TemplateModel(templates).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 224, 224))  # Res224 as RobustBench forces
    ctx = SuiteContext(corruptions_dir=tmp_path, n_imagenet=2, batch_size=2, out_dir=tmp_path / "o",
                       model_info_name="Template2026Tiny")
    rep = run_suites(loaded_template_model(model), ["corruptions"], ctx)["suites"]["corruptions"]
    ref = alexnet_errors()
    cols = pd.MultiIndex.from_tuples([(c, s) for c in CORRUPTIONS for s in range(1, 6)])
    csv = tmp_path / "cwd" / "model_info" / "imagenet" / "corruptions" / "unaggregated_results.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame([[1 - ref[c] for c, _ in cols]], index=["AlexNet"], columns=cols).to_csv(csv)
    monkeypatch.chdir(tmp_path / "cwd")
    # robustbench loads each of the 75 cells with DataLoader(num_workers=2): 150 worker forks dominate the test;
    # in-process loading reads the same files in the same order
    import robustbench.data as rbd

    orig_loader = rbd.data.DataLoader
    monkeypatch.setattr(rbd.data, "DataLoader", lambda *a, **k: orig_loader(*a, **dict(k, num_workers=0)))
    # to_disk=True: RobustBench computes and writes its own mCE (robustbench/eval.py corruptions_evaluation, then
    # utils.update_json) to model_info/imagenet/corruptions/<model_name>.json, percent rounded to 2 decimals
    _, acc = benchmark(model, n_examples=2, dataset="imagenet", threat_model="corruptions",
                       data_dir=str(tmp_path / "clean"), corruptions_data_dir=str(tmp_path), batch_size=2,
                       preprocessing=lambda im: torch.zeros(3, 16, 16) + 0.5, to_disk=True,
                       model_name="Rbown2026Tiny")
    theirs = json.loads((csv.parent / "Rbown2026Tiny.json").read_text())
    assert rep["corruptions_acc"] == pytest.approx(100 * acc)
    assert 50.0 < rep["corruptions_acc"] < 100.0
    assert abs(rep["corruptions_mce"] - float(theirs["corruptions_mce"])) <= 0.005 + 1e-9
    assert abs(rep["corruptions_acc"] - float(theirs["corruptions_acc"])) <= 0.005 + 1e-9
    d = json.loads(Path(rep["model_info"]).read_text())
    assert d["corruptions_acc"] == f"{rep['corruptions_acc']:.2f}"
    assert d["corruptions_mce"] == f"{rep['corruptions_mce']:.2f}"
