"""Suite registry, suites on the tiny testbed, resumable adversarial runs, bad input, `grace report`."""
import json

import pytest
import torch
from torch import nn

from eval_suites.context import GeometryOptions, ShiftOptions, SuiteContext
from eval_suites.engine import list_suites, parse_suite, run_suites
from grace_app.cli import main


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_clip_dir):  # session fixtures are built first, at the default thread count
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only contend on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("task,name", [(t, n) for t in ("classification", "vqa") for n in list_suites(t)])
def test_every_suite_name_parses(task, name):
    base = name.split(":")[0]
    arg = {"adv": "pgd"}.get(base, "v2") if ":" in name else None
    assert parse_suite(f"{base}:{arg}" if arg else base, task) == (base, arg)


@pytest.mark.parametrize("bad,msg", [("nope", "valid suites: .*adv:<attack>"), ("ood", "needs an argument"),
                                     ("id:x", "takes no argument"), ("adv:nope", "valid attacks")])
def test_bad_suite_names(bad, msg):
    with pytest.raises(KeyError, match=msg):
        parse_suite(bad)


def test_suites_are_registered_per_task(capsys):
    """One engine, a suite registry per task: VQA has its own id/ood/adv/shift and refuses the image-only suites."""
    from grace_plugin.tasks import list_tasks

    for task in list_tasks():  # every task of the library can be evaluated
        assert {"id", "ood:<set>", "adv:<attack>", "shift"} <= set(list_suites(task))
    assert "geometry" in list_suites() and "geometry" not in list_suites("vqa")
    with pytest.raises(KeyError, match="unknown suite 'geometry' for --task vqa; valid suites: adv:<attack>, id"):
        parse_suite("geometry", "vqa")
    with pytest.raises(KeyError, match="unknown evaluation task 'nope'"):
        list_suites("nope")
    assert main(["list", "suites", "--task", "vqa"]) == 0
    assert capsys.readouterr().out.split() == ["adv:<attack>", "id", "ood:<set>", "shift"]


@pytest.fixture(scope="module")
def zs(tiny_clip_dir):
    from registry import load_model

    return load_model(tiny_clip_dir)


def test_suites_on_testbed_match_independent_computation(zs, tiny_world, tmp_path):
    from grace_plugin.data.shards import open_shard_set
    from test_cli import _direct_top1

    ctx = SuiteContext(id_set=("id", tiny_world / "id"), data_root=tiny_world, n_adv=16, batch_size=16,
                       out_dir=tmp_path, shift=ShiftOptions(n=60), reference=str(tiny_clip_dir_of(zs)),
                       geometry=GeometryOptions(n=24, iters=5, samples=2, attack="fgsm", lid_k=5))
    rep = run_suites(zs, ["id", "ood:sketch", "ood:a", "transfer:v2", "adv:fgsm", "shift", "geometry"], ctx)
    for name in ("id", "sketch", "a", "v2"):
        s = open_shard_set(tiny_world / name)
        model = zs.for_classes(s.classnames, s.templates)
        top1, n, per_sample = _direct_top1(model, tiny_world / name)
        assert rep["datasets"][name]["top1"] == pytest.approx(top1) and rep["datasets"][name]["n"] == n
        assert rep["datasets"][name]["per_sample"] == per_sample
    assert rep["datasets"]["v2"]["role"] == "transfer"
    assert rep["axes"]["ood"] == pytest.approx((rep["datasets"]["sketch"]["top1"] + rep["datasets"]["a"]["top1"]) / 2)
    adv = rep["suites"]["adv:fgsm"]
    assert rep["axes"]["adv"] == adv["robust_acc"] <= adv["clean_acc"] and adv["n"] == 16
    sh = rep["suites"]["shift"]
    assert set(sh["spaces"]) == {"image", "text", "joint"} and set(sh["accuracy_drop"]) == {"sketch", "a"}
    assert sorted(sh["spaces"]["image"]["order"]) == ["a", "sketch"]
    geo = rep["suites"]["geometry"]
    assert geo["hessian_top_eigenvalue"] > 0 and geo["hessian_trace"] == geo["hessian_trace"]
    assert set(geo["centroid_cosine"]) == {"sketch", "a", "adv"} and set(geo["delta_lid"]) == {"sketch", "a", "adv"}
    assert geo["parameter_drift"] == 0.0  # the zero-shot model against itself
    assert len(geo["layerwise_curvature"]) >= 2
    assert geo["hessian_loss"] == "clean" and geo["power_iteration"]["iterations"] <= 5
    md = (tmp_path / "report.md")
    from eval_suites.report import write_report

    write_report(tmp_path, rep)
    text = md.read_text()
    assert "## Geometry" in text and "## Shift" in text and "GRACE" in text and "Xu2024MIMIR_Swin-L" in text


def tiny_clip_dir_of(zs):
    return zs.name


def _state(tmp_path, name="adv-fgsm-Linf"):
    return tmp_path / "state" / f"{name}.rank0.json"


