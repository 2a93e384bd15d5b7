"""N processes give the result of one, for VQA training too: 2 gloo processes, each with half of every batch (its
questions bound to its rows), equal 1 process with the whole batch, for a clean, an adversarial, a proximal and
GRACE's recipe (attack starts and AWP draws come from (seed, step, sample index))."""
import os

import torch

from test_trainer import CFG, DDP_OVER
from test_vqa_recipes import ANSWERS, GT, QUESTIONS

RECIPES = ["ft", "tecoa", "digrap", "grace"]


def _vqa_batches(n=3):
    from grace_plugin.vqa.data import VqaTarget

    target, g = VqaTarget(ANSWERS, train=True), torch.Generator().manual_seed(0)
    fields = [target({"json": {"question_id": i, "question": q, "answers": a}})
              for i, (q, a) in enumerate(zip(QUESTIONS, GT))]
    label = torch.stack([f["label"] for f in fields])
    return [{"image": torch.rand(8, 3, 32, 32, generator=g), "label": label, "question": list(QUESTIONS),
             "skipped": {}} for _ in range(n)]


def _runs(clip_dir, rank, world, out):
    from grace_plugin.finetune import build_config
    from grace_plugin.models.clip import load_clip
    from grace_plugin.recipes import create_recipe
    from grace_plugin.tasks import get_task
    from grace_plugin.trainer import train
    from grace_plugin.config import TrainConfig
    from grace_plugin.vqa.model import QuestionEncoder, vqa_model_from_clip

    b = 8 // world
    data = [{k: v[rank * b:(rank + 1) * b] if k != "skipped" else v for k, v in x.items()} for x in _vqa_batches()]
    states = {}
    for name in RECIPES:
        bundle = load_clip(clip_dir)
        model = vqa_model_from_clip(bundle, ANSWERS, seed=0)
        torch.manual_seed(0)
        rec = create_recipe(name, model, build_config(name, overrides={"recipe": DDP_OVER.get(name, {})}).recipe)
        lr = 1e-3 if name == "digrap" else 0.05
        train(rec, data, TrainConfig(**{**CFG, "opt": "sgd", "lr": lr, "grad_clip": None}), 3,
              os.path.join(out, name), progress=False, bind=get_task("vqa").binder(model, QuestionEncoder(bundle)))
        states[name] = {k: v.detach().clone() for k, v in rec.model.state_dict().items()}
    return states


def _worker(rank, world, port, out, clip_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    states = _runs(clip_dir, rank, world, os.path.join(out, f"r{rank}"))
    if rank == 0:
        torch.save(states, os.path.join(out, "ddp.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_vqa_two_processes_equal_one(tiny_clip_dir, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path), str(tiny_clip_dir)), nprocs=2, join=True)
    single = _runs(str(tiny_clip_dir), 0, 1, str(tmp_path / "single"))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    # the float tolerance of tests/test_trainer.py's DDP test (sign-gradient attacks amplify rounding)
    tol = {"ft": 2e-5, "digrap": 2e-5, "tecoa": 2e-4, "grace": 2e-4}
    bad = {n: max(float((ddp[n][k] - v).abs().max()) for k, v in ref.items()) for n, ref in single.items()}
    assert {n: d for n, d in bad.items() if d > tol[n]} == {}, bad
