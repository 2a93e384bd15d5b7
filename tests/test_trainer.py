"""Trainer: resume to identical weights, 2-process DDP == 1 process with the same global batch, NaN guard, EMA."""
import copy
import os

import pytest
import torch

from grace_plugin.config import TrainConfig
from grace_plugin.recipes import create_recipe
from grace_plugin.trainer import TrainingDiverged, train


def _batches(n=8, bs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(bs, 3, 32, 32, generator=g), "label": torch.randint(0, 10, (bs,), generator=g),
             "skipped": {}} for _ in range(n)]


def _recipe(name, model, cfg=None):
    torch.manual_seed(0)  # adapter initialisation draws from the RNG
    return create_recipe(name, copy.deepcopy(model), copy.deepcopy(cfg))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


CFG = dict(lr=1e-3, warmup_steps=2, log_every=1, seed=0, device="cpu")


@pytest.mark.parametrize("recipe", ["ft", "grace"])
def test_resume_after_kill_is_bit_identical(recipe, tiny_classifier, tmp_path, die_at_step):
    over = {"lora_rank": 4, "pgd_steps": 2, "curvature_interval": 2} if recipe == "grace" else {}
    from grace_plugin.finetune import build_config

    rcfg = build_config(recipe, overrides={"recipe": over}).recipe
    data = _batches(6)
    ref = _recipe(recipe, tiny_classifier, rcfg)
    train(ref, data, TrainConfig(**CFG), 6, tmp_path / "ref", progress=False)

    killed = _recipe(recipe, tiny_classifier, rcfg)
    die_at_step(killed, 4)
    with pytest.raises(KeyboardInterrupt):
        train(killed, data, TrainConfig(ckpt_every=3, **CFG), 6, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "train_state.pt").is_file()
    resumed = _recipe(recipe, tiny_classifier, rcfg)
    train(resumed, data, TrainConfig(ckpt_every=3, **CFG), 6, tmp_path / "run", progress=False, resume=True)
    a, b = _weights(ref.model), _weights(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _patch_step(rec, change) -> dict:
    """``rec.training_step`` calls ``change(out, n)`` on the n-th step's output (1-based); returns the call count."""
    orig, calls = rec.training_step, {"n": 0}

    def step(batch, ctx):
        out = orig(batch, ctx)
        calls["n"] += 1
        change(out, calls["n"])
        return out

    rec.training_step = step
    return calls


def test_nan_guard_skips_then_stops(tiny_classifier, tmp_path):
    rec = create_recipe("ft", tiny_classifier)

    def sometimes_nan(out, n):
        if n in (2,) or n >= 4:
            out.loss = out.loss * float("nan")

    _patch_step(rec, sometimes_nan)
    before = _weights(rec.model)
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite"):
        train(rec, _batches(8), TrainConfig(max_bad_steps=3, ckpt_every=1, **CFG), 8, tmp_path, progress=False)
    assert all(torch.isfinite(v).all() for v in rec.model.state_dict().values() if v.is_floating_point())
    assert not torch.equal(before["visual.head.weight"], rec.model.state_dict()["visual.head.weight"])


def test_ema_weights_are_exported(tiny_classifier, tmp_path):
    from timm.utils import ModelEmaV3

    data = _batches(3)
    rec = create_recipe("ft", copy.deepcopy(tiny_classifier))
    twin = create_recipe("ft", copy.deepcopy(tiny_classifier))
    ema = ModelEmaV3(twin.model, decay=0.5)
    train(rec, data, TrainConfig(ema_decay=0.5, **CFG), 3, tmp_path / "a", progress=False)
    # independent: the same run without EMA, averaging by hand with timm's update rule
    opt_run = create_recipe("ft", copy.deepcopy(tiny_classifier))
    orig_after = opt_run.after_step

    def record(batch, ctx):
        ema.update(opt_run.model, step=ctx.step)
        return orig_after(batch, ctx)

    opt_run.after_step = record
    train(opt_run, data, TrainConfig(**CFG), 3, tmp_path / "b", progress=False)
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(rec.model.state_dict()[k], v, atol=1e-6), k


# recipe overrides that keep every recipe cheap and exercise its randomness (grace: AWP from step 0, curvature)
DDP_OVER = {"grace": {"lora_rank": 4, "pgd_steps": 2, "curvature_interval": 2, "rank_levels": [2, 2, 2]},
            "grace_fast": {"lora_rank": 4, "curvature_interval": 2, "rank_levels": [2, 2, 2]},
            "tecoa": {"pgd_steps": 2}, "fare": {"pgd_steps": 2}, "pmg_aft": {"pgd_steps": 2}}


def _ddp_runs(clip_dir, world_dir, rank, world, out, sync=None):
    """Every recipe for 3 steps on the contiguous slice ``rank`` of each 8-sample batch; returns state dicts."""
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.finetune import build_config
    from grace_plugin.models.clip import classifier_from_clip, load_clip
    from grace_plugin.recipes import TextSide, list_recipes

    shards = open_shard_set(world_dir, split="train")
    b = 8 // world
    data = [{"image": x["image"][rank * b:(rank + 1) * b], "label": x["label"][rank * b:(rank + 1) * b]}
            for x in _batches(3)]
    states = {}
    for name in list_recipes():
        bundle = load_clip(clip_dir)
        model = classifier_from_clip(bundle, shards.classnames, shards.templates)
        torch.manual_seed(0)  # adapter initialisation: the same on every rank
        rcfg = build_config(name, overrides={"recipe": DDP_OVER.get(name, {})}).recipe
        rec = create_recipe(name, model, rcfg, text=TextSide(bundle, shards.classnames, list(shards.templates)))
        if sync is not None:
            rec.grad_sync = sync  # the instance overrides its class's declaration
        # SGD, no clipping: the update is linear in the gradient, so a wrongly scaled or partial gradient shows
        # (Adam would normalise a scale error away). ftp/spd/digrap bring their own Adam variants: at a small lr,
        # since Adam turns float noise in near-zero gradients into steps of about lr
        lr = 1e-3 if name in ("ftp", "spd", "digrap") else 0.05
        train(rec, data, TrainConfig(**{**CFG, "opt": "sgd", "lr": lr, "grad_clip": None}), 3,
              os.path.join(out, name), progress=False)
        states[name] = {k: v.detach().clone() for k, v in rec.model.state_dict().items()}
        if hasattr(rec, "clip"):  # flyp trains the text tower outside rec.model
            states[name].update({f"clip.{k}": v.detach().clone() for k, v in rec.clip.state_dict().items()})
    return states


def _ddp_worker(rank, world, port, out, clip_dir, world_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    overlap = _ddp_runs(clip_dir, world_dir, rank, world, os.path.join(out, f"r{rank}"))
    oneshot = _ddp_runs(clip_dir, world_dir, rank, world, os.path.join(out, f"o{rank}"), sync="oneshot")
    if rank == 0:
        torch.save({"overlap": overlap, "oneshot": oneshot}, os.path.join(out, "ddp.pt"))
    # both ranks reach the teardown before either closes its gloo pairs: a rank that exits while the other still
    # holds open connections can make gloo abort the survivor (SIGABRT, seen once in 5 fresh-clone runs)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process_every_recipe(tiny_clip_dir, tiny_world, tmp_path):
    """2 gloo processes with half of each batch == 1 process with the whole batch, for every recipe (attack random
    starts, AWP initialisations and FLYP's template draws come from (seed, step, sample index)), with gradients
    averaged during backward (overlap) and after it (oneshot)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), str(tiny_clip_dir), str(tiny_world / "id")), nprocs=2,
             join=True)
    single = _ddp_runs(str(tiny_clip_dir), str(tiny_world / "id"), 0, 1, str(tmp_path / "single"))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    from grace_plugin.recipes import get_recipe_class
    from grace_plugin.recipes.adversarial import AdvConfig

    # Float tolerance. The two runs sum gradients in different orders (all-reduce vs one batch) and run the tower's
    # matmuls at batch 4 vs 8, whose CPU kernels round differently (~1e-7). A sign-gradient attack (PGD, FARE's
    # embedding PGD) amplifies that: where a pixel's input gradient is ~0 the sign may differ, moving the pixel by
    # alpha, which after 3 SGD steps at lr 0.05 moves a weight by up to ~1e-4. A real fault (a gradient scaled by
    # the world size, a rank-dependent random start) moves weights by 1e-3 or more.
    def tol(name):
        return 2e-4 if issubclass(get_recipe_class(name).Config, AdvConfig) else 2e-5

    bad = {(mode, name): max(float((ddp[mode][name][k] - v).abs().max()) for k, v in ref.items())
           for mode in ("overlap", "oneshot") for name, ref in single.items()}
    assert {k: d for k, d in bad.items() if d > tol(k[1])} == {}


def test_grad_accum_equals_one_batch_of_the_concatenation(tiny_classifier, tmp_path):
    """grad_accum=2 over two micro-batches of 8 makes the same optimizer step as one batch of 16 (the mean CE of two
    equal halves is the mean over the whole), and not the step of the first micro-batch alone."""
    a, b = _batches(2)
    both = {"image": torch.cat([a["image"], b["image"]]), "label": torch.cat([a["label"], b["label"]]), "skipped": {}}
    # SGD without clipping: the step is linear in the gradient (Adam's first step is about lr * sign(g), and clipping
    # to a norm, which would both hide a wrong gradient scale)
    cfg = dict(CFG, warmup_steps=0, opt="sgd", lr=0.1, grad_clip=None)
    accum = _recipe("ft", tiny_classifier)
    train(accum, [a, b], TrainConfig(grad_accum=2, **cfg), 1, tmp_path / "accum", progress=False)
    whole = _recipe("ft", tiny_classifier)
    train(whole, [both], TrainConfig(**cfg), 1, tmp_path / "whole", progress=False)
    first = _recipe("ft", tiny_classifier)
    train(first, [a], TrainConfig(**cfg), 1, tmp_path / "first", progress=False)
    wa, ww, wf = _weights(accum.model), _weights(whole.model), _weights(first.model)
    assert all(torch.allclose(wa[k], ww[k], atol=1e-6) for k in wa)
    assert any(not torch.allclose(wa[k], wf[k], atol=1e-6) for k in wa)


def test_bf16_autocast_on_cpu(tiny_classifier, tmp_path):
    """precision=bf16 on CPU: the tower's matmuls run in bfloat16 (seen by a forward hook), the loss stays within
    bf16 rounding of the fp32 loss, and the weights (kept in fp32) differ from the fp32 run's."""
    from grace_plugin.runtime import autocast_factory

    with autocast_factory(torch.device("cpu"), "bf16")():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    data = _batches(2)
    dtypes = []
    runs = {}
    for precision in ("bf16", "fp32"):
        rec = _recipe("ft", tiny_classifier)
        handle = rec.model.visual.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
        res = train(rec, data, TrainConfig(precision=precision, **CFG), 2, tmp_path / precision, progress=False)
        handle.remove()
        runs[precision] = (res.final_loss, _weights(rec.model))
    assert dtypes[0] == torch.bfloat16 and dtypes[-1] == torch.float32
    (loss16, w16), (loss32, w32) = runs["bf16"], runs["fp32"]
    assert loss16 == pytest.approx(loss32, rel=5e-2)
    assert all(v.dtype == w32[k].dtype for k, v in w16.items())
    assert any(not torch.equal(w16[k], w32[k]) for k in w16)


def test_progress_in_a_log_file_is_a_few_lines(tiny_classifier, tiny_batch, tmp_path, capsys, monkeypatch):
    """Not on a terminal (a batch job's log), 300 training steps write a line per tenth and a last one, each with
    the rate, the ETA and the loss, instead of a redrawn bar."""
    monkeypatch.delenv("GRACE_PROGRESS", raising=False)
    rec = create_recipe("ft", tiny_classifier)
    data = [{"image": tiny_batch["image"][:2], "label": tiny_batch["label"][:2]}]
    train(rec, data * 300, TrainConfig(**{**CFG, "log_every": 100}), 300, tmp_path, progress=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("train ft:")]
    assert "\r" not in err and 10 <= len(lines) <= 12, err
    assert lines[-1].startswith("train ft: 300/300 steps (100%)") and "step/s" in lines[-1] and "loss=" in lines[-1]
    assert "ETA" in lines[0]


def test_log_progress_lines_by_tenth_and_by_time():
    import io

    from grace_plugin.progress import LogProgress

    out = io.StringIO()
    bar = LogProgress(total=1000, desc="x", unit="img", stream=out)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 10  # 10%, 20%, ..., 100%; close adds nothing new
    out = io.StringIO()
    bar = LogProgress(total=None, desc="y", unit="batch", interval=0.0, stream=out)  # unknown total: by time
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines() == [ln for ln in out.getvalue().splitlines() if ln.startswith("y: ")]
    assert len(out.getvalue().splitlines()) == 3


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped(tiny_classifier, tmp_path):
    """0 * sqrt(0): a finite loss whose gradient is NaN (what a zero-weighted term with an unbounded derivative
    gives). The step is skipped and counted, the weights stay finite, and the run finishes."""
    rec = create_recipe("ft", tiny_classifier)

    def nan_gradient(out, n):
        if n == 2:
            w = rec.model.visual.head.weight
            out.loss = out.loss + 0.0 * (w.sum() - w.sum()).abs().sqrt()  # value finite, d/dw = 0 * inf = NaN

    calls = _patch_step(rec, nan_gradient)
    res = train(rec, _batches(4), TrainConfig(max_bad_steps=3, **CFG), 4, tmp_path, progress=False)
    assert res.skipped_steps == 1 and calls["n"] == 4
    assert all(torch.isfinite(v).all() for v in rec.model.state_dict().values() if v.is_floating_point())
