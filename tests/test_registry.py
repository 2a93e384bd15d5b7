"""Registry: the RobustBench name rule, timm entries from model cards, `grace register`, exports, safe loading.

A tiny run (the session CLIP fine-tuned 2 steps) is registered into a temporary weights dir; a *new* Python process
then loads it by timm name and by RobustBench name, and `grace eval` / `robustbench.eval.benchmark` score it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import registry  # noqa: F401  (registers the GRACE timm names)
from grace_app.cli import main
from registry.naming import NUM_CLASSES, timm_name

ROOT = Path(__file__).resolve().parents[1]
RB_NAME = "Gracetest2026Tiny_ViT-T-8"
FAST = ["--set", "train.batch_size=8", "--set", "train.lr=1e-3", "--no-progress"]


def _env(weights_dir: Path | None = None, extra_path: Path | None = None) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    env["PYTHONPATH"] = os.pathsep.join(([str(extra_path)] if extra_path else []) + [str(ROOT)])
    if weights_dir is not None:
        env["GRACE_WEIGHTS_DIR"] = str(weights_dir)
    return env


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_run(tiny_world, tiny_clip_dir, tmp_path_factory):
    """ft with a frozen head (so a head rebuilt from the text tower equals the run's head), 2 steps."""
    out = tmp_path_factory.mktemp("reg_run") / "ft"
    assert main(["train", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(tiny_world / "id"),
                 "--steps", "2", "--out", str(out), "--set", "recipe.train_head=false"] + FAST) == 0
    return out


@pytest.fixture(scope="module")
def registered(tiny_run, tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    wd = tmp_path_factory.mktemp("weights")
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["register", str(tiny_run), "--name", RB_NAME, "--weights-dir", str(wd), "--templates", "simple",
                   "--info", "authors=Test Author", "--info", "venue=nowhere"])
    assert rc == 0
    name = buf.getvalue().strip().splitlines()[-1]
    return {"name": name, "weights_dir": wd, "folder": wd / name}


def _reference_imagenet_classifier(run_dir: Path):
    """Independent of registry: the run's tower + a head from open_clip's ImageNet names through its text tower."""
    import open_clip

    from grace_plugin.checkpoint import load_run
    from grace_plugin.models.classifier import ClipClassifier, ZeroShotHead
    from grace_plugin.models.clip import bundle_from_text_state
    from safetensors.torch import load_file

    model, meta = load_run(run_dir)
    bundle = bundle_from_text_state(meta["clip"]["model_name"], meta["clip"]["model_cfg"],
                                    load_file(str(run_dir / "text.safetensors")))
    w = open_clip.build_zero_shot_classifier(bundle.clip, bundle.tokenizer(), open_clip.IMAGENET_CLASSNAMES,
                                             open_clip.SIMPLE_IMAGENET_TEMPLATES, use_tqdm=False).t()
    return ClipClassifier(model.visual, ZeroShotHead(w, float(model.head.logit_scale)), meta["pretrained_cfg"]).eval()


# ---------------------------------------------------------------------------------------------------- naming
@pytest.mark.parametrize("rb,dataset,threat", [
    ("Rbtest2026Alpha_ViT-B-32", "imagenet", "Linf"), ("Rbtest2026Beta", "cifar10", "L2"),
    ("Rbtest2026Gamma_R-50", "cifar100", "corruptions"), ("Rbtest2026Delta_X", "imagenet", "corruptions_3d")])
def test_timm_name_is_what_robustbench_resolves(rb, dataset, threat):
    """Register a sentinel under our name; robustbench.utils.load_model must return it (with its num_classes)."""
    from robustbench.utils import load_model as rb_load_model
    from timm.models import register_model
    from torch import nn

    name = timm_name(rb, dataset, threat)
    seen = {}

    def entry(pretrained=False, num_classes=None, **kwargs):
        seen.update(pretrained=pretrained, num_classes=num_classes)
        return nn.Linear(1, 1)

    entry.__name__ = name
    register_model(entry)
    out = rb_load_model(rb, dataset=dataset, threat_model=threat)
    assert isinstance(out, nn.Linear)
    assert seen == {"pretrained": True, "num_classes": NUM_CLASSES[dataset]}
    assert name == f"{rb.lower().replace('-', '_')}_{dataset}_{threat.replace('_3d', '').lower()}"


@pytest.mark.parametrize("bad", ["", "1abc", "a.b", "a b", "a/b"])
def test_timm_name_rejects_bad_names(bad):
    with pytest.raises(ValueError, match="RobustBench name"):
        timm_name(bad)
    with pytest.raises(ValueError, match="valid choices"):
        timm_name("Ok2026", dataset="mnist")


# ---------------------------------------------------------------------------------------------------- registry-driven
def _registered_names():
    return registry.list_grace_models()


@pytest.mark.parametrize("name", _registered_names())
def test_registered_entry(name):
    """Every registered name: builds, takes [0,1] input, CLIP data cfg, name round trip, RobustBench transform."""
    import timm
    from PIL import Image
    from robustbench.data import get_timm_model_preprocessing
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from grace_plugin.data.transforms import eval_transform

    card, _ = registry.get_card(name)
    assert timm_name(card["rb_name"], card["dataset"], card["threat_model"]) == name
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic" and cfg["fixed_input_size"]
    assert tuple(cfg["mean"]) == OPENAI_CLIP_MEAN and tuple(cfg["std"]) == OPENAI_CLIP_STD
    assert cfg["num_classes"] == card["architecture"]["num_classes"] == NUM_CLASSES[card["dataset"]]
    size = cfg["input_size"][1:]
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = model(x)
        # normalisation is inside: the tower sees (x - mean) / std
        inside = (x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
        ref = model.head(torch.nn.functional.normalize(model.visual(inside), dim=-1))
    assert y.shape == (2, cfg["num_classes"]) and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    img = Image.fromarray((torch.rand(size[0] + 13, size[1] + 5, 3) * 255).byte().numpy())
    assert torch.equal(eval_transform(cfg)(img), get_timm_model_preprocessing(name)(img))


# ---------------------------------------------------------------------------------------------------- register
def test_register_writes_card_and_weights(registered, tiny_run):
    from robustbench.utils import ModelInfo

    from grace_plugin.tensor_io import sha256_file

    assert registered["name"] == timm_name(RB_NAME, "imagenet", "Linf") == "gracetest2026tiny_vit_t_8_imagenet_linf"
    card = json.loads((registered["folder"] / "card.json").read_text())
    assert card["weights_sha256"] == sha256_file(registered["folder"] / "model.safetensors")
    assert card["text_sha256"] == sha256_file(registered["folder"] / "text.safetensors")
    assert dataclasses.asdict(ModelInfo(**card["model_info"])) == card["model_info"]  # exactly RobustBench's fields
    info = card["model_info"]
    assert info["authors"] == "Test Author" and info["eps"] == "4/255" and info["dataset"] == "imagenet"
    assert info["clean_acc"] is None and info["autoattack_acc"] is None  # never made up
    assert len(card["classnames"]) == 1000 and card["architecture"]["num_classes"] == 1000
    with pytest.raises(ValueError, match="valid fields"):
        from registry.publish import build_entry

        build_entry(tiny_run, RB_NAME, model_info={"acc": "1"})


# ------------------------------------------------------------------------------------------ one new process
# Everything that needs a fresh interpreter (the plugin hook, timm/RobustBench loading by name, the Hub fallback)
# runs in ONE subprocess: each section below records its result or its traceback, and the tests read them.
_NEW_PROCESS = r"""
import json, sys, traceback
args = json.loads(sys.argv[1])
results = {}


def section(fn):
    try:
        results[fn.__name__] = {"ok": True, "value": fn()}
    except Exception:
        results[fn.__name__] = {"ok": False, "error": traceback.format_exc()}
    return fn


@section
def entry_point():  # first: nothing but grace_plugin and timm imported so far
    import grace_plugin, timm
    return [timm.is_model(args["name"]), "registry" in sys.modules]


@section
def timm_and_robustbench():
    import torch, timm, registry
    from robustbench.utils import load_model
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    a = timm.create_model(args["name"], pretrained=True).eval()
    b = load_model(args["rb_name"], dataset="imagenet", threat_model="Linf")
    assert type(a).__name__ == type(b).__name__ == "GraceClassifier", (type(a), type(b))
    assert not b.training
    with torch.no_grad():
        torch.save({"x": x, "timm": a(x), "rb": b(x)}, args["logits"])


@section
def eval_by_name():
    from grace_app.cli import main
    for model, out in ((args["name"], "by_name"), (args["run"], "by_run")):
        rc = main(["eval", "--model", model, "--data", args["id"], "--out", args["eval_out"] + "/" + out,
                   "--no-progress", "--batch-size", "64"])
        assert rc == 0, rc


@section
def hub_offline():
    import pathlib, torch, timm, registry
    registry.scan_weights_dir(args["hub_weights"])
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = timm.create_model(args["hub_name"], pretrained=True).eval()
    assert "file" not in m.pretrained_cfg and m.pretrained_cfg["hf_hub_id"] == "grace-test/tiny-hub"
    with torch.no_grad():
        torch.save(m(x), args["hub_logits"])
    snap = pathlib.Path(args["hub_file"])
    snap.write_bytes(snap.read_bytes()[:-4] + b"\0\0\0\0")  # a corrupted cache file
    try:
        timm.create_model(args["hub_name"], pretrained=True)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "loaded"


print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def new_process(registered, tiny_run, tiny_world, tmp_path_factory):
    import shutil
    import tomllib

    tmp = tmp_path_factory.mktemp("new_process")
    # an installed grace-plugin declares `registry.grace_models` as a plugin (pyproject.toml): a dist-info saying so
    dist = tmp / "site" / "grace_plugin_fake-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: grace-plugin-fake\nVersion: 0.0\n")
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["grace_plugin.plugins"]
    (dist / "entry_points.txt").write_text("[grace_plugin.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    # a card with hf_hub_id and no local file, its weights in an offline HF cache
    hub = tmp / "hub_w" / "gracetest2026hub_imagenet_linf"
    hub.mkdir(parents=True)
    shutil.copy(registered["folder"] / "text.safetensors", hub)
    card = json.loads((registered["folder"] / "card.json").read_text())
    card.update(rb_name="Gracetest2026Hub", timm_name=hub.name, hf_hub_id="grace-test/tiny-hub")
    (hub / "card.json").write_text(json.dumps(card))
    snap = tmp / "hf" / "hub" / "models--grace-test--tiny-hub" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(registered["folder"] / "model.safetensors", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    args = {"name": registered["name"], "rb_name": RB_NAME, "logits": str(tmp / "logits.pt"), "run": str(tiny_run),
            "id": str(tiny_world / "id"), "eval_out": str(tmp / "eval"), "hub_weights": str(hub.parent),
            "hub_name": hub.name, "hub_logits": str(tmp / "hub_logits.pt"),
            "hub_file": str(snap / "model.safetensors")}
    env = dict(_env(registered["weights_dir"], tmp / "site"), HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1")
    env.pop("GRACE_NO_PLUGINS", None)
    res = subprocess.run([sys.executable, "-c", _NEW_PROCESS, json.dumps(args)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), args


def _section(new_process, name):
    results, args = new_process
    r = results[name]
    assert r["ok"], r.get("error")
    return r["value"], args


def test_new_process_timm_and_robustbench_give_identical_logits(new_process, tiny_run):
    _, args = _section(new_process, "timm_and_robustbench")
    res = torch.load(args["logits"], weights_only=True)
    assert torch.equal(res["timm"], res["rb"]) and res["timm"].shape == (4, 1000)
    with torch.no_grad():
        ref = _reference_imagenet_classifier(tiny_run)(res["x"])
    torch.testing.assert_close(res["timm"], ref, rtol=1e-4, atol=1e-4)


def test_grace_eval_by_timm_name_in_new_process(new_process):
    """`grace eval --model <timm name>` rebuilds the 10-class head from the entry's text tower: same as the run."""
    _, args = _section(new_process, "eval_by_name")
    a = json.loads((Path(args["eval_out"]) / "by_name" / "report.json").read_text())
    b = json.loads((Path(args["eval_out"]) / "by_run" / "report.json").read_text())
    assert a["datasets"]["id"]["n"] == b["datasets"]["id"]["n"] > 0
    assert a["datasets"]["id"]["top1"] == b["datasets"]["id"]["top1"]


def test_import_grace_plugin_makes_names_visible_via_entry_point(new_process, monkeypatch):
    """An installed grace-plugin declares `registry.grace_models` as a plugin: after `import grace_plugin`, importing
    timm loads it (the weights dir's cards are then visible to timm); GRACE_NO_PLUGINS=1 switches the hook off."""
    import grace_plugin

    value, _ = _section(new_process, "entry_point")
    assert value == [True, True]
    monkeypatch.setenv("GRACE_NO_PLUGINS", "1")
    assert grace_plugin.load_plugins() == []
    monkeypatch.delenv("GRACE_NO_PLUGINS")
    assert "timm_models" in grace_plugin.load_plugins()


def test_hub_weights_resolve_offline_from_hf_cache(new_process, registered):
    """A card with ``hf_hub_id`` and no local file loads from the Hub (here an offline HF cache), sha256 checked."""
    import timm

    value, args = _section(new_process, "hub_offline")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = timm.create_model(registered["name"], pretrained=True).eval()(x)
    assert torch.equal(torch.load(args["hub_logits"], weights_only=True), ref)
    assert "sha256" in value  # the corrupted cache file is refused


def _imagenet_folder_and_shards(root: Path, n: int):
    """RobustBench's ImageNet layout (its first n listed files, random PNGs) + the same PNGs as a shard set."""
    import io

    import open_clip
    import robustbench
    import webdataset as wds
    from PIL import Image

    helper = Path(robustbench.__file__).parent / "helper_files"
    wnids = sorted(json.loads((helper / "imagenet_class_to_id_map.json").read_text()))
    for w in wnids:
        (root / "val" / w).mkdir(parents=True, exist_ok=True)
    files = (helper / "imagenet_test_image_ids.txt").read_text().split()[:n]
    labels = torch.tensor([wnids.index(f.split("/")[0]) for f in files])
    imgs = torch.randint(0, 256, (n, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    shard_dir = root / "shards"
    (shard_dir / "test").mkdir(parents=True)
    (shard_dir / "classnames.txt").write_text("\n".join(open_clip.IMAGENET_CLASSNAMES) + "\n")
    (shard_dir / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with wds.TarWriter(str(shard_dir / "test" / "0.tar")) as sink:
        for i, (f, img) in enumerate(zip(files, imgs.numpy())):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            (root / "val" / f).write_bytes(buf.getvalue())
            sink.write({"__key__": f"s{i:05d}", "png": buf.getvalue(), "cls": int(labels[i])})
    (shard_dir / "test" / "nshards.txt").write_text("1\n")
    x = imgs.permute(0, 3, 1, 2).float() / 255
    return shard_dir, x, labels


def test_robustbench_benchmark_clean_equals_grace_eval(registered, tmp_path, monkeypatch):
    """benchmark()'s clean accuracy (RobustBench name, its timm-cfg preprocessing) == `grace eval` on shards.

    The tiny CLIP cannot tell ImageNet classes apart, so a copy of the entry gets head rows equal to the first
    half of the images' features (a nearest-template head): a known, non-trivial accuracy."""
    import shutil

    import timm
    from robustbench import eval as rb_eval
    from safetensors.torch import load_file, save_file

    from grace_plugin.tensor_io import sha256_file

    n = 12
    shard_dir, x, labels = _imagenet_folder_and_shards(tmp_path, n)
    rb = "Gracetest2026Bench_ViT-T-8"
    folder = tmp_path / "w" / timm_name(rb)
    shutil.copytree(registered["folder"], folder)
    base = timm.create_model(registered["name"], pretrained=True).eval()
    sd = load_file(str(folder / "model.safetensors"))
    with torch.no_grad():
        sd["head.weight"][labels[: n // 2]] = base.encode(x[: n // 2])
    save_file(sd, str(folder / "model.safetensors"))
    card = json.loads((folder / "card.json").read_text())
    card.update(rb_name=rb, timm_name=folder.name, weights_sha256=sha256_file(folder / "model.safetensors"))
    (folder / "card.json").write_text(json.dumps(card))
    registry.register_card(folder / "card.json")
    model = timm.create_model(folder.name, pretrained=True).eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == labels).float().mean().item()  # independent: the model on the PNG pixels
    assert 0.5 <= acc < 1

    class CleanOnly:  # benchmark()'s clean part only: the AutoAttack stage hands its input back
        def __init__(self, *a, **k):
            pass

        def run_standard_evaluation(self, x, y, bs=250, state_path=None):
            return x

    monkeypatch.setattr(rb_eval, "AutoAttack", CleanOnly)
    clean, _ = rb_eval.benchmark(model, n_examples=n, dataset="imagenet", threat_model="Linf", model_name=rb,
                                 data_dir=str(tmp_path), eps=4 / 255, batch_size=n)
    assert main(["eval", "--model", folder.name, "--data", str(shard_dir), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["datasets"]["id"]["n"] == n
    assert clean == pytest.approx(acc)
    assert rep["datasets"]["id"]["top1"] == pytest.approx(100 * acc)


# ---------------------------------------------------------------------------------------------------- exports
def test_open_clip_export_reproduces_classifier(tiny_run, tiny_clip_dir, tmp_path, tiny_world):
    import open_clip
    from safetensors.torch import load_file

    from grace_plugin.checkpoint import load_run
    from grace_plugin.models.clip import load_clip, template_fns

    out = tmp_path / "oc"
    assert main(["export", str(tiny_run), "--format", "open_clip", "--out", str(out),
                 "--name", "GRACE-test-export"]) == 0
    open_clip.add_model_config(out / "GRACE-test-export.json")
    clip, _, preprocess = open_clip.create_model_and_transforms(
        "GRACE-test-export", pretrained=str(out / "open_clip_model.safetensors"))
    clip.eval()
    model, meta = load_run(tiny_run)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    norm = model.normalize
    with torch.no_grad():
        w = open_clip.build_zero_shot_classifier(clip, open_clip.get_tokenizer("GRACE-test-export"),
                                                 meta["classnames"], template_fns(meta["templates"]))
        f = torch.nn.functional.normalize(clip.encode_image(norm(x)), dim=-1)
        logits_oc = clip.logit_scale.exp() * f @ w
        logits = model(x)
        pre = load_clip(tiny_clip_dir).clip.eval()
        f_pre = torch.nn.functional.normalize(pre.encode_image(norm(x)), dim=-1)
    torch.testing.assert_close(logits_oc, logits, rtol=1e-4, atol=1e-4)
    assert (f - f_pre).abs().max() > 1e-3  # the fine-tuned tower was exported, not the pretrained one
    head = load_file(str(out / "zero_shot_head.safetensors"))
    torch.testing.assert_close(head["weight"], model.head.weight.detach())


def test_timm_hub_export_folder(registered, tiny_run, tmp_path):
    import timm

    out = tmp_path / "hub"
    assert main(["export", str(tiny_run), "--format", "timm-hub", "--out", str(out), "--name", RB_NAME,
                 "--templates", "simple"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == registered["name"] and cfg["num_classes"] == 1000
    assert cfg["pretrained_cfg"]["crop_pct"] == 1.0 and cfg["pretrained_cfg"]["interpolation"] == "bicubic"
    assert len(cfg["label_names"]) == 1000 and "file" not in cfg["pretrained_cfg"]
    x = torch.rand(2, 3, 32, 32)
    a = timm.create_model(registered["name"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    b = timm.create_model(registered["name"], pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert main(["export", str(tiny_run), "--format", "timm-hub", "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------------- safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(registered, tmp_path):
    import pickle

    import timm

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"head.weight": _Evil(marker)}, fh)
    with pytest.raises(registry.UnsafeWeightsError, match="refused"):
        registry.load_state_dict_safe(evil)
    with pytest.raises(registry.UnsafeWeightsError, match="evil.pt"):
        timm.create_model(registered["name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not marker.exists()
    # a plain tensor pickle is fine (torch.load weights_only=True), and loads the same model
    good = tmp_path / "good.pt"
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(registered["folder"] / "model.safetensors"))}, good)
    m = timm.create_model(registered["name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(good))).eval()
    ref = timm.create_model(registered["name"], pretrained=True).eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


def test_sha256_mismatch_is_refused(registered, tmp_path):
    import shutil

    import timm
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "w" / "gracetest2026tampered_imagenet_linf"
    shutil.copytree(registered["folder"], folder)
    card = json.loads((folder / "card.json").read_text())
    card.update(rb_name="Gracetest2026Tampered", timm_name=folder.name)
    (folder / "card.json").write_text(json.dumps(card))
    sd = load_file(str(folder / "model.safetensors"))
    sd["head.weight"] = sd["head.weight"] * 1.01
    save_file(sd, str(folder / "model.safetensors"))
    assert registry.scan_weights_dir(tmp_path / "w") == [folder.name]
    with pytest.raises(registry.WeightsError, match="sha256"):
        timm.create_model(folder.name, pretrained=True)


def test_head_size_mismatch_names_both_sizes(registered, tmp_path):
    import timm
    from safetensors.torch import load_file, save_file

    with pytest.raises(registry.HeadSizeError, match=r"1000 classes.*num_classes=10"):
        timm.create_model(registered["name"], num_classes=10)
    sd = load_file(str(registered["folder"] / "model.safetensors"))
    sd["head.weight"] = sd["head.weight"][:10].contiguous()
    small = tmp_path / "small.safetensors"
    save_file(sd, str(small))
    with pytest.raises(registry.HeadSizeError, match=r"10 classes.*num_classes=1000"):
        timm.create_model(registered["name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(small)))


def test_register_cli_errors_exit_2(tiny_run, tmp_path, capsys):
    assert main(["register", str(tiny_run), "--name", "bad.name", "--weights-dir", str(tmp_path)]) == 2
    assert "RobustBench name" in capsys.readouterr().err
    assert main(["register", str(tiny_run), "--name", "Ok2026", "--dataset", "cifar10",
                 "--weights-dir", str(tmp_path)]) == 2
    assert "valid choices: imagenet" in capsys.readouterr().err
    assert main(["register", str(tmp_path), "--name", "Ok2026", "--weights-dir", str(tmp_path)]) == 2
    assert "checkpoint.json" in capsys.readouterr().err


def test_timm_to_open_clip_is_the_inverse_of_timms_converter(tiny_clip_dir):
    from grace_plugin.models.clip import build_tower, convert_visual, load_clip, tower_spec
    from registry.publish import timm_to_open_clip_visual

    bundle = load_clip(tiny_clip_dir)
    oc = {k: v for k, v in bundle.clip.state_dict().items() if k.startswith("visual.")}
    tower = build_tower(tower_spec(bundle.model_name, bundle.model_cfg))
    back = timm_to_open_clip_visual(convert_visual(bundle.clip.state_dict(), tower))
    assert set(back) == set(oc)
    assert all(torch.equal(back[k], oc[k]) for k in oc)
    sd = convert_visual(bundle.clip.state_dict(), tower)
    sd["head.bias"] = sd["head.bias"] + 1
    with pytest.raises(ValueError, match="non-zero bias"):
        timm_to_open_clip_visual(sd)


def test_weights_dir_is_under_the_one_grace_cache(monkeypatch, tmp_path):
    """$GRACE_WEIGHTS_DIR, else <grace cache>/weights with the grace cache the testbed uses too ($GRACE_CACHE_DIR, else
    $XDG_CACHE_HOME/grace_plugin, else ~/.cache/grace_plugin)."""
    from grace_app.testbed.tiny_clip import cache_dir

    monkeypatch.delenv("GRACE_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("GRACE_CACHE_DIR", str(tmp_path / "g"))
    assert registry.weights_dir() == tmp_path / "g" / "weights" and cache_dir() == tmp_path / "g"
    monkeypatch.delenv("GRACE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert registry.weights_dir() == tmp_path / "x" / "grace_plugin" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert cache_dir() == tmp_path / "h" / ".cache" / "grace_plugin"
    monkeypatch.setenv("GRACE_WEIGHTS_DIR", str(tmp_path / "w"))
    assert registry.weights_dir() == tmp_path / "w"
