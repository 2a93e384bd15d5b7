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


# ------------------------------------------------------------------------------------------ configs/testbed/
def test_every_recipe_has_a_testbed_config_and_every_method_builds():
    from grace_app.testbed.configs import TESTBED_DIR, load_methods, method_config

    files = {p.stem for p in TESTBED_DIR.glob("*.yaml")}
    assert set(list_recipes()) <= files
    methods = load_methods()
    assert {m.recipe for m in methods.values() if m.recipe} == set(list_recipes())
    for name, m in methods.items():
        if m.recipe is None:
            continue
        cfg = method_config(m, steps=5)
        assert cfg.train.steps == round(5 * m.steps_scale) and cfg.train.batch_size == 64, name  # common.yaml too


def test_one_training_attack_for_every_adversarial_method():
    """attack.yaml is the single attack of tecoa, fare, pmg_aft, grace and the ablation rows (grace_fast and
    grace_lite keep their own one-step attacks on purpose: the cheaper attack is their point)."""
    from grace_app.testbed.configs import load_methods, load_yaml_attack, method_config

    attack = load_yaml_attack()
    methods = load_methods()
    adversarial = [n for n, m in methods.items() if m.adversarial and m.recipe not in ("grace_fast", "grace_lite")]
    assert {"tecoa", "fare", "pmg_aft", "grace", "lora-tecoa", "ablation-gv-only"} <= set(adversarial)
    for n in adversarial:
        rec = method_config(n).recipe
        assert {k: getattr(rec, k) for k in attack} == pytest.approx(attack), n
    assert method_config("grace_fast").recipe.pgd_steps == 1
    assert method_config("grace_fast").train.lr == method_config("grace").train.lr  # layered on grace.yaml
    for name in ("grace_lite", "grace_lite-clean"):
        rec = method_config(name).recipe
        assert (rec.pgd_steps, rec.pgd_alpha, rec.noise, rec.project) == (1, pytest.approx(4 / 255), 2.0, False)
        assert method_config(name).train.lr == method_config("grace").train.lr
    assert method_config("grace_lite-clean").recipe.attack_grad == "clean"
    assert method_config("grace_lite").recipe.awp_fraction == 0.5  # the cheap schedule's half AWP view
    assert method_config("grace_lite-full").recipe.awp_fraction == method_config("grace").recipe.awp_fraction == 1.0


def test_table8_rows_switch_grace_components():
    from grace_app.testbed.configs import method_config

    rows = ("ablation-lora-ft", "ablation-lar-rho0", "ablation-gv-only", "ablation-awp-uniform",
            "ablation-awp-curriculum", "grace")
    got = {n: (method_config(n).recipe.awp, method_config(n).recipe.gram_volume, method_config(n).recipe.lambda_lar)
           for n in rows}
    lar = method_config("grace").recipe.lambda_lar
    assert got == {"ablation-lora-ft": ("off", False, lar), "ablation-lar-rho0": ("zero", False, lar),
                   "ablation-gv-only": ("curriculum", True, 0.0), "ablation-awp-uniform": ("uniform", False, lar),
                   "ablation-awp-curriculum": ("curriculum", False, lar), "grace": ("curriculum", True, lar)}


def test_every_tuning_space_is_valid_and_holds_its_anchors():
    """Every tuned method has a log-uniform lr axis; both ends of every range and every choice give a valid config;
    the anchors (published defaults) lie inside the space; the issue's methods are all there."""
    from grace_app.studies.search import parse_space
    from grace_app.testbed.configs import load_methods, load_tuned, load_tuning, method_config, nest

    proto, methods = load_tuning(), load_methods()
    assert {"ft", "wise_ft", "tecoa", "lora-tecoa", "lora-ft", "pmg_aft", "fare", "grace"} <= set(proto["space"])
    assert proto["trials"] >= 24 and proto["n_val_adv"] >= 400 and 0 < proto["collapse_spread"] < 1
    for name, spec in proto["space"].items():
        assert name in methods, name
        axes = parse_space(name, spec)
        assert any(a.key == "train.lr" and not a.categorical for a in axes), f"{name}: lr is tuned for every method"
        for a in axes:
            for v in (a.choices if a.categorical else (a.low, a.high)):
                method_config(name, overrides=nest({a.key: v}))
        anchors = proto["anchors"][name]
        assert anchors, f"{name}: no anchor at the published defaults"
        for point in anchors:
            assert all(any(a.key == k and a.contains(v) for a in axes) for k, v in point.items()), (name, point)
            method_config(name, overrides=nest(point))
    for name, values in load_tuned().items():
        method_config(name, overrides=nest(values))

