"""GPU path (run by bench/gpu_check.sh with CUDA_VISIBLE_DEVICES set; skipped where CUDA is absent): a bf16 step is
finite and close to fp32, CUDA evaluation equals CPU evaluation, a 1-process NCCL group trains."""
import copy
import os
import socket

import pytest
import torch

from grace_plugin.config import TrainConfig
from grace_plugin.recipes import StepContext, create_recipe
from grace_plugin.gradsync import OverlappedGradSync
from grace_plugin.trainer import train
from grace_plugin.runtime import autocast_factory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _grads(rec, batch, ctx):
    for p in rec.trainable_parameters():
        p.grad = None
    out = rec.training_step(batch, ctx)
    out.loss.backward()
    return out.loss.detach().float(), torch.cat([p.grad.float().reshape(-1) for p in rec.trainable_parameters()
                                                 if p.grad is not None])


@pytest.mark.parametrize("recipe", ["ft", "sam"])
def test_bf16_step_is_finite_and_close_to_fp32(recipe, tiny_classifier, tiny_batch):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rec = create_recipe(recipe, copy.deepcopy(tiny_classifier)).to(dev)
    batch = {k: v.to(dev) for k, v in tiny_batch.items() if torch.is_tensor(v)}
    idx = torch.arange(batch["label"].shape[0])
    l32, g32 = _grads(rec, batch, StepContext(dev, autocast_factory(dev, "fp32"), sample_index=idx))
    l16, g16 = _grads(rec, batch, StepContext(dev, autocast_factory(dev, "bf16"), sample_index=idx))
    assert torch.isfinite(l16) and torch.isfinite(g16).all()
    assert abs(float(l16 - l32)) <= 0.05 * abs(float(l32)) + 1e-3
    assert float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)) > 0.98


def test_cuda_eval_equals_cpu_eval(tiny_classifier, tiny_batch):
    model = copy.deepcopy(tiny_classifier).eval()
    x, y = tiny_batch["image"], tiny_batch["label"]
    with torch.no_grad():
        f_cpu = torch.nn.functional.normalize(model.encode(x), dim=-1)
        p_cpu = model(x).argmax(-1)
        model.cuda()
        f_gpu = torch.nn.functional.normalize(model.encode(x.cuda()), dim=-1).cpu()
        p_gpu = model(x.cuda()).argmax(-1).cpu()
    assert torch.allclose(f_cpu, f_gpu, atol=5e-3)  # fp32 both; cuDNN may use TF32 for the patch convolution
    assert (p_cpu == p_gpu).float().mean() >= 0.9
    assert abs(int((p_cpu == y).sum()) - int((p_gpu == y).sum())) <= 1


def test_one_process_nccl_group_trains(tiny_classifier, tiny_batch, tmp_path):
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        rec = create_recipe("ft", copy.deepcopy(tiny_classifier))
        before = {k: v.clone() for k, v in rec.model.state_dict().items()}
        data = [{"image": tiny_batch["image"], "label": tiny_batch["label"]}] * 2
        res = train(rec, data, TrainConfig(device="cuda", lr=1e-3, log_every=1), 2, tmp_path, progress=False)
        assert res.skipped_steps == 0 and res.final_loss is not None
        after = rec.model.state_dict()
        assert any(not torch.equal(before[k].cuda(), after[k]) for k in before)
        # the overlapped all-reduce over NCCL leaves a 1-process gradient unchanged
        params = rec.trainable_parameters()
        batch = {k: v.cuda() for k, v in data[0].items()}
        ctx = StepContext(torch.device("cuda"))
        _, ref = _grads(rec, batch, ctx)
        sync = OverlappedGradSync(params, world=1, bucket_bytes=1 << 16)
        try:
            sync.arm()
            _, got = _grads(rec, batch, ctx)
            sync.finish()
            got = torch.cat([p.grad.float().reshape(-1) for p in params if p.grad is not None])
        finally:
            sync.close()
        assert torch.allclose(got, ref) and len(sync.buckets) > 1
    finally:
        dist.destroy_process_group()
        os.environ.pop("MASTER_PORT", None)
