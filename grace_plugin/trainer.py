"""The training loop. It knows no GRACE maths: recipes compute the loss, the trainer does everything else.

Device and precision are decided once here (bf16 autocast on CUDA, fp32 on CPU) and passed to the recipe as an
autocast factory. Optimizer and schedule come from timm's factories. Non-finite losses are skipped and counted;
too many in a row stop the run with a clear message and no NaN checkpoint is ever written. The loop state
(optimizer, scheduler, recipe state, RNG states, data position) is checkpointed atomically and ``resume`` continues
a killed run to identical weights on CPU.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .checkpoint import atomic_path, torch_load_tensors
from .config import TrainConfig
from .errors import GraceError, UsageError
from .recipes.base import Recipe, StepContext

__all__ = ["train", "TrainingDiverged", "resolve_device", "autocast_factory", "TrainResult", "init_distributed",
           "world_info"]

log = logging.getLogger(__name__)


class TrainingDiverged(GraceError, RuntimeError):
    """Too many non-finite steps in a row; the message names the step and the last finite loss."""


@dataclass
class TrainResult:
    steps: int
    skipped_steps: int
    final_loss: float | None
    seconds: float
    data_skipped: dict


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (env WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = torch.distributed
    if world > 1 and not d.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        d.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world_info()


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return torch.device(name)


def _all_reduce_grads(params, world: int) -> None:
    """Average gradients over ranks. Recipes run several forwards per step (attacks, AWP ascent), which DDP's
    one-forward-one-backward reducer does not model; an explicit all-reduce keeps recipes unaware of DDP."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def _all_finite(flag: bool, world: int, device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item() > 0)


def autocast_factory(device: torch.device, precision: str = "auto"):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    raise UsageError(f"train.precision: unknown precision {precision!r}; valid: auto, bf16, fp32")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # numpy's state holds an ndarray, which torch.load(weights_only=True) refuses: store its parts as tensors.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    np_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                "has_gauss": int(has_gauss), "cached": float(cached)}
    st = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _cycle(loader: Iterable) -> Iterator[dict]:
    """Endless batches; passes are numbered and the loader's dataset re-seeded per pass when it supports it."""
    epoch = 0
    while True:
        got = False
        ds = getattr(loader, "dataset", None)
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise RuntimeError("training stream produced no batches (are the shards empty or all corrupt?)")