def test_adv_suite_resumes_from_state(zs, tiny_world, tmp_path):
    ctx = SuiteContext(id_set=("id", tiny_world / "id"), n_adv=16, batch_size=8, out_dir=tmp_path)
    first = run_suites(zs, ["adv:fgsm"], ctx)["suites"]["adv:fgsm"]
    st = json.loads(_state(tmp_path).read_text())
    assert sorted(st["batches"]) == ["0:0", "0:1"]  # batches (shard, k): the first 16 samples are in shard 0
    assert sum(sum(b["robust"]) for b in st["batches"].values()) * 100 / 16 == first["robust_acc"]
    assert first["resumed_batches"] == 0
    st["batches"]["0:0"]["robust"] = [1] * 8  # a finished batch is not recomputed: the edited results show through
    _state(tmp_path).write_text(json.dumps(st))
    ctx2 = SuiteContext(id_set=("id", tiny_world / "id"), n_adv=16, batch_size=8, out_dir=tmp_path)
    again = run_suites(zs, ["adv:fgsm"], ctx2)["suites"]["adv:fgsm"]
    assert again["robust_acc"] == (8 + sum(st["batches"]["0:1"]["robust"])) * 100 / 16
    assert again["resumed_batches"] == 2


@pytest.mark.parametrize("change", ["eps", "n_adv", "seed", "batch_size", "weights", "data", "data_mtime"])
def test_stale_adv_state_is_discarded(change, zs, tiny_world, tmp_path, caplog):
    """Issue 12.1: a state computed from other weights, data, attack settings or batch order is never reused: it is
    discarded with a one-line notice naming what differs, and the run recomputes."""
    import shutil

    from registry import LoadedModel

    data = tmp_path / "id"
    shutil.copytree(tiny_world / "id", data)
    kw = dict(id_set=("id", data), n_adv=16, batch_size=8, out_dir=tmp_path / "o")
    run_suites(zs, ["adv:fgsm"], SuiteContext(**kw))
    st = json.loads(_state(tmp_path / "o").read_text())
    for b in st["batches"].values():
        b["robust"] = [1] * len(b["robust"])  # poison: reused state would give 100 %
    _state(tmp_path / "o").write_text(json.dumps(st))
    model = zs
    if change == "weights":  # the model at the same path replaced: same name, other weights
        m = zs.for_classes(*_names(data))
        with torch.no_grad():
            m.head.weight.mul_(-1)
        model = LoadedModel(m, zs.name, _names(data)[0])
    elif change == "data":  # another set at the same path
        shutil.rmtree(data)
        shutil.copytree(tiny_world / "sketch", data)
    elif change == "data_mtime":
        import os

        tar = data / "test" / "0.tar"
        os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    else:
        kw = dict(kw, **{change: {"eps": 2 / 255, "n_adv": 8, "seed": 1, "batch_size": 4}[change]})
    caplog.clear()
    with caplog.at_level("WARNING"):
        res = run_suites(model, ["adv:fgsm"], SuiteContext(**kw))["suites"]["adv:fgsm"]
    assert res["resumed_batches"] == 0 and res["robust_acc"] < 100.0
    notices = [r.getMessage() for r in caplog.records if "resume state" in r.getMessage()]
    field = {"weights": "weights_sha256", "data": "data", "data_mtime": "data", "n_adv": "n"}.get(change, change)
    assert len(notices) == 1 and field in notices[0] and "discarded" in notices[0], notices


def _names(path):
    from grace_plugin.data.shards import open_shard_set

    s = open_shard_set(path)
    return s.classnames, s.templates


