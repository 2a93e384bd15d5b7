"""Training at scale: resume by seeking (not replaying) the stream, validation checks, selection and the
catastrophic-overfitting guard, resume config checks and run-folder hygiene after a kill."""
import contextlib
import copy
import json
import os

import pytest
import torch

from grace_plugin.config import ConfigError, TrainConfig, resume_differences
from grace_plugin.recipes import create_recipe
from grace_plugin.trainer import train
from grace_plugin.robust_validation import co_guard_tripped, harmonic_mean, select_check

CFG = dict(lr=1e-3, warmup_steps=2, log_every=1, seed=0, device="cpu")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ resume seeks the stream
from grace_plugin.data.loader import decode_sample as _ORIG_DECODE  # noqa: E402


def _counting_loader(monkeypatch, log_path, urls, workers, bs=8):
    """A real training loader whose decoder appends each decoded sample's key to ``log_path`` (works in workers)."""
    import grace_plugin.data.loader as L
    from grace_plugin.data.transforms import train_transform

    orig = _ORIG_DECODE

    def counted(sample, *a, **k):
        with open(log_path, "a") as f:
            f.write(f"{sample['__url__']}#{sample['__key__']}\n")
        return orig(sample, *a, **k)

    monkeypatch.setattr(L, "decode_sample", counted)
    tf = train_transform({"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0,
                          "mean": (0, 0, 0), "std": (1, 1, 1)}, "rrc")  # random augmentation on purpose
    return L.make_train_loader(urls, tf, bs, num_classes=10, seed=3, shuffle_buffer=60, num_workers=workers,
                               decode="tensor")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_seeks_stream_bit_identical(workers, tiny_classifier, tiny_world, tmp_path, monkeypatch, die_at_step):
    """Killed at step 5 (checkpoint at 4), resumed: weights bit-identical to the uninterrupted run, with workers,
    gradient accumulation and random augmentation; the resumed run decodes only the samples after the checkpoint."""
    from grace_plugin.data.shards import open_shard_set

    urls = open_shard_set(tiny_world / "id", split="train").urls
    cfg = TrainConfig(grad_accum=2, ckpt_every=4, num_workers=workers, **CFG)
    steps, bs = 7, 8

    def run(out, log, kill=None, resume=False):
        torch.manual_seed(0)
        rec = create_recipe("ft", copy.deepcopy(tiny_classifier))
        if kill is not None:
            die_at_step(rec, kill)
        loader = _counting_loader(monkeypatch, log, urls, workers, bs)
        train(rec, loader, cfg, steps, out, progress=False, resume=resume)
        return rec

    ref = run(tmp_path / "ref", tmp_path / "ref.log")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", tmp_path / "killed.log", kill=5)
    (tmp_path / "run" / ".train_state.pt.abc123.tmp").write_bytes(b"")  # what a kill inside atomic_path leaves
    resumed = run(tmp_path / "run", tmp_path / "resumed.log", resume=True)
    assert _same(_weights(ref.model), _weights(resumed.model))
    if workers == 0:  # no prefetch: the decode log is exactly the consumed stream
        ref_keys = (tmp_path / "ref.log").read_text().splitlines()
        got = (tmp_path / "resumed.log").read_text().splitlines()
        per_step = 2 * bs  # tiny_world has no corrupt sample: one decode per batch slot
        assert len(ref_keys) == steps * per_step
        assert got == ref_keys[4 * per_step:]  # the checkpoint was at step 4: nothing before it is decoded
    # run-folder hygiene after the kill (issue 12 item 11)
    assert not list((tmp_path / "run").glob(".train_state.pt.*.tmp"))
    recs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(steps))


