"""End to end through the real CLI (``grace_app.cli.main``) on tiny shards in tmp dirs."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from grace_app.cli import main

FAST = ["--set", "train.batch_size=8", "--set", "train.log_every=1", "--no-progress"]


def _direct_top1(model, set_dir):
    """Independent of our loader: read the tars with tarfile, decode with PIL, scale to [0,1]."""
    import tarfile

    from grace_plugin.data.shards import open_shard_set

    imgs, labels = {}, {}
    for url in open_shard_set(set_dir).urls:
        with tarfile.open(url) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                if ext == "cls":
                    labels[key] = int(data)
                else:
                    imgs[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
    keys = list(imgs)  # shard order, then member order: the order of the report's per-sample string
    x = torch.from_numpy(np.stack([imgs[k] for k in keys])).permute(0, 3, 1, 2)
    y = torch.tensor([labels[k] for k in keys])
    with torch.no_grad():
        hit = (model(x).argmax(-1) == y).int()
    return 100.0 * float(hit.float().mean()), len(keys), "".join(map(str, hit.tolist()))


@pytest.fixture(scope="module")
def trained_runs(tiny_world, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = ["train", "--init", str(tiny_clip_dir), "--data", str(tiny_world / "id"), "--steps", "3"] + FAST
    assert main(base + ["--recipe", "ft", "--out", str(out / "ft")]) == 0
    assert main(base + ["--recipe", "grace", "--out", str(out / "grace"), "--set", "recipe.lora_rank=4",
                        "--set", "recipe.pgd_steps=2", "--set", "recipe.curvature_interval=1"]) == 0
    return out


def test_train_writes_loadable_runs(trained_runs):
    from grace_plugin.checkpoint import load_run

    for name in ("ft", "grace"):
        run = trained_runs / name
        meta = json.loads((run / "checkpoint.json").read_text())
        assert meta["recipe"] == name and meta["metrics"]["train"]["steps"] == 3
        assert meta["config"]["train"]["batch_size"] == 8 and meta["torch_threads"] == torch.get_num_threads()
        assert len(meta["classnames"]) == 10 and meta["architecture"]["num_classes"] == 10
        logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logs] == [0, 1, 2] and all(np.isfinite(r["loss"]) for r in logs)
        load_run(run)
    glog = json.loads((trained_runs / "grace" / "log.jsonl").read_text().splitlines()[-1])
    assert {"l_task", "l_lar", "l_gv", "cos_id_adv", "cos_id_awp", "cos_adv_awp"} <= set(glog)
    # the perturbation, measured (issue: LAR-AWP sized and adversarial): ΔL = L_LAR - the unperturbed adversarial
    # loss, per-layer ||Δ||/||W|| at the configured ρ, the cosine with the layer's gradient; and the feature spread
    assert glog["delta_l"] == pytest.approx(glog["l_lar"] - glog["l_adv"], abs=1e-5)
    rels = [v for k, v in glog.items() if k.startswith("awp_rel/")]
    assert rels and all(v == pytest.approx(5e-3, rel=1e-3) for v in rels)
    assert 0 < glog["awp_cos"] <= 1
    assert all(-1 <= json.loads(x)["feature_spread"] <= 1 for x in (trained_runs / "grace" / "log.jsonl").read_text()
               .splitlines())


def test_eval_report_matches_independent_computation(trained_runs, tiny_world, tmp_path, capsys):
    from grace_plugin.checkpoint import load_run

    out = tmp_path / "eval"
    rc = main(["eval", "--model", str(trained_runs / "grace"), "--data", str(tiny_world / "id"),
               "--ood", f"sketch={tiny_world / 'sketch'}", "--ood", f"a={tiny_world / 'a'}", "--attack", "pgd",
               "--n-adv", "16", "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep) >= {"model", "axes", "datasets", "adversarial", "config"}
    assert set(rep["axes"]) == {"id", "ood", "adv", "hm"}
    model, _ = load_run(trained_runs / "grace")
    for name in ("id", "sketch", "a"):
        top1, n, per_sample = _direct_top1(model, tiny_world / name)
        assert rep["datasets"][name]["n"] == n and rep["datasets"][name]["skipped"] == 0
        assert rep["datasets"][name]["top1"] == pytest.approx(top1)
        assert rep["datasets"][name]["per_sample"] == per_sample  # which images, not only how many
    assert rep["axes"]["id"] == rep["datasets"]["id"]["top1"]
    assert rep["axes"]["ood"] == pytest.approx((rep["datasets"]["sketch"]["top1"] + rep["datasets"]["a"]["top1"]) / 2)
    adv = rep["adversarial"]
    assert adv["attack"] == "pgd" and adv["n"] == 16 and adv["robust_acc"] <= adv["clean_acc"]
    assert adv["clean_per_sample"] == rep["datasets"]["id"]["per_sample"][:16]  # the first --n-adv samples
    assert adv["robust_per_sample"].count("1") == adv["robust_correct"] and len(adv["robust_per_sample"]) == 16
    vals = [rep["axes"][k] for k in ("id", "ood", "adv")]
    hm = 0.0 if min(vals) == 0 else 3 / sum(1 / v for v in vals)
    assert rep["axes"]["hm"] == pytest.approx(hm)
    assert (out / "report.md").is_file() and "| ID | OOD | Adv | HM |" in capsys.readouterr().out


def test_two_attacks_give_their_per_sample_worst_case(trained_runs, tiny_world, tmp_path):
    """Two adversarial suites on the same first --n-adv samples: the Adv axis is robust only where both attacks
    failed (per-sample AND of the two suites' strings), each attack's own number kept."""
    out = tmp_path / "two"
    assert main(["eval", "--model", str(trained_runs / "grace"), "--data", str(tiny_world / "id"), "--attack", "pgd",
                 "--suite", "adv:fgsm", "--n-adv", "16", "--batch-size", "8", "--out", str(out),
                 "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    pgd, fgsm, adv = rep["suites"]["adv:pgd"], rep["suites"]["adv:fgsm"], rep["adversarial"]
    both = "".join("1" if a == b == "1" else "0" for a, b in zip(pgd["robust_per_sample"], fgsm["robust_per_sample"]))
    assert adv["attack"] == "worst(pgd,fgsm)" and adv["robust_per_sample"] == both and adv["n"] == 16
    assert adv["robust_correct"] == both.count("1") and rep["axes"]["adv"] == pytest.approx(100 * both.count("1") / 16)
    assert adv["per_attack_robust_acc"] == {"pgd": pgd["robust_acc"], "fgsm": fgsm["robust_acc"]}
    assert adv["robust_acc"] <= min(pgd["robust_acc"], fgsm["robust_acc"])


def test_eval_rebuilds_head_for_other_classnames(trained_runs):
    """Other class names get a head from the run's text tower (zero-shot transfer). GRACE keeps the zero-shot head
    frozen, so a head rebuilt for the permuted names must give the permuted logits of the stored head."""
    from registry import load_model

    loaded = load_model(trained_runs / "grace")
    names, templates = loaded.classnames, loaded.meta["templates"]
    assert loaded.for_classes(names, templates) is loaded.model
    permuted = loaded.for_classes(list(reversed(names)), templates)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(permuted(x), loaded.model(x).flip(-1), atol=1e-4)


def test_run_folder_builds_its_text_tower_only_for_a_rebuilt_head(trained_runs):
    """Loading a run folder leaves its text tower on disk (seconds of every rank's start-up at CLIP scale) until a
    head must be rebuilt for other class names; the head rebuilt then is open_clip's own for those names."""
    import open_clip

    from registry import load_model

    loaded = load_model(trained_runs / "ft")
    names, templates = loaded.classnames, loaded.meta["templates"]
    assert loaded.text is None and loaded.text_loader is not None
    assert loaded.head_for(names, templates)[1]["head"] == "own" and loaded.text is None
    model, head = loaded.head_for(names + ["zebra"], templates)
    assert head["head"] == "rebuilt" and loaded.text is not None and loaded.text_loader is None
    from grace_plugin.models.clip import template_fns

    ref = open_clip.build_zero_shot_classifier(loaded.text.clip, loaded.text.tokenizer(), names + ["zebra"],
                                               template_fns(templates), use_tqdm=False).t()
    assert torch.equal(model.head.weight, ref)


def test_zero_shot_clip_folder_is_a_model(tiny_clip_dir, tiny_world, tmp_path):
    assert main(["eval", "--model", str(tiny_clip_dir), "--data", str(tiny_world / "v2"), "--out",
                 str(tmp_path / "zs"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "zs" / "report.json").read_text())
    assert rep["datasets"]["id"]["n"] == 60 and rep["adversarial"] is None and rep["axes"]["hm"] is None


@pytest.mark.parametrize("argv,msg", [
    (["train", "--recipe", "nope", "--init", "x", "--data", "y", "--out", "z"], "valid recipes: .*ft.*grace"),
    (["eval", "--model", "{clip}", "--data", "{tmp}/missing", "--out", "{tmp}/o"],
     "missing: shard folder does not exist"),
    (["eval", "--model", "{clip}", "--data", "{world}/id", "--attack", "nope", "--out", "{tmp}/o"],
     "valid attacks: .*apgd-ce"),
    (["eval", "--model", "{clip}", "--data", "{world}/id", "--eps", "four", "--out", "{tmp}/o"], "bad eps"),
    (["eval", "--model", "{clip}", "--data", "{nocls}", "--out", "{tmp}/o"], "classnames.txt"),
    (["eval", "--model", "{tmp}", "--data", "{world}/id", "--out", "{tmp}/o"], "not a grace run folder"),
    (["train", "--recipe", "ft", "--init", "{clip}", "--data", "{world}/id", "--out", "{tmp}/r", "--set", "train.lr"],
     "malformed --set"),
    (["train", "--recipe", "ft", "--init", "{clip}", "--data", "{world}/id", "--out", "{tmp}/r", "--set", "train.x=1"],
     "unknown config field 'train.x'"),
    (["train", "--recipe", "ft", "--init", "{clip}", "--data", "{world}/id", "--out", "{tmp}/r", "--set",
      "data.decode=cv2"], "data.decode='cv2': valid: tensor, pil"),
])
def test_bad_input_is_one_clear_error(argv, msg, tiny_clip_dir, tiny_world, tmp_path, capsys):
    import re
    import shutil

    nocls = tmp_path / "nocls"
    shutil.copytree(tiny_world / "v2", nocls)
    (nocls / "classnames.txt").unlink()
    fmt = dict(clip=tiny_clip_dir, tmp=tmp_path, world=tiny_world, nocls=nocls)
    rc = main([a.format(**fmt) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(msg, err), err
    assert "Traceback" not in err


def test_list_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "grace_app", "list", "recipes"], capture_output=True, text=True,
                         check=True).stdout.split()
    from grace_plugin.recipes import list_recipes

    assert out == list_recipes() and {"ft", "grace"} <= set(out)


@pytest.mark.parametrize("kind,names", [("layouts", {"clip_benchmark", "timm"}), ("suites", {"id", "adv:<attack>"})])
def test_list_reads_each_registry(kind, names, capsys):
    assert main(["list", kind]) == 0
    assert names <= set(capsys.readouterr().out.split())


def test_quickstart_smoke(tmp_path, capsys):
    """The whole flow runs and writes its outputs (one recipe, one seed, a few steps; the seed aggregation has its
    own test below, the pieces have theirs)."""
    out = tmp_path / "qs"
    rc = main(["quickstart", "--out", str(out), "--size", "small", "--pretrain-steps", "5", "--steps", "1",
               "--recipes", "ft", "--n-adv", "4", "--no-progress", "--set", "train.batch_size=8"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["zero-shot", "ft"]
    assert summary["seeds"] == [0] and summary["world"] == "v2"
    # the table names its columns and the interval widths (1.96 * sqrt(0.25 / n) at n = 80 small-world ID images)
    assert "Columns (`strict` definition): ID = top-1" in (out / "summary.md").read_text()
    assert f"±{1.96 * (0.25 / 80) ** 0.5 * 100:.1f} (ID)" in summary["columns"]
    for r in summary["rows"]:
        assert all(r[k] is not None for k in ("id", "ood", "adv", "hm"))
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "pretrained" / "open_clip_config.json").is_file()
    report = json.loads((out / "runs" / "ft" / "report.json").read_text())
    assert next(r for r in summary["rows"] if r["method"] == "ft")["id"] == pytest.approx(report["axes"]["id"])
    # the summary names the tiny CLIP the rows start from: the sha256 of its weights, computed here independently
    import hashlib

    sha = hashlib.sha256((out / "pretrained" / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert summary["tiny_clip"]["sha256"] == sha and summary["tiny_clip"]["pretrain"]["steps"] == 5
    origin = (f"Tiny CLIP {sha[:12]} (sha256), pretrained 5 steps on 1 thread(s), world v2 seed 0. PyTorch "
              f"{torch.__version__}.")
    assert summary["torch"] == torch.__version__
    printed = capsys.readouterr().out
    assert "| zero-shot |" in printed and origin in printed and origin in (out / "summary.md").read_text()


def test_train_epochs_and_rrc_augmentation(tiny_world, tiny_clip_dir, tmp_path):
    """--epochs 0.25 with batch 16 and grad_accum 2 is ceil(0.25 * 240 / 32) = 2 optimizer steps (240 samples
    counted here from the tars); data.augment=rrc trains through timm's RandomResizedCrop."""
    import math
    import tarfile

    from grace_plugin.data.shards import open_shard_set

    n = 0
    for url in open_shard_set(tiny_world / "id", split="train").urls:
        with tarfile.open(url) as tf:
            n += sum(m.name.endswith(".cls") for m in tf)
    out = tmp_path / "run"
    assert main(["train", "--recipe", "ft", "--init", str(tiny_clip_dir), "--data", str(tiny_world / "id"),
                 "--epochs", "0.25", "--out", str(out), "--set", "train.batch_size=16", "--set", "train.grad_accum=2",
                 "--set", "train.log_every=1", "--set", "data.augment=rrc", "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert n == 240 and steps == list(range(math.ceil(0.25 * n / 32)))
    assert "augment: rrc" in (out / "config.yaml").read_text()


def test_rrc_transform_is_a_random_resized_crop():
    """augment=rrc: output at the model's input size in [0,1]; a constant image stays that constant (a crop of it,
    resized); different draws of a textured image differ."""
    from PIL import Image

    from grace_plugin.data.transforms import train_transform

    cfg = {"input_size": (3, 16, 16), "interpolation": "bicubic", "crop_pct": 1.0, "mean": (0.0, 0.0, 0.0),
           "std": (1.0, 1.0, 1.0)}
    t = train_transform(cfg, "rrc")
    flat = t(Image.new("RGB", (40, 30), (51, 102, 204)))
    assert flat.shape == (3, 16, 16)
    torch.testing.assert_close(flat, torch.tensor([0.2, 0.4, 0.8]).view(3, 1, 1).expand(3, 16, 16), atol=1e-6,
                               rtol=0)
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.uniform(size=(40, 30, 3)) * 255).astype("uint8"))
    torch.manual_seed(0)
    draws = [t(img) for _ in range(4)]
    assert all(d.shape == (3, 16, 16) and 0 <= float(d.min()) and float(d.max()) <= 1 for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(train_transform(cfg, "none")(img), train_transform(cfg, "none")(img))
    # the crop is Inception-style (Szegedy et al. 2015; timm's defaults): area 8-100% of the image, aspect 3/4-4/3
    crop = next(s for s in t.transforms if type(s).__name__ == "RandomResizedCropAndInterpolation")
    assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    areas = []
    for _ in range(200):
        i, j, h, w = crop.get_params(img, crop.scale, crop.ratio)
        assert 0 <= i and 0 <= j and i + h <= 40 and j + w <= 30  # img: 40 rows, 30 columns
        areas.append(h * w / (40 * 30))
    assert min(areas) < 0.3 and max(areas) > 0.8 and all(a <= 1.0 for a in areas)


def test_study_aggregates_seeds():
    from grace_app.studies.quickstart import _aggregate

    row = _aggregate("m", [{"id": 10.0, "ood": 4.0, "adv": 1.0, "hm": 2.0}, {"id": 20.0, "ood": 6.0, "adv": 3.0,
                                                                           "hm": 4.0}])
    assert row["id"] == 15.0 and row["ood"] == 5.0 and row["n_seeds"] == 2
    assert row["id_std"] == pytest.approx(7.0710678) and row["adv_std"] == pytest.approx(1.4142136)
    single = _aggregate("m", [{"id": 1.0, "ood": 2.0, "adv": None, "hm": None}])
    assert single == {"method": "m", "id": 1.0, "ood": 2.0, "adv": None, "hm": None}


def test_a_set_without_names_is_scored_with_the_models_own_head(trained_runs, tiny_world, tmp_path, capsys, caplog):
    """A labelled set without classnames.txt (timm's wds layout has none either) is scored with the run's own head,
    its labels taken as head indices: said in the report and on stderr, and the same top-1 as the named set. One
    corrupt label beyond the head is a skipped sample; a label value many samples carry beyond it refuses the set."""
    import shutil

    nameless = tmp_path / "nameless"
    shutil.copytree(tiny_world / "id", nameless)
    for f in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (nameless / f).unlink(missing_ok=True)
    run = str(trained_runs / "ft")
    assert main(["eval", "--model", run, "--data", str(tiny_world / "id"), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    with caplog.at_level("WARNING"):  # the CLI's logging handler writes it to stderr
        assert main(["eval", "--model", run, "--data", str(nameless), "--out", str(tmp_path / "b"),
                     "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["datasets"]["id"] for d in ("a", "b"))
    assert b["head"]["head"] == "own" and "no class names" in b["head"]["reason"]
    assert any("no class names" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert (b["correct"], b["n"]) == (a["correct"], a["n"]) and b["n"] > 0

    # a corrupt label on one sample (beyond the 10-class head) is a bad sample: skipped and counted, said on
    # stderr, refused under --strict
    _relabel(sorted((nameless / "test").glob("*.tar"))[0], [b"12"])
    with caplog.at_level("WARNING"):
        assert main(["eval", "--model", run, "--data", str(nameless), "--out", str(tmp_path / "c"),
                     "--no-progress"]) == 0
    c = json.loads((tmp_path / "c" / "report.json").read_text())["datasets"]["id"]
    assert c["skipped_by_reason"] == {"label_out_of_range": 1} and c["n"] == a["n"] - 1
    assert any("1 sample(s) skipped with a label beyond the 10 classes" in r.getMessage() for r in caplog.records)
    rc = main(["eval", "--model", run, "--data", str(nameless), "--out", str(tmp_path / "d"), "--no-progress",
               "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and "label_out_of_range=1" in err and len(err.strip().splitlines()) == 1, err
    # a label value that many samples carry beyond the head is a bad set: refused in one line
    _relabel(sorted((nameless / "test").glob("*.tar"))[0], [b"12"] * 40)
    rc = main(["eval", "--model", run, "--data", str(nameless), "--out", str(tmp_path / "e"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "labels beyond the model's 10-class head" in err and len(err.strip().splitlines()) == 1, err


def _relabel(shard, labels: list[bytes]) -> None:
    """Rewrite the first ``len(labels)`` ``cls`` members of a tar shard."""
    import io
    import tarfile

    members, todo = [], list(labels)
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            if m.name.endswith(".cls") and todo:
                data = todo.pop(0)
            members.append((m, data))
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
