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
def test_resume_after_kill_is_bit_identical(recipe, tiny_classifier, tmp_path):
    over = {"lora_rank": 4, "pgd_steps": 2, "curvature_interval": 2} if recipe == "grace" else {}
    from grace_plugin.finetune import build_config

    rcfg = build_config(recipe, overrides={"recipe": over}).recipe
    data = _batches(6)
    ref = _recipe(recipe, tiny_classifier, rcfg)
    train(ref, data, TrainConfig(**CFG), 6, tmp_path / "ref", progress=False)

    killed = _recipe(recipe, tiny_classifier, rcfg)
    orig = killed.training_step

    def dying(batch, ctx):
        if ctx.step == 4:
            raise KeyboardInterrupt("simulated kill")
        return orig(batch, ctx)

    killed.training_step = dying
    with pytest.raises(KeyboardInterrupt):
        train(killed, data, TrainConfig(ckpt_every=3, **CFG), 6, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "train_state.pt").is_file()
    resumed = _recipe(recipe, tiny_classifier, rcfg)
    train(resumed, data, TrainConfig(ckpt_every=3, **CFG), 6, tmp_path / "run", progress=False, resume=True)
    a, b = _weights(ref.model), _weights(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_guard_skips_then_stops(tiny_classifier, tmp_path):
    rec = create_recipe("ft", tiny_classifier)
    orig = rec.training_step
    calls = {"n": 0}

    def sometimes_nan(batch, ctx):
        out = orig(batch, ctx)
        calls["n"] += 1
        if calls["n"] in (2,) or calls["n"] >= 4:
            out.loss = out.loss * float("nan")
        return out

    rec.training_step = sometimes_nan
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


def _ddp_worker(rank, world, port, path, tiny_state):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.load(tiny_state, weights_only=False)
    rec = create_recipe("ft", model)
    data = [{"image": b["image"][rank::world], "label": b["label"][rank::world], "skipped": {}} for b in _batches(4)]
    train(rec, data, TrainConfig(**CFG), 4, path, progress=False)
    if rank == 0:
        torch.save(rec.model.state_dict(), os.path.join(path, "ddp.pt"))
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one_process(tiny_classifier, tmp_path):
    import socket

    import torch.multiprocessing as mp

    state = tmp_path / "model.pt"
    torch.save(copy.deepcopy(tiny_classifier), state)  # test-only pickle of our own object
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), str(state)), nprocs=2, join=True)
    single = create_recipe("ft", copy.deepcopy(tiny_classifier))
    train(single, _batches(4), TrainConfig(**CFG), 4, tmp_path / "single", progress=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for k, v in single.model.state_dict().items():
        assert torch.allclose(ddp[k], v, atol=1e-5), k


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
    from grace_plugin.trainer import autocast_factory

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