def test_replay_fallback_for_unseekable_loaders(tiny_classifier, tmp_path):
    """A plain iterable still resumes (by re-reading), to the same weights."""
    from grace_plugin.data.source import batch_source

    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(4, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (4,), generator=g)}
            for _ in range(5)]

    class Plain:
        def __iter__(self):
            return iter(data)

    it, how = batch_source(Plain(), consumed=7)
    assert how == "replay" and torch.equal(next(it)["image"], data[7 % 5]["image"])
    it, how = batch_source(data, consumed=7)
    assert how == "seek" and torch.equal(next(it)["image"], data[2]["image"])


# -------------------------------------------------------------------------------- selection and the guard
CURVE = [  # a synthetic validation curve: robust peaks at 19, the harmonic mean at 29, then robust collapses at 39
    # while clean keeps rising (catastrophic overfitting), and at 49 both fall
    {"step": 9, "val_clean": 60.0, "val_robust": 20.0},
    {"step": 19, "val_clean": 65.0, "val_robust": 30.0},
    {"step": 29, "val_clean": 80.0, "val_robust": 28.0},
    {"step": 39, "val_clean": 85.0, "val_robust": 5.0},
    {"step": 49, "val_clean": 70.0, "val_robust": 1.0},
]


def test_selection_rules_on_a_synthetic_curve():
    assert select_check(CURVE, "last")["step"] == 49
    assert select_check(CURVE, "best_robust")["step"] == 19
    hm = [harmonic_mean(c["val_clean"], c["val_robust"]) for c in CURVE]
    assert hm[1] == pytest.approx(2 * 65 * 30 / 95)
    assert select_check(CURVE, "best_hm")["step"] == CURVE[max(range(5), key=hm.__getitem__)]["step"] == 29
    assert select_check(CURVE[:1] + [dict(CURVE[0], step=99)], "best_robust")["step"] == 9  # ties: earlier
    assert select_check([], "best_hm") is None
    with pytest.raises(ValueError, match="best_robust"):
        select_check(CURVE, "best")


def test_co_guard_on_a_synthetic_curve():
    trips = [co_guard_tripped(CURVE[:i + 1], 20.0) for i in range(len(CURVE))]
    assert trips == [False, False, False, True, False]  # step 49: robust falls but clean falls too
    assert not co_guard_tripped(CURVE[:4], 23.0)  # a 23-point fall is not more than a 23-point guard
    assert not co_guard_tripped(CURVE, None)


class _Scripted:
    """A validator replaying a curve and recording the weights it saw (to check what is exported)."""

    def __init__(self, curve):
        self.curve, self.seen = list(curve), {}

    def __call__(self, model, device, autocast, rank=0, world=1):
        c = self.curve[len(self.seen)]
        self.seen[c["step"]] = _weights(model)
        return {"val_clean": c["val_clean"], "val_robust": c["val_robust"], "val_seconds": 0.0}


def _batches(n=8, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(bs, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (bs,), generator=g)}
            for _ in range(n)]


def test_guard_stops_a_real_run_and_exports_the_best_robust_weights(tiny_classifier, tmp_path):
    curve = [dict(c, step=i * 2 + 1) for i, c in enumerate(CURVE)]  # checks after steps 1, 3, 5, 7, 9
    val = _Scripted(curve)
    rec = create_recipe("ft", copy.deepcopy(tiny_classifier))
    res = train(rec, _batches(), TrainConfig(val_every=2, co_guard=20.0, **CFG), 10, tmp_path, progress=False,
                validator=val)
    assert res.stopped and "catastrophic overfitting at step 7" in res.stopped and "\n" not in res.stopped
    assert res.steps == 8 and sorted(val.seen) == [1, 3, 5, 7]  # stopped at the tripping check
    assert res.selection == {"rule": "best_robust", "step": 3, "val_clean": 65.0, "val_robust": 30.0, "checks": 4}
    assert not _same(_weights(rec.model), val.seen[7])
    assert _same(_weights(rec.model), val.seen[3])
    recs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    vals = [r for r in recs if "val_robust" in r]
    assert [r["step"] for r in vals] == [1, 3, 5, 7] and all(0 <= r["val_share"] <= 1 for r in vals)