def train(recipe: Recipe, loader: Iterable[dict], cfg: TrainConfig, total_steps: int, out_dir: str | Path,
          progress: bool = True, resume: bool = False) -> TrainResult:
    """Run ``total_steps`` optimizer steps of ``recipe`` on batches from ``loader``; logs to ``out_dir/log.jsonl``."""
    from timm.scheduler import create_scheduler_v2

    out = Path(out_dir)
    rank, world = world_info()
    main_proc = rank == 0
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    autocast = autocast_factory(device, cfg.precision)
    seed_everything(cfg.seed)
    recipe.to(device)
    recipe.model.train()
    params = recipe.trainable_parameters()
    if not params:
        raise ValueError(f"recipe {recipe.name!r} has no trainable parameters")
    optimizer = recipe.create_optimizer(params, cfg)  # timm's factory by default (recipes/base.py)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=max(total_steps, 1),
                                       warmup_epochs=cfg.warmup_steps, warmup_lr=cfg.lr * 1e-3 if cfg.warmup_steps
                                       else cfg.lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=1)
    state_file = out / "train_state.pt"
    start, bad_total, data_skipped = 0, 0, {}
    if resume and state_file.is_file():
        st = torch_load_tensors(state_file, device, what="resumable state")  # a pickle with code: one line
        trainable = dict((n, p) for n, p in recipe.model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for n, t in st["trainable"].items():
                trainable[n].copy_(t)
        optimizer.load_state_dict(st["optimizer"])
        recipe.load_state_dict(st["recipe"])
        start, bad_total, data_skipped = st["step"], st["skipped_steps"], dict(st.get("data_skipped", {}))
        log.info("resumed %s at step %d", out, start)
    stream = _cycle(loader)
    for _ in range(start * cfg.grad_accum):  # deterministic stream: skip what the killed run consumed
        next(stream)
    if start:
        _set_rng_state(st["rng"])  # after the skip, which may draw from the global RNG (augmentations)
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(recipe.model, decay=cfg.ema_decay)
        if resume and state_file.is_file() and "ema" in st:
            ema.module.load_state_dict(st["ema"])
    tb = None
    if cfg.tensorboard and main_proc:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    log_file = open(out / "log.jsonl", "a" if start else "w") if main_proc else None
    bar = None
    if progress and main_proc:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"train {recipe.name}", unit="step", dynamic_ncols=True)
    t0, bad_run, last_loss = time.time(), 0, None
    try:
        for step in range(start, total_steps):
            scheduler.step_update(step)
            ctx = StepContext(device=device, autocast=autocast, step=step, total_steps=total_steps)
            optimizer.zero_grad(set_to_none=True)
            logs: dict = {}
            finite = True
            batch = None
            for _ in range(cfg.grad_accum):
                batch = next(stream)
                for k, v in batch.get("skipped", {}).items():
                    data_skipped[k] = data_skipped.get(k, 0) + v
                out_step = recipe.training_step(batch, ctx)
                if not torch.isfinite(out_step.loss):
                    finite = False
                    break
                (out_step.loss / cfg.grad_accum).backward()
                logs = out_step.logs
            finite = _all_finite(finite, world, device)
            if not finite:
                bad_total += 1
                bad_run += 1
                optimizer.zero_grad(set_to_none=True)
                log.warning("step %d: non-finite loss; step skipped (%d in a row)", step, bad_run)
                if bad_run >= cfg.max_bad_steps:
                    raise TrainingDiverged(f"{bad_run} consecutive non-finite losses at step {step}; stopping "
                                           "(no checkpoint written for the diverged state). Lower train.lr or check "
                                           "the data.")
                continue
            bad_run = 0
            if world > 1:
                _all_reduce_grads(params, world)
            if cfg.grad_clip:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                logs["grad_norm"] = float(gnorm)
            optimizer.step()
            if ema is not None:
                ema.update(recipe.model, step=step)
            logs.update(recipe.after_step(batch, ctx))
            last_loss = logs.get("loss")
            if main_proc and (step % cfg.log_every == 0 or step == total_steps - 1):
                rec = {"step": step, "lr": optimizer.param_groups[0]["lr"], **logs}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                if tb is not None:
                    for k, v in rec.items():
                        if k != "step" and isinstance(v, (int, float)):
                            tb.add_scalar(k, v, step)
            if bar is not None:
                bar.update(1)
                if last_loss is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}")
            if main_proc and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total_steps:
                _save_state(state_file, recipe, optimizer, step + 1, bad_total, data_skipped, ema)
    finally:
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    if ema is not None:  # the exported model carries the EMA weights
        with torch.no_grad():
            for p_model, p_ema in zip(recipe.model.state_dict().values(), ema.module.state_dict().values()):
                p_model.copy_(p_ema)
    return TrainResult(total_steps, bad_total, last_loss, time.time() - t0, data_skipped)


def _save_state(path: Path, recipe: Recipe, optimizer, step: int, bad_total: int, data_skipped: dict,
                ema=None) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    if not all(torch.isfinite(t).all() for t in trainable.values()):
        raise TrainingDiverged(f"step {step}: non-finite weights; refusing to write {path}")
    state = {"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(), "recipe": recipe.state_dict(),
             "rng": _rng_state(), "skipped_steps": bad_total, "data_skipped": data_skipped}
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def steps_for_epochs(epochs: float, num_samples: int, batch_size: int, grad_accum: int = 1, world: int = 1) -> int:
    return max(1, math.ceil(epochs * num_samples / (batch_size * grad_accum * world)))