class Normalised(nn.Module):
    """Takes ImageNet-normalised input (no normalisation inside): attacks must refuse it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * 32 * 32, 10)
        self.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_unit_input_check():
    from eval_suites.attacks import InputRangeError, check_unit_input

    with pytest.raises(InputRangeError, match=r"does not take \[0,1\] input"):
        check_unit_input(Normalised())
    check_unit_input(Normalised(), unit_input=True)
    m = Normalised()
    m.pretrained_cfg = dict(m.pretrained_cfg, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    check_unit_input(m)


def test_imagenet_folder_missing_classes(tmp_path):
    from eval_suites.imagenet import ImageNetFolderError, check_imagenet_folder, imagenet_wnids

    for w in imagenet_wnids()[:10]:
        (tmp_path / "val" / w).mkdir(parents=True)
    with pytest.raises(ImageNetFolderError, match="missing 990 of the 1000 ImageNet class folders"):
        check_imagenet_folder(tmp_path)


@pytest.mark.parametrize("argv,msg", [
    (["--suite", "nope"], "valid suites"),
    (["--suite", "adv:pgd", "--eps", "4/x"], "bad eps"),
    (["--suite", "adv:pgd", "--model", "{normalised}"], r"does not take \[0,1\] input"),
    (["--suite", "robustbench", "--imagenet-dir", "{tmp}/inet"], "missing 999 of the 1000 ImageNet class folders"),
    (["--suite", "ood:nowhere"], "set 'nowhere': not a folder"),
])
def test_suite_bad_input_is_one_clear_error(argv, msg, tiny_clip_dir, tiny_world, tmp_path, capsys, monkeypatch):
    import re

    import registry
    from grace_app.testbed.world import CLASSNAMES
    from registry import LoadedModel

    (tmp_path / "inet" / "val" / "n01440764").mkdir(parents=True)
    orig = registry.load_model
    monkeypatch.setattr(registry, "load_model",
                        lambda spec, device="cpu": LoadedModel(Normalised(), "normalised", CLASSNAMES)
                        if spec == "{normalised}" else orig(spec, device))
    base = ["eval", "--model", str(tiny_clip_dir), "--data", str(tiny_world / "id"), "--out", str(tmp_path / "o"),
            "--no-progress", "--n-adv", "4"]
    if "--model" in argv:
        i = argv.index("--model")
        base[2] = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    rc = main(base + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(msg, err), err
    assert "Traceback" not in err


def test_cli_suites_and_report(tiny_clip_dir, tiny_world, tmp_path, capsys):
    for name, extra in (("a", []), ("b", ["--suite", "adv:pgd"])):
        rc = main(["eval", "--model", str(tiny_clip_dir), "--data", str(tiny_world / "id"), "--suite", "id",
                   "--suite", f"ood:sketch={tiny_world / 'sketch'}", *extra, "--n-adv", "8", "--batch-size", "8",
                   "--out", str(tmp_path / name), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
    reps = [json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b")]
    assert reps[0]["axes"]["id"] == reps[1]["axes"]["id"] and reps[1]["axes"]["hm"] is not None
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "agg")]) == 0
    summary = json.loads((tmp_path / "agg" / "summary.json").read_text())
    assert [r["axes"] if "axes" in r else r["id"] for r in summary["rows"]] == [reps[0]["axes"]["id"]] * 2
    assert summary["rows"][1]["hm"] == reps[1]["axes"]["hm"]
    assert summary["references"][-1]["method"] == "GRACE" and summary["references"][-1]["hm"] == 39.69
    assert (tmp_path / "agg" / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert "| GRACE (paper Table 6) |" in (tmp_path / "agg" / "summary.md").read_text()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "agg2")]) == 2


@pytest.mark.parametrize("text,flag,required,want", [
    ("v2=/d/v2", "--ood", False, ("v2", "/d/v2")),
    ("/d/v2", "--ood", False, (None, "/d/v2")),
    ("imagenet-r", "--ood", False, (None, "imagenet-r")),
    ("objectnet=m.json", "--mapping", True, ("objectnet", "m.json")),
])
def test_split_named_is_the_one_name_dir_parser(text, flag, required, want):
    from eval_suites.context import split_named

    assert split_named(text, flag, required) == want


@pytest.mark.parametrize("text,flag,required", [("=/d", "--ood", False), ("v2=", "--data", False),
                                                ("m.json", "--mapping", True)])
def test_split_named_refuses_in_one_line_naming_the_flag(text, flag, required):
    from eval_suites.context import split_named
    from grace_plugin.errors import UsageError

    with pytest.raises(UsageError, match=f"^{flag} "):
        split_named(text, flag, required)


def test_context_parses_eps_data_and_mappings_once(tmp_path):
    """--eps's text, --data's [NAME=]DIR and --mapping's NAME=FILE are parsed by the context itself (the CLI passes
    them as typed); an existing path with '=' in it is a folder, not NAME=DIR."""
    from grace_plugin.config import ConfigError
    from grace_plugin.errors import UsageError

    odd = tmp_path / "a=b"
    odd.mkdir()
    ctx = SuiteContext(id_set=str(odd), eps="4/255", mapping_files=["objectnet=m.json"])
    assert ctx.eps == pytest.approx(4 / 255) and ctx.id_set == ("id", str(odd))
    assert ctx.mapping_files == {"objectnet": "m.json"}
    assert SuiteContext(id_set="in=/x").id_set == ("in", "/x")
    with pytest.raises(UsageError, match="bad eps"):
        SuiteContext(eps="four")
    with pytest.raises(ConfigError, match="--eps 4"):
        SuiteContext(eps="4")  # an Linf radius above 1: the cross-field rule


def test_geometry_of_the_adversarial_loss(zs, tiny_world):
    """hessian_loss="adversarial": the curvature of the cross-entropy at the attack's images (FGSM here), held fixed;
    it differs from the clean loss's on the same images and weights, and the power iteration says how it ended."""

    def geo(loss):
        ctx = SuiteContext(id_set=("id", tiny_world / "id"), data_root=tiny_world, batch_size=16,
                           geometry=GeometryOptions(n=16, iters=4, samples=1, attack="fgsm", lid_k=5,
                                                    hessian_loss=loss))
        return run_suites(zs, ["geometry"], ctx)["suites"]["geometry"]

    clean, adv = geo("clean"), geo("adversarial")
    assert adv["hessian_loss"] == "adversarial" and adv["power_iteration"]["tol"] == 1e-4
    assert adv["hessian_top_eigenvalue"] != pytest.approx(clean["hessian_top_eigenvalue"], rel=1e-3)
    assert adv["centroid_cosine"]["adv"] == pytest.approx(clean["centroid_cosine"]["adv"])  # the same attack
    with pytest.raises(Exception, match="hessian_loss"):
        GeometryOptions(hessian_loss="adv")