def test_testbed_typo_names_file_and_field(tmp_path, monkeypatch):
    import shutil

    from grace_app.testbed.configs import TESTBED_DIR, method_config
    from grace_plugin.config import ConfigError

    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    (d / "ft.yaml").write_text("train:\n  lrr: 1.0e-4\n")
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    with pytest.raises(ConfigError, match=r"ft\.yaml: unknown config field 'train.lrr'"):
        method_config("ft")


@pytest.mark.parametrize("edit,match", [
    (("paired_reference: grace", "paired_refrence: grace"), r"study core: unknown key\(s\) paired_refrence"),
    (("paired_reference: grace", "paired_reference: tecoa"), r"paired_reference 'tecoa' is not one of its rows"),
    (("shift_reference: grace", "shift_reference: sam"), r"study shift: shift_reference 'sam' is not one of its rows"),
    (("metric: adv, fraction: 0.95}", "metric: adv, fracton: 0.95}"), r"unknown key\(s\) fracton"),
])
def test_studies_yaml_typo_names_file_study_and_key(tmp_path, monkeypatch, edit, match):
    import shutil

    from grace_app.testbed.configs import TESTBED_DIR, load_studies
    from grace_plugin.config import ConfigError

    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    text = (d / "studies.yaml").read_text()
    assert edit[0] in text
    (d / "studies.yaml").write_text(text.replace(edit[0], edit[1], 1))
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    with pytest.raises(ConfigError, match=r"studies\.yaml: .*" + match):
        load_studies()


def test_the_wheel_ships_the_testbed_configs(tmp_path):
    """A plain `pip install` has configs/testbed (quickstart and studies need it): build the wheel with setuptools
    from a copy of the sources and read its file list."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "grace_plugin", "registry", "eval_suites", "grace_app", "configs"):
        p = root / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(p, src / name)
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(tmp_path / 'dist')!r}))"
    (tmp_path / "dist").mkdir()
    r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = tmp_path / "dist" / r.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"grace_app/testbed_configs/{p.name}" for p in (root / "configs" / "testbed").glob("*.yaml")}
    assert "grace_app/testbed_configs/methods.yaml" in want and want <= names
    # and the default world's tiny CLIP (grace_app/testbed/tiny_clip.py SHIPPED), so a plain install does not
    # pretrain it
    assert {"grace_app/testbed/artifacts/world-v2-seed0.json",
            "grace_app/testbed/artifacts/tiny-clip-v2-seed0/open_clip_model.safetensors",
            "grace_app/testbed/artifacts/tiny-clip-v2-seed0/open_clip_config.json"} <= names


def test_every_lora_method_uses_the_one_testbed_lora():
    """The testbed's LoRA (placement, rank, alpha, modules trained in full) is defined once, in common.yaml's recipe
    block (chosen on LoRA-TeCoA by bench/lora_capacity.py), and every LoRA method of methods.yaml resolves to it;
    no other testbed file sets a LoRA field (the CoCa layer only renames where the adapters go)."""
    import yaml

    from grace_app.testbed.configs import load_methods, method_config, testbed_dir

    d = testbed_dir()
    lora = {k: v for k, v in (yaml.safe_load((d / "common.yaml").read_text())["recipe"]).items()
            if k.startswith("lora_")}
    assert {"lora_rank", "lora_alpha", "lora_targets"} <= set(lora)
    def keys(node):  # every mapping key of a parsed YAML file, dotted `set:` keys included
        if isinstance(node, dict):
            for k, v in node.items():
                yield str(k)
                yield from keys(v)
        elif isinstance(node, list):
            for v in node:
                yield from keys(v)

    # the generative backbone's layer names its own modules (open_clip's, not timm's): only the placement differs
    renamed = {"coca.yaml": {"lora_targets", "lora_modules_to_save"}}
    for f in d.glob("*.yaml"):
        if f.name == "common.yaml":
            continue
        bad = [k for k in keys(yaml.safe_load(f.read_text())) if "lora_" in k.rsplit(".", 1)[-1]
               and k not in renamed.get(f.name, set())]
        assert not bad, f"{f.name} sets a LoRA field: {bad}"
    lora_methods = [n for n, m in load_methods().items() if m.recipe and method_config(n).recipe.lora]
    assert {"grace", "grace_lite", "lora-ft", "lora-tecoa", "lora-spd", "ablation-lora-ft"} <= set(lora_methods)
    for name in lora_methods:
        rec = method_config(name).recipe
        assert {k: getattr(rec, k) for k in lora} == lora, name


def test_a_compute_matched_method_trains_its_scaled_steps(tmp_path, monkeypatch):
    """steps_scale: lora-tecoa-cm is LoRA-TeCoA at its tuned values trained round(steps x scale) steps, at the study's
    run length or the configs' own; a bad scale is an error naming the method."""
    import shutil

    from grace_app.testbed.configs import TESTBED_DIR, load_methods, method_config
    from grace_plugin.config import ConfigError

    cm, base = method_config("lora-tecoa-cm", steps=300), method_config("lora-tecoa", steps=300)
    scale = load_methods()["lora-tecoa-cm"].steps_scale
    assert scale > 1 and cm.train.steps == round(300 * scale)
    assert (cm.train.lr, cm.recipe.lora, cm.recipe.pgd_steps) == (base.train.lr, True, base.recipe.pgd_steps)
    assert method_config("lora-tecoa-cm", steps=7).train.steps == round(7 * scale)
    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    (d / "methods.yaml").write_text("x: {recipe: ft, steps_scale: -2}\n")
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    with pytest.raises(ConfigError, match=r"method 'x': steps_scale -2 is not a positive number"):
        load_methods()


