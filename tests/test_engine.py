"""One evaluation engine (issue 11): shorthands == suites for every catalogued set and scoring, subset/mapping
scoring against a hand computation, both column definitions (the paper's Table 6), Wilson intervals, which head is
used (issue 12.4), and 2 torchrun processes == 1 process, killed mid-way and resumed."""
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_suites.shardsets import get_shardset, list_shardsets
from grace_app.cli import main

SUBSET = [1, 4, 6, 9]  # ID classes of the "200-class"-style subset set


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_clip_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _write_set(dst: Path, samples, classnames, templates, per_shard=16):
    (dst / "test").mkdir(parents=True)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for i, chunk in enumerate(shards):
        with tarfile.open(dst / "test" / f"{i}.tar", "w") as tf:
            for key, img, label in chunk:
                for ext, data in (("png", img), ("cls", str(label).encode())):
                    ti = tarfile.TarInfo(f"{key}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
    (dst / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    (dst / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (dst / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


def _read_set(src: Path):
    from grace_plugin.data.shards import open_shard_set

    s = open_shard_set(src)
    out = []
    for url in s.urls:
        with tarfile.open(url) as tf:
            items = {}
            for m in tf:
                key, ext = m.name.split(".", 1)
                items.setdefault(key, {})[ext] = tf.extractfile(m).read()
        out += [(k, next(d for e, d in v.items() if e != "cls"), int(v["cls"])) for k, v in items.items()]
    return s, out


@pytest.fixture(scope="module")
def root(tiny_world, tmp_path_factory):
    """A data root holding every catalogued folder: subset-scored sets carry 4 of the 10 ID classes (labels index
    their own class list, names in ID order), the others are copies of the testbed's sketch set."""
    root = tmp_path_factory.mktemp("root")
    sk, samples = _read_set(tiny_world / "sketch")
    for name in list_shardsets():
        e = get_shardset(name)
        if (root / e.folder).exists():
            continue
        if e.scoring == "subset":
            keep = {c: 6 - i for i, c in enumerate(SUBSET)}  # 6, 5, 4, 3 images: accuracies differ by scoring
            sub = []
            for k, img, y in samples:
                if keep.get(y, 0) > 0:
                    keep[y] -= 1
                    sub.append((k, img, SUBSET.index(y)))
            _write_set(root / e.folder, sub, [sk.classnames[i] for i in SUBSET], sk.templates)
        else:
            _write_set(root / e.folder, samples[:32], sk.classnames, sk.templates)
    return root


class Biased(torch.nn.Module):
    """A 'fine-tuned' classifier: CLIP's zero-shot classifier plus a fixed bonus on class 4, which no head rebuilt
    from the text tower has (so own / subset / mapping scoring give different numbers)."""

    def __init__(self, clf):
        super().__init__()
        self.visual, self.head, self.normalize = clf.visual, clf.head, clf.normalize
        self.pretrained_cfg = clf.pretrained_cfg
        self.clf = clf
        self.register_buffer("bonus", torch.zeros(clf.head.weight.shape[0]))
        self.bonus[4] = 1000.0  # class 4: 5 of the 18 subset images

    def forward(self, x):
        return self.clf(x) + self.bonus


@pytest.fixture(scope="module")
def finetuned(tiny_clip_dir, tiny_world):
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.models.clip import classifier_from_clip, load_clip
    from registry import LoadedModel

    clip = load_clip(tiny_clip_dir)
    ids = open_shard_set(tiny_world / "id")
    model = Biased(classifier_from_clip(clip, ids.classnames, ids.templates)).eval()
    return LoadedModel(model, "finetuned-like", list(ids.classnames), clip, {"templates": ids.templates})


@pytest.fixture()
def as_model(monkeypatch):
    import registry

    orig = registry.load_model

    def use(loaded):
        monkeypatch.setattr(registry, "load_model", lambda spec, device="cpu": loaded if spec == "M" else
                            orig(spec, device))
    return use


def _eval(tmp, out, *args):
    rc = main(["eval", "--model", "M", "--out", str(tmp / out), "--no-progress", "--batch-size", "16", *args])
    assert rc == 0
    return json.loads((tmp / out / "report.json").read_text())


@pytest.mark.parametrize("name", list_shardsets())
def test_ood_shorthand_equals_suite_for_every_catalogued_set(name, root, finetuned, as_model, tmp_path):
    as_model(finetuned)
    base = ["--data-root", str(root)]
    a = _eval(tmp_path, "a", *base, "--ood", name)
    b = _eval(tmp_path, "b", *base, "--suite", f"ood:{name}")
    c = _eval(tmp_path, "c", "--ood", f"{name}={root / get_shardset(name).folder}")
    assert a["datasets"][name] == b["datasets"][name]
    assert {k: v for k, v in c["datasets"][name].items()} == {**a["datasets"][name]}
    assert a["definitions"] == b["definitions"] == c["definitions"]
    d = a["datasets"][name]
    assert d["scoring"] == get_shardset(name).scoring and d["n"] > 0 and d["ci95"][0] <= d["top1"] <= d["ci95"][1]
    assert d["paper_column"] == get_shardset(name).paper


def _mapping_file(tmp_path, names, id_names):
    """Each set class maps to its own ID class and to the next one (a two-target mapping, as ObjectNet's)."""
    m = {n: [n, id_names[(id_names.index(n) + 1) % len(id_names)]] for n in names}
    f = tmp_path / "map.json"
    f.write_text(json.dumps(m))
    return f, m


def _direct_logits(model, set_dir):
    """Independent of our loaders: tarfile + PIL -> [0,1] tensors, the model's full logits."""
    _, samples = _read_set(set_dir)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(img)).convert("RGB"), dtype=np.float32)
                                      / 255).permute(2, 0, 1) for _, img, _ in samples])
    with torch.no_grad():
        return model(x), torch.tensor([y for _, _, y in samples])


