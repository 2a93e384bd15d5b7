"""`grace study` smoke tests on the small world (tiny steps): files, rows, verdicts, the tuning command."""
import hashlib
import json
import shutil

import pytest
import torch

from grace_app.cli import main

TINY = ["--size", "small", "--pretrain-steps", "10", "--steps", "2", "--no-progress", "--set", "train.batch_size=8"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("study")


def test_study_table8_smoke(study_dir, capsys):
    out = study_dir / "t8"
    assert main(["study", "table8", "--out", str(out), "--n-adv", "8"] + TINY) == 0
    doc = json.loads((out / "study.json").read_text())
    assert list(doc["rows"]) == ["ablation-lora-ft", "ablation-lar-rho0", "ablation-gv-only", "ablation-awp-uniform",
                                 "ablation-awp-curriculum", "grace"]
    for name, row in doc["rows"].items():
        run = row["runs"][0]
        assert all(run["axes"][k] is not None for k in ("id", "ood", "adv", "hm")), name
        lo, hi = run["intervals"]["id"]
        assert lo <= run["axes"]["id"] <= hi
        assert row["axes"]["id"] == pytest.approx(run["axes"]["id"])  # one seed: the mean is the run
    # the components did what the rows say: the LoRA-FT row ran no curriculum, the GRACE row did and logged GV share
    assert doc["rows"]["ablation-lora-ft"]["runs"][0]["training"]["awp"] == "off"
    grace = doc["rows"]["grace"]["runs"][0]["training"]
    assert grace["awp"] == "curriculum" and grace["awp_rank_updates"] >= 1 and 0 < grace["gv_share_mean"] < 1
    assert doc["paper_table"] == "Table 8" and len(doc["paper_rows"]) == 5
    assert [v["claim"] for v in doc["verdicts"]] == ["each ablation step helps (HM)", "best HM of all rows"]
    assert all(v["verdict"] in ("holds", "fails", "inconclusive") for v in doc["verdicts"])
    # every comparison is paired on the same images and seeds (the reports' per-sample results)
    assert all("paired" in p and p["paired"]["interval_kind"] == "paired bootstrap 95%"
               for v in doc["verdicts"] for p in v["parts"])
    # the same claims on the paper's column definitions, with the same paired statistics, recorded and shown
    assert [v["claim"] for v in doc["verdicts_paper"]] == [v["claim"] for v in doc["verdicts"]]
    assert all(p["paired"]["interval_kind"] == "paired bootstrap 95%" and "ci90" in p["paired"]
               for v in doc["verdicts_paper"] for p in v["parts"])
    md = (out / "study.md").read_text()
    assert "## Verdicts on the paper's column definitions" in md
    # each attack's own number beside the worst case, which is never above either
    run = doc["rows"]["grace"]["runs"][0]
    assert set(run["adv_by_attack"]) == {"apgd-ce", "apgd-dlr"}
    assert run["axes"]["adv"] <= min(run["adv_by_attack"].values()) + 1e-9
    assert "## Each attack beside the worst case" in md
    assert "## Verdicts" in md and "## Beside the paper (Table 8" in md and "GRACE's parts at work" in md
    for name, row in doc["rows"].items():  # the collapse measure is in every table: the ID set's own spread
        spread = row["runs"][0]["feature_spread"]
        assert -1 <= spread <= 1 and row["feature_spread"] == pytest.approx(spread), name
    assert "| row | ID | OOD | Adv | HM | feature spread |" in md
    assert f"| {doc['rows']['grace']['label']} |" in md and f"{doc['rows']['grace']['feature_spread']:.3f} |" in md
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| LoRA-FT |" in capsys.readouterr().out


def test_study_core_smoke_trains_the_compute_matched_row_longer(study_dir):
    """The right controls: GRACE's tuned core and LoRA-TeCoA at GRACE's compute are rows; the compute-matched row
    trains round(steps x steps_scale) steps, and the page shows every row's steps and CPU-seconds."""
    from grace_app.testbed.configs import load_methods

    out = study_dir / "core"
    assert main(["study", "core", "--out", str(out), "--n-adv", "8"] + TINY) == 0
    doc = json.loads((out / "study.json").read_text())
    assert list(doc["rows"]) == ["lora-tecoa", "lora-tecoa-cm", "grace-core", "grace"]
    steps = {m: r["runs"][0]["training"]["train_steps"] for m, r in doc["rows"].items()}
    assert steps == {"lora-tecoa": 2, "lora-tecoa-cm": round(2 * load_methods()["lora-tecoa-cm"].steps_scale),
                     "grace-core": 2, "grace": 2}
    assert all(r["runs"][0]["training"]["train_cpu_seconds"] > 0 for r in doc["rows"].values())
    assert doc["rows"]["grace-core"]["runs"][0]["training"]["awp"] == "zero"
    assert [v["claim"] for v in doc["verdicts"]][:2] == ["LAR-AWP + GV help: above the tuned core (HM)",
                                                         "above LoRA-TeCoA at equal compute (HM)"]
    md = (out / "study.md").read_text()
    assert "## Training compute" in md and f"| LoRA-TeCoA, GRACE's compute | {steps['lora-tecoa-cm']} |" in md


def test_study_rerun_reuses_finished_runs_and_evaluations(study_dir, capsys, monkeypatch):
    """Re-running a study (after table8 above) trains and evaluates nothing again and gives the same rows; a run
    folder matches only its own config."""
    import yaml

    import grace_app.studies.runner as studies
    import grace_plugin.finetune as finetune
    from grace_plugin.config import to_dict

    out = study_dir / "t8"
    before = json.loads((out / "study.json").read_text())["rows"]
    trained = []
    monkeypatch.setattr(finetune, "fine_tune", lambda recipe, *a, **k: trained.append(recipe))
    monkeypatch.setattr(studies, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
    assert main(["study", "table8", "--out", str(out), "--n-adv", "8"] + TINY) == 0
    assert trained == []
    after = json.loads((out / "study.json").read_text())["rows"]
    assert {k: [r["axes"] for r in v["runs"]] for k, v in after.items()} == \
        {k: [r["axes"] for r in before[k]["runs"]] for k in before}
    assert "reusing the finished run" in capsys.readouterr().out
    run = out / "runs" / "grace" / "seed0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = finetune.build_config("grace", overrides={k: v for k, v in saved.items() if k != "recipe_name"})
    assert studies.finished_run_matches(run, "grace", to_dict(cfg))
    cfg.recipe.lora_rank += 1
    assert not studies.finished_run_matches(run, "grace", to_dict(cfg))
    cfg.recipe.lora_rank -= 1
    cfg.train.device = "cpu" if saved["train"]["device"] == "auto" else "auto"  # one device without CUDA
    assert studies.finished_run_matches(run, "grace", to_dict(cfg)) == (not torch.cuda.is_available())
    meta = json.loads((run / "checkpoint.json").read_text())
    (run / "checkpoint.json").write_text(json.dumps(dict(meta, device="cuda:0")))  # trained on another device
    assert not studies.finished_run_matches(run, "grace", to_dict(cfg))
    assert not studies.finished_run_matches(run, "grace_lite", to_dict(cfg))


def test_study_shift_smoke_keeps_the_attacked_evaluation_apart(study_dir):
    """The shift study: each run's FRAMES-style table beside its axes; the shift suite's accuracies are the ID and
    OOD suites' on the same images; its evaluation is cached apart from the attacked one, so a re-run (or a table6
    folder's copied evaluations) evaluates nothing again."""
    out = study_dir / "shift"
    args = ["study", "shift", "--methods", "zero-shot,ft", "--out", str(out), "--n-adv", "8"] + TINY
    assert main(args) == 0
    doc = json.loads((out / "study.json").read_text())
    assert doc["world_seed"] == 0 and doc["verdicts"] == []
    for name in ("zero-shot", "ft"):
        run = doc["rows"][name]["runs"][0]
        sh = run["shift"]
        assert sh["id_acc"] == pytest.approx(run["axes"]["id"]), name
        assert set(sh["acc"]) == {k for k in run["datasets"] if k != "id"} and len(sh["acc"]) == 4
        for s, acc in sh["acc"].items():
            assert acc == pytest.approx(run["datasets"][s]), (name, s)
            assert sh["drop"][s] == pytest.approx(run["axes"]["id"] - acc)
        assert all(d > 0 for d in sh["distance"]["image"].values())
        assert (out / "evals" / name / "seed0.json").is_file() and (out / "evals" / name / "seed0.shift.json").is_file()
    md = (out / "study.md").read_text()
    assert "## Shift (FRAMES-style)" in md and "| rho (pre-trained distance, drop) |" in md
    before = (out / "evals" / "ft" / "seed0.shift.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "evals" / "ft" / "seed0.shift.json").stat().st_mtime_ns == before
    # the folder copied elsewhere (as a geometry or shift study starts from a table6 folder): nothing again
    import grace_app.studies.runner as studies
    import grace_plugin.finetune as finetune

    copy = study_dir / "shift-copy"
    shutil.copytree(out, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "fine_tune", lambda *a, **k: pytest.fail("trained again"))
        mp.setattr(studies, "_evaluate", lambda *a, **k: pytest.fail("evaluated again"))
        assert main(args[:5] + [str(copy)] + args[6:]) == 0
    assert json.loads((copy / "study.json").read_text())["rows"]["ft"]["shift"] == doc["rows"]["ft"]["shift"]


def test_study_unknown_name_is_a_one_line_error(study_dir, capsys):
    assert main(["study", "table9", "--out", str(study_dir / "x")] + TINY) == 2
    err = capsys.readouterr().err
    assert "unknown study 'table9'" in err and "table6" in err and "Traceback" not in err


def test_study_tune_writes_selected_values_as_data(study_dir, tmp_path, monkeypatch):
    """Optuna end to end on the small world: the budget of trials from the published anchor, each with its scores,
    feature spread and compute; the selection is read back by every run; a rerun of a finished tune trains nothing."""
    from grace_app.testbed.configs import TESTBED_DIR, method_config

    d = tmp_path / "testbed"
    shutil.copytree(TESTBED_DIR, d)
    monkeypatch.setenv("GRACE_TESTBED_CONFIGS", str(d))
    out = study_dir / "tune"
    args = ["study", "tune", "--methods", "ft", "--trials", "3", "--rescore-seeds", "1", "--n-val-adv", "4",
            "--out", str(out)] + TINY
    assert main(args) == 0
    doc = json.loads((out / "tuning.json").read_text())
    ft = doc["methods"]["ft"]
    assert len(ft["trials"]) == 3 and ft["trials"][0]["point"] == {"train.lr": 3.0e-5}  # the anchor first
    assert all(1e-6 <= r["point"]["train.lr"] <= 1e-2 and r["feature_spread"] is not None for r in ft["trials"])
    assert ft["compute"]["trial_steps"] == 3 * 2 and ft["compute"]["cpu_seconds"] > 0
    assert (out / "val_split" / "test" / "nshards.txt").is_file()  # held out of ID train
    assert (out / "optuna.journal").is_file()
    assert method_config("ft").train.lr == ft["values"]["train.lr"]  # tuned.yaml is read back by every run
    assert "# [ft] 3 trials (Optuna TPE)" in (d / "tuned.yaml").read_text()
    mtimes = {p: p.stat().st_mtime for p in (out / "trials" / "ft").rglob("model.safetensors")}
    assert main(args) == 0  # resumed: the study already holds its budget
    assert {p: p.stat().st_mtime for p in (out / "trials" / "ft").rglob("model.safetensors")} == mtimes
    assert json.loads((out / "tuning.json").read_text())["methods"]["ft"]["values"] == ft["values"]
    # published: `grace results --add` turns the tuning folder into a page of its own world
    data, pages = tmp_path / "data", tmp_path / "results"
    assert main(["results", "--add", str(out), "--data", str(data), "--out", str(pages), "--mkdocs", ""]) == 0
    page = (pages / "tuning-small-seed0.md").read_text()
    assert page.startswith("<!-- generated") and "# Tuning, world seed 0 (small size;" in page
    assert f"| ft | clean | 3 | {ft['compute']['trial_steps']} |" in page
    # the re-scored trials are named: the top 3 selectable of 3 unpruned trials, so all three, and no shortfall
    assert sorted(r["trial"] for r in ft["rescored"]) == [0, 1, 2] and "selectable of" not in page.split("| ft | 0")[0]
    # the summary, the best-so-far row and every trial
    assert sum(line.startswith("| ft | ") for line in page.splitlines()) == 1 + 1 + 3


@pytest.mark.slow  # about 3 minutes on 2 cores (Hessian power iteration and an attack per row)
def test_study_geometry_smoke(study_dir):
    """The geometry study (tiny Hessian budget): lambda_max, centroid cosines, dLID and drift per row, verdicts."""
    from grace_app.studies.runner import StudyConfig, run_study

    out = study_dir / "geo"
    cfg = StudyConfig(name="geometry", out=out, steps=2, n_adv=4, size="small", pretrain_steps=10,
                      overrides=["train.batch_size=8"], n_geometry=24, geometry_iters=2)
    doc = run_study(cfg, echo=lambda *a: None)["doc"]
    assert list(doc["rows"]) == ["zero-shot", "ft", "tecoa", "lora-tecoa", "grace"]
    zs, ft = doc["rows"]["zero-shot"]["geometry"], doc["rows"]["ft"]["geometry"]
    assert zs["drift"] == pytest.approx(0.0, abs=1e-9) and ft["drift"] > 0  # drift is measured from zero-shot
    assert all(g["lambda_max"] is not None and -1 <= g["centroid_adv"] <= 1 for g in (zs, ft))
    assert [v["claim"] for v in doc["verdicts"]][0] == "lower lambda_max than FT"
    assert "## Geometry" in (out / "study.md").read_text()


def test_tiny_clip_copy_leaves_an_identical_folder_alone_and_replaces_a_stale_one(tmp_path, monkeypatch):
    """Two studies on one folder both 'prepare' the tiny CLIP: the second must not delete what the first reads."""
    from grace_app.testbed.tiny_clip import PretrainConfig, _key, tiny_clip

    monkeypatch.setenv("GRACE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "world.json").write_text('{"seed": 0}')
    cfg = PretrainConfig(steps=1)
    cached = tmp_path / "cache" / "tiny_clip" / _key(data, cfg)
    cached.mkdir(parents=True)
    (cached / "open_clip_model.safetensors").write_bytes(b"weights-1")
    (cached / "open_clip_config.json").write_text("{}")
    out = tiny_clip(data, tmp_path / "pretrained", cfg=cfg, progress=False)
    model = out / "open_clip_model.safetensors"
    assert model.read_bytes() == b"weights-1"
    inode = model.stat().st_ino
    tiny_clip(data, out, cfg=cfg, progress=False)
    assert model.stat().st_ino == inode  # identical: not deleted and copied again
    model.write_bytes(b"stale")
    (out / "extra.txt").write_text("x")
    tiny_clip(data, out, cfg=cfg, progress=False)
    assert model.read_bytes() == b"weights-1" and not (out / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "pretrained"]  # no temporary folder left


def test_study_resumes_a_killed_run_and_counts_what_it_reused(study_dir, capsys, monkeypatch):
    """After table8 above: its GRACE run, put back as a killed run (staged, with its state), is resumed (not
    trained again), the others are reused, and the study says how many of each."""
    import grace_plugin.finetune as finetune
    from grace_plugin.runfolder import partial_dir

    out = study_dir / "t8"
    run = out / "runs" / "grace" / "seed0"
    assert (run / "train_state.pt").is_file()  # train.keep_state: a finished run keeps its final state
    shutil.move(run, partial_dir(run))
    calls = []

    def fake_fine_tune(recipe, pretrained, data, run_dir, cfg, progress=False, resume=False):
        calls.append((recipe, resume))
        shutil.move(partial_dir(run_dir), run_dir)  # what the resumed run publishes
        return run_dir

    monkeypatch.setattr(finetune, "fine_tune", fake_fine_tune)
    assert main(["study", "table8", "--out", str(out), "--n-adv", "8"] + TINY) == 0
    assert calls == [("grace", True)]
    assert "runs: 5 reused (finished), 1 resumed (killed), 0 trained" in capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["run_counts"] == {"reused": 5, "resumed": 1, "trained": 0}

    # only a staged state of exactly the study's config is resumed: one with other steps (another schedule) is not
    import yaml

    import grace_app.studies.runner as studies
    from grace_plugin.config import to_dict

    saved = yaml.safe_load((run / "config.yaml").read_text())
    cfg = finetune.build_config("grace", overrides={k: v for k, v in saved.items() if k != "recipe_name"})
    shutil.move(run, partial_dir(run))
    try:
        assert studies.killed_run_matches(run, "grace", to_dict(cfg))
        cfg.train.steps += 1
        assert not studies.killed_run_matches(run, "grace", to_dict(cfg))
    finally:
        shutil.move(partial_dir(run), run)


def test_study_records_a_diverged_run_and_goes_on(study_dir, capsys, monkeypatch):
    """Seed 1 of the LoRA-FT row diverges: the study finishes, says so in study.md and study.json, and the row's
    numbers are its finished seed's (after table8 above: seed 0 is a finished run, reused); --methods keeps one row."""
    import grace_plugin.finetune as finetune
    from grace_plugin.trainer import TrainingDiverged

    out = study_dir / "t8"
    seed0 = json.loads((out / "study.json").read_text())["rows"]["ablation-lora-ft"]["runs"][0]["axes"]

    def diverge(recipe, pretrained, data, run_dir, cfg, **kw):
        raise TrainingDiverged(f"5 consecutive non-finite losses at step 2 (seed {cfg.train.seed})")

    monkeypatch.setattr(finetune, "fine_tune", diverge)
    assert main(["study", "table8", "--out", str(out), "--n-adv", "8", "--seeds", "2", "--methods", "ablation-lora-ft"]
                + TINY) == 0
    printed = capsys.readouterr().out
    assert "ablation-lora-ft seed 1: DIVERGED" in printed
    doc = json.loads((out / "study.json").read_text())
    assert list(doc["rows"]) == ["ablation-lora-ft"] and doc["methods"] == ["ablation-lora-ft"]
    row = doc["rows"]["ablation-lora-ft"]
    assert [r["seed"] for r in row["runs"]] == [0] and [d["seed"] for d in row["diverged"]] == [1]
    assert row["n_seeds"] == 1 and row["axes"]["hm"] == pytest.approx(seed0["hm"])
    md = (out / "study.md").read_text()
    assert "(1 of 2 seeds)" in md and "LoRA-FT seed 1: 5 consecutive non-finite losses" in md
    # table8's two claims compare rows --methods left out: omitted and counted, not reported as "not measured"
    assert doc["verdicts"] == [] and doc["claims_omitted"] == 2 and "2 claim(s) of this study" in md
    assert main(["study", "table8", "--out", str(out), "--methods", "grace,tecoa"] + TINY) == 2
    assert "--methods: tecoa not a row of study table8" in capsys.readouterr().err


def test_another_world_in_a_folder_with_runs_is_refused(tmp_path, capsys):
    """--seed 3 on a study folder made with seed 0 would regenerate the world under finished runs; refused (exit 2,
    one line), nothing deleted."""
    out = tmp_path / "s"
    (out / "data").mkdir(parents=True)
    world = out / "data" / "world.json"
    world.write_text(json.dumps({"world": "v2", "seed": 0, "spec": {"image_size": 16}}))
    run = out / "runs" / "grace" / "seed0"
    run.mkdir(parents=True)
    (run / "checkpoint.json").write_text("{}")
    assert main(["study", "cost", "--out", str(out), "--seed", "3"] + TINY) == 2
    err = capsys.readouterr().err
    assert "holds world v2 seed 0" in err and "use another --out" in err and "Traceback" not in err
    assert json.loads(world.read_text())["seed"] == 0 and (run / "checkpoint.json").is_file()


def test_seeds_flag_takes_a_count_or_run_seeds(study_dir, capsys, monkeypatch):
    from grace_app.cli import _parse_seeds
    from grace_plugin.errors import UsageError

    assert _parse_seeds("3") == (3, None)
    assert _parse_seeds("4-7") == (4, [4, 5, 6, 7]) and _parse_seeds("0-2,5,1") == (4, [0, 1, 2, 5])
    for bad in ("0", "7-4", "a", "1,,2"):
        with pytest.raises(UsageError, match="--seeds"):
            _parse_seeds(bad)
    # run seeds on --seed's world: seed 0 of table8's LoRA-FT row (above) is reused, nothing else is run
    import grace_plugin.finetune as finetune

    monkeypatch.setattr(finetune, "fine_tune", lambda *a, **k: pytest.fail("trained"))
    out = study_dir / "t8"
    assert main(["study", "table8", "--out", str(out), "--n-adv", "8", "--seeds", "0-0", "--methods",
                 "ablation-lora-ft"] + TINY) == 0
    doc = json.loads((out / "study.json").read_text())
    assert doc["seeds"] == [0] and [r["seed"] for r in doc["rows"]["ablation-lora-ft"]["runs"]] == [0]
    weights = (out / "pretrained" / "open_clip_model.safetensors").read_bytes()
    assert doc["tiny_clip"]["sha256"] == hashlib.sha256(weights).hexdigest()  # the study names its tiny CLIP
    assert doc["tiny_clip"]["pretrain"]["threads"] == 1
    assert main(["study", "table8", "--out", str(out), "--seeds", "2-1"] + TINY) == 2
    assert "runs backwards" in capsys.readouterr().err
    assert main(["study", "table8", "--out", str(out), "--pretrain-threads", "0"] + TINY) == 2
    assert "--pretrain-threads must be at least 1" in capsys.readouterr().err


def test_tune_refuses_to_write_into_the_installed_copy(tmp_path, capsys, monkeypatch):
    """From a wheel (no checkout) the testbed configs are package data: `study tune` must not write tuned.yaml there."""
    import grace_app.testbed.configs as tc

    monkeypatch.delenv("GRACE_TESTBED_CONFIGS", raising=False)
    monkeypatch.setattr(tc, "TESTBED_DIR", tc._PACKAGED)
    assert tc.installed_copy()
    assert main(["study", "tune", "--methods", "ft", "--out", str(tmp_path / "t")] + TINY) == 2
    err = capsys.readouterr().err
    assert "installed package's copy" in err and "--write" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()
    monkeypatch.setattr(tc, "TESTBED_DIR", tc._CHECKOUT)
    assert not tc.installed_copy()


def test_tiny_clip_pretraining_is_pinned_to_its_thread_count(tiny_world, tmp_path):
    """The tiny CLIP, which every testbed number rests on, must not depend on the threads of the process that
    pretrained it: ``PretrainConfig.threads`` pins them (and is in the cache key), and the caller's are restored."""
    import torch

    from grace_app.testbed.tiny_clip import PretrainConfig, _key, pretrain_tiny_clip, tiny_clip_identity

    def weights(ambient: int, threads: int) -> bytes:
        torch.set_num_threads(ambient)
        cfg = PretrainConfig(steps=4, batch_size=256, width=64, layers=2, warmup_steps=1, threads=threads)
        out = pretrain_tiny_clip(tiny_world / "pairs", tmp_path / f"a{ambient}t{threads}", cfg, progress=False)
        assert torch.get_num_threads() == ambient  # restored
        assert tiny_clip_identity(out)["pretrain"]["threads"] == threads
        return (out / "open_clip_model.safetensors").read_bytes()

    before = torch.get_num_threads()
    try:
        one = weights(1, 1)
        assert weights(2, 1) == one  # same pinned count, another ambient one: the same model
        assert weights(2, 2) != one  # what the pin prevents: the thread count changes the model
    finally:
        torch.set_num_threads(before)
    assert _key(tiny_world, PretrainConfig(threads=1)) != _key(tiny_world, PretrainConfig(threads=2))


def test_study_and_tune_refuse_each_others_flags(study_dir, capsys):
    """`grace study tune` is its own command path: a named study's flags are refused there, and the tuner's on a
    named study, in one line naming the flag (exit 2), before any work."""
    assert main(["study", "tune", "--methods", "ft", "--seeds", "3", "--out", str(study_dir / "t")] + TINY) == 2
    assert "--seeds: not a flag of `grace study tune`" in capsys.readouterr().err
    assert main(["study", "table8", "--trials", "3", "--out", str(study_dir / "s")] + TINY) == 2
    assert "--trials: not a flag of `grace study table8`" in capsys.readouterr().err
    assert not (study_dir / "t").exists() and not (study_dir / "s").exists()


def test_the_default_worlds_tiny_clip_ships_sha_checked(tmp_path, monkeypatch):
    """The default world (its world.json) with the default pretraining settings gets the shipped tiny CLIP, sha256
    checked, with no pretraining (the folder holds no pairs, so pretraining would fail); any other setting is
    pretrained; a shipped file whose sha256 is off is refused in one line."""
    from grace_app.testbed import tiny_clip as tc
    from grace_plugin.errors import GraceError

    monkeypatch.setenv("GRACE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tc._ARTIFACTS / "world-v2-seed0.json", data / "world.json")
    key = tc._key(data, tc.PretrainConfig())
    assert key in tc.SHIPPED
    out = tc.tiny_clip(data, tmp_path / "pretrained", progress=False)
    ident = tc.tiny_clip_identity(out)
    assert ident["sha256"] == tc.SHIPPED[key][1] == hashlib.sha256(
        (out / "open_clip_model.safetensors").read_bytes()).hexdigest()
    assert ident["pretrain"]["threads"] == 1 and ident["pretrain"]["steps"] == 1500
    from grace_plugin.data.shards import ShardSetError

    with pytest.raises(ShardSetError, match="pairs"):  # another setting: pretrained, and there are no pairs here
        tc.tiny_clip(data, tmp_path / "other", cfg=tc.PretrainConfig(steps=2), progress=False)
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setitem(tc.SHIPPED, key, (tc.SHIPPED[key][0], "0" * 64))
    with pytest.raises(GraceError, match="the shipped tiny CLIP is missing or its sha256 is not 000000000000"):
        tc.tiny_clip(data, tmp_path / "again", progress=False)


@pytest.mark.slow
def test_the_default_world_is_the_one_the_shipped_tiny_clip_was_pretrained_on(tmp_path):
    """The default world written here has the world.json the shipped tiny CLIP is keyed by (byte for byte)."""
    from grace_app.testbed import tiny_clip as tc
    from grace_app.testbed.world import write_synthetic_world

    write_synthetic_world(tmp_path / "w", seed=0)
    assert (tmp_path / "w" / "world.json").read_bytes() == (tc._ARTIFACTS / "world-v2-seed0.json").read_bytes()