def test_selection_survives_resume(tiny_classifier, tmp_path, die_at_step):
    curve = [dict(c, step=i * 2 + 1) for i, c in enumerate(CURVE)]
    cfg = TrainConfig(val_every=2, select="best_hm", ckpt_every=4, **CFG)
    ref = create_recipe("ft", copy.deepcopy(tiny_classifier))
    ref_val = _Scripted(curve)
    r0 = train(ref, _batches(), cfg, 10, tmp_path / "ref", progress=False, validator=ref_val)
    killed = create_recipe("ft", copy.deepcopy(tiny_classifier))
    die_at_step(killed, 6)
    with pytest.raises(KeyboardInterrupt):
        train(killed, _batches(), cfg, 10, tmp_path / "run", progress=False, validator=_Scripted(curve))
    val = _Scripted(curve[2:])  # checks 1 and 3 happened before the checkpoint at step 4
    resumed = create_recipe("ft", copy.deepcopy(tiny_classifier))
    r1 = train(resumed, _batches(), cfg, 10, tmp_path / "run", progress=False, resume=True, validator=val)
    assert r0.selection == r1.selection and r1.selection["step"] == 5
    assert _same(_weights(ref.model), _weights(resumed.model))


def test_real_validation_selects_and_records(tiny_clip_dir, tiny_world, tmp_path):
    """A tiny real run with PGD validation: checkpoint.json names the best check of log.jsonl, and the exported
    weights score exactly that check's clean accuracy on the same images."""
    from grace_plugin.checkpoint import load_run
    from grace_plugin.finetune import build_config, build_validator, fine_tune

    cfg = build_config("tecoa", overrides=["train.val_every=2", "train.val_n=24", "train.select=best_robust",
                                           "train.batch_size=16", "train.lr=3e-3", "train.device=cpu",
                                           "train.log_every=1", "recipe.pgd_steps=1", "train.val_attack=pgd2"],
                       steps=6)
    seen = []  # what a tuner's pruner sees (fine_tune's on_check): steps trained and each check's numbers
    out = fine_tune("tecoa", tiny_clip_dir, tiny_world / "id", tmp_path / "run", cfg, progress=False,
                    on_check=lambda step, check: seen.append((step, check["val_robust"])))
    meta = json.loads((out / "checkpoint.json").read_text())
    checks = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    checks = [c for c in checks if "val_robust" in c]
    assert [c["step"] for c in checks] == [1, 3, 5]
    assert [s for s, _ in seen] == [2, 4, 6]
    assert [v for _, v in seen] == pytest.approx([c["val_robust"] for c in checks], abs=1e-3)
    with pytest.raises(ValueError, match="resumed run"):  # its checks would be numbered from step 0
        fine_tune("tecoa", tiny_clip_dir, tiny_world / "id", tmp_path / "run", cfg, progress=False, resume=True,
                  on_check=lambda step, check: None)
    best = select_check(checks, "best_robust")
    sel = meta["selection"]
    assert sel["rule"] == "best_robust" and sel["step"] == best["step"] and sel["val_robust"] == best["val_robust"]
    model, _ = load_run(out)
    val = build_validator(tiny_world / "id", cfg, model.pretrained_cfg, 10)
    with torch.no_grad():
        acc = 100.0 * float((model(val.images).argmax(-1) == val.labels).float().mean())
    assert acc == pytest.approx(sel["val_clean"], abs=1e-3)  # log values are rounded to 4 decimals