@pytest.mark.parametrize("scoring", ["own", "subset", "mapping"])
def test_scoring_override_equal_by_both_names_and_by_hand(scoring, root, finetuned, as_model, tmp_path):
    """`--scoring` applies identically to --ood and --suite ood:, and equals the hand computation: own = a head
    built from the set's names; subset = the model's full (fine-tuned) logits restricted to the set's ID indices;
    mapping = argmax over the union of targets, correct when among the label's targets."""
    from grace_plugin.data.shards import open_shard_set

    as_model(finetuned)
    set_dir = root / get_shardset("imagenet-r").folder
    names = open_shard_set(set_dir).classnames
    mfile, mapping = _mapping_file(tmp_path, names, finetuned.classnames)
    extra = ["--data-root", str(root), "--scoring", scoring, "--mapping", f"imagenet-r={mfile}"]
    a = _eval(tmp_path, "a", *extra, "--ood", "imagenet-r")["datasets"]["imagenet-r"]
    b = _eval(tmp_path, "b", *extra, "--suite", "ood:imagenet-r")["datasets"]["imagenet-r"]
    assert a == b and a["scoring"] == scoring
    if scoring == "own":
        model = finetuned.for_classes(names, finetuned.meta["templates"])
        logits, y = _direct_logits(model, set_dir)
        correct = (logits.argmax(-1) == y).tolist()
        assert a["head"]["head"] == "rebuilt"
    else:
        logits, y = _direct_logits(finetuned.model, set_dir)
        idx = [finetuned.classnames.index(n) for n in names]
        if scoring == "subset":
            correct = (logits[:, idx].argmax(-1) == y).tolist()
        else:
            union = sorted({finetuned.classnames.index(t) for ts in mapping.values() for t in ts})
            pred = [union[i] for i in logits[:, union].argmax(-1).tolist()]
            correct = [finetuned.classnames[p] in mapping[names[t]] for p, t in zip(pred, y.tolist())]
        assert a["head"]["head"] == "own"
    assert a["n"] == len(correct) and a["correct"] == sum(correct)
    assert a["top1"] == pytest.approx(100.0 * sum(correct) / len(correct))
    # the three scorings differ on this model, so the comparison above can fail
    if scoring == "subset":
        own = _eval(tmp_path, "own", "--data-root", str(root), "--scoring", "own", "--ood", "imagenet-r")
        assert own["datasets"]["imagenet-r"]["correct"] != a["correct"]