def test_grace_core_is_a_method_with_its_own_tuning(tmp_path, monkeypatch):
    """grace-core: GRACE at rho 0 without the volume term, tuned on its own (lr, lambda_LAR), unlike the Table 8 row
    ablation-lar-rho0 that takes GRACE's values."""
    import shutil

    from grace_app.testbed.configs import TESTBED_DIR, load_tuning, method_config

    assert set(load_tuning()["space"]["grace-core"]) == {"train.lr", "recipe.lambda_lar"}
    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    (d / "tuned.yaml").write_text("grace: {recipe.lambda_lar: 2.5, train.lr: 0.002}\n"
                                  "grace-core: {recipe.lambda_lar: 4.0, train.lr: 0.005}\n")
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    core, rho0 = method_config("grace-core"), method_config("ablation-lar-rho0")
    got = (core.recipe.awp, core.recipe.gram_volume, core.recipe.lambda_lar, core.train.lr)
    assert got == ("zero", False, 4.0, 0.005)
    assert (rho0.recipe.awp, rho0.recipe.lambda_lar, rho0.train.lr) == ("zero", 2.5, 0.002)


def test_a_second_tuning_of_one_world_joins_its_page(tmp_path):
    """`grace results --add` of a tuning.json for a world that has a page: the same protocol adds its methods to that
    page (a method tuned again replaces its entry); another protocol replaces the page."""
    import json

    from grace_app.studies.publish import add_source

    def doc(methods, trials=24):
        return {"protocol": {"trials": trials}, "trials": trials, "steps": 300, "size": "default", "seed": 0,
                "seconds": 1.0, "methods": {m: {"values": {"train.lr": v}} for m, v in methods.items()}}

    data = tmp_path / "data"
    for i, d in enumerate([doc({"grace": 1e-3, "tecoa": 2e-3}), doc({"grace-core": 3e-3, "tecoa": 4e-3})]):
        (tmp_path / f"t{i}").mkdir()
        (tmp_path / f"t{i}" / "tuning.json").write_text(json.dumps(d))
        dest = add_source(tmp_path / f"t{i}", data)
    got = json.loads(dest.read_text())
    assert dest.name == "tuning-default-seed0.json" and got["seconds"] == 2.0
    assert {m: v["values"]["train.lr"] for m, v in got["methods"].items()} == {"grace": 1e-3, "tecoa": 4e-3,
                                                                               "grace-core": 3e-3}
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "tuning.json").write_text(json.dumps(doc({"ft": 1e-4}, trials=12)))
    assert list(json.loads(add_source(tmp_path / "t2", data).read_text())["methods"]) == ["ft"]