def test_validation_scores_a_train_slice(tiny_clip_dir, tiny_world, tmp_path):
    """train.val_train_n: each check also scores the first images of the training split; the logged train numbers
    equal a Validator built on those images by hand, and the held-out ones are unchanged in name and meaning."""
    from grace_plugin.checkpoint import load_run
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.finetune import _first_images, build_config, build_validator, fine_tune
    from grace_plugin.robust_validation import Validator, ValidatorSet

    cfg = build_config("tecoa", overrides=["train.val_every=3", "train.val_n=16", "train.val_train_n=20",
                                           "train.batch_size=16", "train.device=cpu", "recipe.pgd_steps=1",
                                           "train.val_attack=pgd2", "train.keep_state=false"], steps=3)
    out = fine_tune("tecoa", tiny_clip_dir, tiny_world / "id", tmp_path / "run", cfg, progress=False)
    check = [c for c in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train_robust" in c][-1]
    assert {"val_clean", "val_robust", "train_clean", "train_robust"} <= set(check)
    model, _ = load_run(out)
    vs = build_validator(tiny_world / "id", cfg, model.pretrained_cfg, 10)
    assert isinstance(vs, ValidatorSet) and len(vs) == 16 and len(vs.validators["train"]) == 20
    x, y = _first_images(tiny_world / "id", "data.train_split", "train", 20, cfg, model.pretrained_cfg, 10)
    assert torch.equal(vs.validators["train"].images, x)
    assert len(open_shard_set(tiny_world / "id", split="train").urls) >= 1
    res = Validator(x, y, 4 / 255, 2, batch_size=16)(model, torch.device("cpu"), contextlib.nullcontext)
    assert check["train_clean"] == pytest.approx(res["val_clean"], abs=1e-3)
    assert check["train_robust"] == pytest.approx(res["val_robust"], abs=1e-3)


# --------------------------------------------------------------------------- resume refuses a changed config
def test_resume_differences_name_fields():
    saved = {"recipe_name": "ft", "train": {"lr": 1e-4, "steps": 10, "batch_size": 64}, "recipe": {"rho": 0.05}}
    new = {"recipe_name": "sam", "train": {"lr": 3e-4, "steps": 20, "batch_size": 64}, "recipe": {"rho": 0.05}}
    assert resume_differences(saved, new) == ["recipe_name ('ft' -> 'sam')", "train.lr (0.0001 -> 0.0003)"]
    assert resume_differences(saved, {**saved, "train": {**saved["train"], "steps": 99}}) == []


def test_resume_with_changed_config_is_refused(tmp_path):
    import yaml

    from grace_plugin.config import to_dict
    from grace_plugin.finetune import build_config, check_resume

    cfg = build_config("ft", overrides=["train.lr=1e-4"], steps=10)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"recipe_name": "ft", **to_dict(cfg)}))
    (tmp_path / "train_state.pt").write_bytes(b"x")
    check_resume(tmp_path, "ft", to_dict(build_config("ft", overrides=["train.lr=1e-4"], steps=50)))  # steps: ok
    with pytest.raises(ConfigError, match=r"train\.lr \(0\.0001 -> 0\.0003\); train\.seed") as e:
        check_resume(tmp_path, "ft", to_dict(build_config("ft", overrides=["train.lr=3e-4", "train.seed=1"])))
    assert "\n" not in str(e.value) and "train.steps" in str(e.value)


@pytest.mark.parametrize("over,field", [
    (["train.val_every=-1"], "train.val_every"), (["train.select=best"], "train.select"),
    (["train.select=best_hm"], "train.val_every"), (["train.val_attack=apgd"], "train.val_attack"),
    (["train.val_n=0"], "train.val_n"), (["train.co_guard=5"], "train.co_guard"),
])
def test_scale_fields_are_checked(over, field):
    from grace_plugin.finetune import build_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("ft", overrides=over)


def test_log_truncation_keeps_earlier_records(tmp_path):
    from grace_plugin.trainer import _clean_run_folder

    lines = [{"step": s} for s in range(6)] + [{"step": 3, "val_robust": 1.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')
    _clean_run_folder(tmp_path, 4)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 3]
    assert os.path.getsize(tmp_path / "log.jsonl") > 0