def test_mapping_scoring_without_a_file_is_one_clear_error(root, finetuned, as_model, tmp_path, capsys):
    as_model(finetuned)
    rc = main(["eval", "--model", "M", "--data-root", str(root), "--ood", "imagenet-r", "--scoring", "mapping",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "--mapping imagenet-r=FILE" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ column definitions
def _table6():
    from eval_suites.leaderboard import reference_rows

    return reference_rows("Table 6")


@pytest.mark.parametrize("row", _table6(), ids=lambda r: r["method"])
def test_paper_definition_reproduces_table6_hm(row):
    """Per-set inputs whose Table 6 averages are the row's OOD and Adv: V2/Sketch/R around OOD, the attack and
    ImageNet-A around Adv. The `paper` definition gives the row's columns and its printed HM (to the paper's
    two-decimal rounding); `strict` averages what was given instead."""
    from eval_suites.report import build_report, harmonic_mean

    ood, adv = row["ood"], row["adv"]
    n = 10000
    sets = {"in": (row["id"], None), "v2": (ood - 2, "v2"), "sk": (ood + 0.5, "sketch"), "r": (ood + 1.5, "r"),
            "a": (adv + 1, "a"), "extra": (50.0, None)}
    datasets = {k: {"top1": v, "correct": round(v * n / 100), "n": n, "skipped": 0, "paper_column": c,
                    "role": "id" if k == "in" else "ood"} for k, (v, c) in sets.items()}
    adversarial = {"attack": "apgd-ce", "eps": 4 / 255, "norm": "Linf", "n": n, "robust_acc": adv - 1,
                   "clean_acc": row["id"]}
    rep = build_report("m", datasets, "in", ["v2", "sk", "r", "a", "extra"], adversarial)
    p = rep["definitions"]["paper"]
    assert p["id"] == row["id"] and p["ood"] == pytest.approx(ood) and p["adv"] == pytest.approx(adv)
    assert p["hm"] == pytest.approx(row["hm"], abs=0.015)
    assert p["inputs"] == {"id": ["in"], "ood": ["v2", "sk", "r"], "adv": ["adv:apgd-ce", "a"]}
    assert p["missing"] == {"id": [], "ood": [], "adv": ["a-plus"]}
    s = rep["definitions"]["strict"]
    assert s["ood"] == pytest.approx(np.mean([sets[k][0] for k in ("v2", "sk", "r", "a", "extra")]))
    assert s["adv"] == adv - 1 and s["hm"] == pytest.approx(harmonic_mean([row["id"], s["ood"], adv - 1]))
    assert rep["axes"] == {k: s[k] for k in ("id", "ood", "adv", "hm")}
    for d in (p, s):  # every column's interval contains its value
        assert all(d["ci95"][k][0] <= d[k] <= d["ci95"][k][1] for k in ("id", "ood", "adv", "hm"))


def test_grace_row_is_39_69():
    from eval_suites.report import harmonic_mean

    assert round(harmonic_mean([74.21, 57.01, 22.44]), 2) == 39.69


def test_paper_definition_names_missing_sets():
    from eval_suites.report import build_report

    ds = {"id": {"top1": 80.0, "n": 100, "role": "id"}, "v2": {"top1": 60.0, "n": 100, "paper_column": "v2"}}
    p = build_report("m", ds, "id", ["v2"], None)["definitions"]["paper"]
    assert p["ood"] == 60.0 and p["adv"] is None and p["hm"] is None
    assert p["missing"] == {"id": [], "ood": ["sketch", "r"], "adv": ["attack", "a", "a-plus"]}


@pytest.mark.parametrize("k,n", [(0, 10), (7, 10), (10, 10), (113, 200), (1, 5000)])
def test_wilson_interval_closed_form(k, n):
    """Wilson (1927): (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = the 97.5 % normal quantile."""
    from statistics import NormalDist

    from eval_suites.report import wilson

    z = NormalDist().inv_cdf(0.975)
    p = k / n
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    assert wilson(k, n) == pytest.approx([100 * lo, 100 * hi], abs=1e-9)
    from scipy.stats import binomtest  # the closed form here is scipy's interval (it was computed by scipy before)

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson(k, n) == pytest.approx([100 * ci.low, 100 * ci.high], abs=1e-9)
    assert wilson(k, n, confidence=0.9) == pytest.approx(
        [100 * v for v in binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")], abs=1e-9)


def test_summary_marks_overlapping_intervals_not_significant():
    from eval_suites.report import not_significant, summary_markdown, wilson

    rows = [{"method": m, "adv": 100 * k / 200, "adv_ci": wilson(k, 200)} for m, k in
            (("a", 60), ("b", 52), ("c", 20))]
    ns = not_significant(rows)
    assert ns["adv"] == [["a", "b"]]  # 30 % vs 26 % on n = 200 overlap; 10 % does not
    md = summary_markdown(rows, definition="strict")
    assert "| b | - | - | 26.00 [20.4, 32.5] ≈ |" in md and "| c |" in md and "≈ |" not in md.split("| c |")[1]


# ------------------------------------------------------------------------------------------ which head (12.4)
def _copy_set(src, dst, classnames=None, classnames_file=True):
    shutil.copytree(src, dst)
    if classnames is not None:
        (dst / "classnames.txt").write_text("\n".join(classnames) + "\n")


def test_head_used_is_said_and_never_silently_rebuilt(finetuned, as_model, tiny_world, tmp_path, capsys, caplog):
    as_model(finetuned)
    names = finetuned.classnames
    # the set's names are the head's: its own head
    rep = _eval(tmp_path, "own", "--data", str(tiny_world / "id"))
    assert rep["datasets"]["id"]["head"]["head"] == "own"
    capsys.readouterr()
    # more names than the head: a head for 11 classes is built, said in the report and on stderr
    _copy_set(tiny_world / "id", tmp_path / "more", names + ["zebra"])
    rep = _eval(tmp_path, "more_o", "--data", str(tmp_path / "more"))
    head = rep["datasets"]["id"]["head"]
    assert head["head"] == "rebuilt" and head["classes"] == 11 and "11 class names, the model's head 10" in \
        head["reason"]
    err = " ".join(r.getMessage() for r in caplog.records)  # the CLI's logging writes these to stderr
    assert "rebuilt head (11 classes)" in err and "11 class names" in err
    assert "11 class names" in (tmp_path / "more_o" / "report.md").read_text()
    # fewer names than the labels need: an error naming the set, not a silently smaller head
    _copy_set(tiny_world / "id", tmp_path / "fewer", names[:9])
    rc = main(["eval", "--model", "M", "--data", str(tmp_path / "fewer"), "--out", str(tmp_path / "x"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "classnames.txt: 9 names, but labels beyond them are carried by many samples: 9 (" in err, err
    assert "the class list and the labels disagree" in err and len(err.strip().splitlines()) == 1, err


def test_run_without_class_names_keeps_its_head_and_says_so(finetuned, as_model, tiny_world, tmp_path, caplog):
    """``classnames: []`` in checkpoint.json: the fine-tuned head is kept (same class count), said on stderr; the
    numbers are those of the fine-tuned head, not of a rebuilt one."""
    from registry import LoadedModel

    nameless = LoadedModel(finetuned.model, "nameless", [], finetuned.text_tower(), finetuned.meta)
    as_model(nameless)
    rep = _eval(tmp_path, "n", "--data", str(tiny_world / "id"))
    head = rep["datasets"]["id"]["head"]
    assert head["head"] == "own" and "records no class names" in head["reason"]
    assert any("records no class names" in r.getMessage() for r in caplog.records)
    as_model(finetuned)
    assert rep["datasets"]["id"]["correct"] == _eval(tmp_path, "f", "--data", str(tiny_world / "id"))[
        "datasets"]["id"]["correct"]


def test_cli_catches_only_the_grace_error_family(monkeypatch):
    """A user mistake is one line and exit 2 (tested above); any other exception is a bug and propagates."""
    import grace_app.cli as cli

    monkeypatch.setattr(cli, "_cmd_list", lambda a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["list", "recipes"])


# ------------------------------------------------------------------------------------------ torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "grace_app", "eval", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _comparable(rep: dict) -> dict:
    """Everything measured: per-set counts, skips, intervals, scoring, heads; the attack's counts; both definitions."""
    adv = {k: v for k, v in rep["adversarial"].items() if k != "resumed_batches"}
    return {"datasets": rep["datasets"], "adversarial": adv, "definitions": rep["definitions"]}


@pytest.mark.slow
def test_two_processes_equal_one_killed_and_resumed(tiny_clip_dir, tiny_world, tmp_path):
    """2 gloo ranks under torchrun (1 thread each) == 1 process, for clean sets and APGD-CE, with a run killed after
    its first finished batches and resumed from the per-rank state."""
    from eval_suites.context import SuiteContext
    from eval_suites.engine import expand_shorthands, run_suites
    from registry import load_model

    args = ["--model", str(tiny_clip_dir), "--data", str(tiny_world / "id"), "--ood", f"sketch={tiny_world / 'sketch'}",
            "--attack", "apgd-ce", "--n-adv", "24", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    names, sets = expand_shorthands(str(tiny_world / "id"), [f"sketch={tiny_world / 'sketch'}"], "apgd-ce")
    one = run_suites(load_model(tiny_clip_dir), names, SuiteContext(
        id_set=("id", tiny_world / "id"), sets=sets, n_adv=24, batch_size=4, device="cpu", out_dir=tmp_path / "one"))
    out = tmp_path / "two"
    p = _torchrun(2, [*args, "--out", str(out)])
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some, not all, of the 6 attacked batches are saved
        files = list((out / "state").glob("adv-apgd-ce-Linf.rank*.json")) if (out / "state").is_dir() else []
        done = sum(len(json.loads(f.read_text())["batches"]) for f in files)
        if done >= 1 or p.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert 1 <= done < 6, f"not killed mid-way ({done} batches saved)"
    assert not (out / "report.json").exists()
    p = _torchrun(2, [*args, "--out", str(out)])
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0, log[-3000:]
    two = json.loads((out / "report.json").read_text())
    assert two["adversarial"]["resumed_batches"] >= 1 and two["config"]["world_size"] == 2
    assert _comparable(two) == json.loads(json.dumps(_comparable(one)))
    assert two["datasets"]["id"]["n"] == 80 and two["adversarial"]["n"] == 24
