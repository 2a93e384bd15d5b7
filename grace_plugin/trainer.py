"""The training loop. It knows no GRACE maths: recipes compute the loss, the trainer does everything else.

Device and precision are decided once here (bf16 autocast on CUDA, fp32 on CPU) and passed to the recipe as an
autocast factory. Optimizer and schedule come from timm's factories. Non-finite losses are skipped and counted;
too many in a row stop the run with a clear message and no NaN checkpoint is ever written. The loop state
(optimizer, scheduler, recipe state, RNG states, data position) is checkpointed atomically and ``resume`` continues
a killed run to identical weights on CPU, seeking the data stream to its saved position instead of re-reading it.
Gradients are averaged over ranks during backward (``OverlappedGradSync``) or after it, as the recipe declares;
robust validation checks, checkpoint selection and the catastrophic-overfitting guard run here too.
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
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import atomic_path, torch_load_tensors
from .config import TrainConfig
from .errors import GraceError, UsageError
from .recipes.base import Recipe, StepContext

__all__ = ["train", "TrainingDiverged", "resolve_device", "autocast_factory", "TrainResult", "init_distributed",
           "world_info", "batch_source", "OverlappedGradSync"]

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
    selection: dict | None = None  # {"rule", "step", "val_clean", "val_robust", "checks"} when validation ran
    stopped: str | None = None  # the co_guard line when the guard stopped the run
    val_seconds: float = 0.0
    first_batch_seconds: float | None = None  # from the stream's (re)start to its first batch (resume cost)


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


def batch_source(loader: Iterable, consumed: int = 0, cursors: dict | None = None) -> tuple[Iterator[dict], str]:
    """Endless batches starting after the first ``consumed`` ones, and how the start was reached.

    ``seek`` (O(1) in ``consumed``): a sequence is indexed (batch ``k`` is ``loader[k % len]``); a ``DataLoader``
    over a seekable ``TrainStream`` restarts each worker stream at its saved cursor, the loader's worker ``i``
    playing stream ``(consumed + i) % num_workers`` (the DataLoader visits workers round-robin, so that is the
    stream the uninterrupted run would have read next). ``replay``: any other iterable is re-read from the start.
    """
    if isinstance(loader, Sequence):
        if not len(loader):
            raise RuntimeError("training stream produced no batches (empty batch list)")

        def indexed():
            k = consumed
            while True:
                yield loader[k % len(loader)]
                k += 1

        return indexed(), "seek"
    ds = getattr(loader, "dataset", None)
    if getattr(ds, "seekable", False):
        ds.seek(cursors or {}, rotation=consumed % max(1, getattr(loader, "num_workers", 0)))

        def endless():
            yield from loader
            raise RuntimeError("the training stream ended")

        return endless(), "seek"
    stream = _cycle(loader)
    for _ in range(consumed):
        next(stream)
    return stream, "replay"


class OverlappedGradSync:
    """Average gradients over ranks while backward runs, as DDP's reducer does (Li et al., "PyTorch Distributed:
    Experiences on Accelerating Data Parallel Training", VLDB 2020, https://arxiv.org/abs/2006.15704, Sec. 3.2):
    parameters in reverse registration order (about the order backward produces their gradients) are grouped in
    buckets of ``bucket_bytes``; a hook after each gradient's accumulation marks it ready and a bucket whose
    gradients are all ready is all-reduced asynchronously, buckets launched strictly in index order so every rank
    issues the same collectives in the same order. ``finish`` launches the buckets left (parameters without a
    gradient this step contribute zeros, and keep ``grad = None``), waits and writes the averages back.
    Only armed backwards reduce: the last micro-batch of a step (earlier ones accumulate locally, DDP's no_sync).
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, bucket_bytes: int = 25 << 20):
        self.world = world
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = bucket_bytes + 1
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if size + nbytes > bucket_bytes and (not self.buckets or self.buckets[-1]):
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.armed = False
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self.missing = [len(b) for b in self.buckets]
        self.next = 0
        self.works: list = []

    def arm(self) -> None:
        self._reset()
        self.armed = True

    def _ready(self, p) -> None:
        if not self.armed:
            return
        self.missing[self.where[id(p)]] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] == 0:
            self._launch(self.next)
            self.next += 1

    def _launch(self, i: int) -> None:
        ps = self.buckets[i]
        if all(p.grad is None for p in ps):
            return  # no gradient anywhere in this bucket this step (the same on every rank)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        self.works.append((ps, flat, torch.distributed.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        while self.next < len(self.buckets):
            self._launch(self.next)
            self.next += 1
        for ps, flat, work in self.works:
            work.wait()
            flat /= self.world
            off = 0
            for p in ps:
                if p.grad is not None:
                    p.grad.copy_(flat[off:off + p.numel()].view_as(p.grad))
                off += p.numel()
        self.armed = False
        self._reset()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _clean_run_folder(out: Path, start: int) -> None:
    """After a kill: drop ``log.jsonl`` records of steps the resumed run will redo (the killed run wrote them after
    its last checkpoint) and the temp files a killed ``atomic_path`` left beside ``train_state.pt``."""
    for tmp in out.glob(".train_state.pt.*.tmp"):
        tmp.unlink(missing_ok=True)
    log_path = out / "log.jsonl"
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if not isinstance(rec, dict) or rec.get("step", -1) < start:
            kept.append(line)
    with atomic_path(log_path) as tmp:
        tmp.write_text("".join(k + "\n" for k in kept))


def _snapshot(recipe: Recipe, ema) -> dict:
    """What selection may export later: the trainable weights (or the EMA's) and the recipe's own state."""
    if ema is not None:
        return {"ema": {k: v.detach().clone() for k, v in ema.module.state_dict().items()}}
    return {"trainable": {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad},
            "recipe": recipe.state_dict()}


def _restore(recipe: Recipe, ema, snap: dict) -> None:
    with torch.no_grad():
        if "ema" in snap:
            ema.module.load_state_dict(snap["ema"])
            return
        params = dict(recipe.model.named_parameters())
        for n, t in snap["trainable"].items():
            params[n].copy_(t)
    recipe.load_state_dict(snap["recipe"])


def train(recipe: Recipe, loader: Iterable[dict], cfg: TrainConfig, total_steps: int, out_dir: str | Path,
          progress: bool = True, resume: bool = False, validator=None) -> TrainResult:
    """Run ``total_steps`` optimizer steps of ``recipe`` on batches from ``loader``; logs to ``out_dir/log.jsonl``.

    ``validator`` (a ``validation.Validator``) is called every ``cfg.val_every`` steps and at the last step; its
    checks drive ``cfg.select`` (the weights left in the model at the end) and ``cfg.co_guard``.
    """
    from timm.scheduler import create_scheduler_v2

    from .validation import co_guard_tripped, select_check

    out = Path(out_dir)
    rank, world = world_info()
    main_proc = rank == 0
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    autocast = autocast_factory(device, cfg.precision)
    # the global generators differ per rank (nothing should draw from them identically on every rank); the draws
    # that must not depend on the world size come from rng.py's per-sample and per-step generators
    seed_everything(cfg.seed + rank)
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
    start, bad_total, data_skipped, cursors, checks, best, val_seconds = 0, 0, {}, {}, [], None, 0.0
    st: dict = {}
    if resume and state_file.is_file():
        st = torch_load_tensors(state_file, device, what="resumable state")  # a pickle with code: one line
        trainable = dict((n, p) for n, p in recipe.model.named_parameters() if p.requires_grad)
        with torch.no_grad():
            for n, t in st["trainable"].items():
                trainable[n].copy_(t)
        optimizer.load_state_dict(st["optimizer"])
        recipe.load_state_dict(st["recipe"])
        start, bad_total, data_skipped = st["step"], st["skipped_steps"], dict(st.get("data_skipped", {}))
        mine = st.get("cursors", {}).get(rank, {})  # every rank's stream has its own position
        cursors = {int(k): tuple(v) for k, v in mine.items()}
        checks, best = list(st.get("checks", [])), st.get("best")
        val_seconds = float(st.get("val_seconds", 0.0))
        log.info("resumed %s at step %d", out, start)
    if main_proc and resume:
        _clean_run_folder(out, start)
    t_seek = time.time()
    stream, how = batch_source(loader, start * cfg.grad_accum, cursors)
    if start:
        if how == "replay":
            log.warning("resume: this loader cannot seek; re-read %d batches", start * cfg.grad_accum)
        _set_rng_state(st["rng"])
    ema = None
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(recipe.model, decay=cfg.ema_decay)
        if "ema" in st:
            ema.module.load_state_dict(st["ema"])
    sync = None
    if world > 1 and recipe.grad_sync == "overlap":
        sync = OverlappedGradSync(params, world)
    track = cfg.select if cfg.select != "last" else ("best_robust" if cfg.co_guard is not None else None)
    tb = None
    if cfg.tensorboard and main_proc:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tb"))
    log_file = open(out / "log.jsonl", "a" if start else "w") if main_proc else None

    def write(rec: dict) -> None:
        if log_file is None:
            return
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()
        if tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, rec["step"])

    bar = None
    if progress and main_proc:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"train {recipe.name}", unit="step", dynamic_ncols=True)
    t0, bad_run, last_loss, stopped, first_batch_s = time.time(), 0, None, None, None
    postfix: dict = {}
    try:
        for step in range(start, total_steps):
            scheduler.step_update(step)
            optimizer.zero_grad(set_to_none=True)
            logs: dict = {}
            ok, batch, ctx, last = True, None, None, None
            for a in range(cfg.grad_accum):
                batch = next(stream)
                if first_batch_s is None:
                    first_batch_s = time.time() - t_seek
                for k, v in batch.get("skipped", {}).items():
                    data_skipped[k] = data_skipped.get(k, 0) + v
                if "cursor" in batch:
                    w, blk, off = (int(v) for v in batch["cursor"])
                    cursors[w] = (blk, off)
                if not ok:
                    continue  # the step is lost; still consume its batches so the stream stays in step
                b = int(batch["label"].shape[0])
                index = (a * world + rank) * b + torch.arange(b)  # this rank's samples in the global step
                ctx = StepContext(device=device, autocast=autocast, step=step, total_steps=total_steps,
                                  seed=cfg.seed, sample_index=index, world=world)
                out_step = recipe.training_step(batch, ctx)
                if not torch.isfinite(out_step.loss):
                    ok = False
                    continue
                logs = out_step.logs
                if a < cfg.grad_accum - 1:
                    (out_step.loss / cfg.grad_accum).backward()
                else:
                    last = out_step
            # every rank agrees before the last backward, whose hooks all-reduce (a rank that skipped it would hang)
            ok = _all_finite(ok, world, device)
            if not ok:
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
            if sync is not None:
                sync.arm()
            (last.loss / cfg.grad_accum).backward()
            if sync is not None:
                sync.finish()
            elif world > 1:
                _all_reduce_grads(params, world)
            if cfg.grad_clip:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                logs["grad_norm"] = float(gnorm)
            optimizer.step()
            if ema is not None:
                ema.update(recipe.model, step=step)
            logs.update(recipe.after_step(batch, ctx))
            last_loss = logs.get("loss")
            if step % cfg.log_every == 0 or step == total_steps - 1:
                write({"step": step, "lr": optimizer.param_groups[0]["lr"], **logs})
            if last_loss is not None:
                postfix["loss"] = f"{last_loss:.3f}"
            if validator is not None and cfg.val_every and ((step + 1) % cfg.val_every == 0
                                                            or step == total_steps - 1):
                res = validator(ema.module if ema is not None else recipe.model, device, autocast, rank, world)
                val_seconds += res.pop("val_seconds")
                check = {"step": step, **res}
                checks.append(check)
                if track is not None and select_check(checks, track) is check:
                    best = {"check": check, **_snapshot(recipe, ema)}
                share = val_seconds / max(1e-9, val_seconds + (time.time() - t0))
                write({**check, "val_seconds": round(val_seconds, 3), "val_share": round(share, 4)})
                postfix.update(clean=f"{res['val_clean']:.1f}", robust=f"{res['val_robust']:.1f}")
                if co_guard_tripped(checks, cfg.co_guard):
                    prev = checks[-2]
                    stopped = (f"catastrophic overfitting at step {step}: robust accuracy {prev['val_robust']:.1f} -> "
                               f"{check['val_robust']:.1f} while clean {prev['val_clean']:.1f} -> "
                               f"{check['val_clean']:.1f} (train.co_guard={cfg.co_guard}); run stopped, exporting "
                               f"the {track} weights of step {best['check']['step']}")
            if bar is not None:
                bar.update(1)
                if postfix:
                    bar.set_postfix(postfix)
            if stopped:
                log.warning(stopped)
                break
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total_steps:
                every = [cursors]
                if world > 1:  # rank 0 writes the state: it needs every rank's stream position
                    every = [None] * world
                    torch.distributed.all_gather_object(every, cursors)
                if main_proc:
                    _save_state(state_file, recipe, optimizer, step + 1, bad_total, data_skipped, ema,
                                cursors=dict(enumerate(every)), checks=checks, best=best, val_seconds=val_seconds)
    finally:
        if sync is not None:
            sync.close()
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
        if bar is not None:
            bar.close()
    selection = None
    if checks:
        rule = track if stopped else cfg.select  # a stopped run never exports the collapsed weights
        if rule == "last":
            chosen = checks[-1]
        else:
            chosen = best["check"]
            _restore(recipe, ema, best)
        selection = {"rule": rule, "step": int(chosen["step"]), "val_clean": chosen["val_clean"],
                     "val_robust": chosen["val_robust"], "checks": len(checks)}
    if ema is not None:  # the exported model carries the EMA weights
        with torch.no_grad():
            for p_model, p_ema in zip(recipe.model.state_dict().values(), ema.module.state_dict().values()):
                p_model.copy_(p_ema)
    seconds = time.time() - t0
    return TrainResult(step + 1 if stopped else total_steps, bad_total, last_loss, seconds, data_skipped,
                       selection=selection, stopped=stopped, val_seconds=round(val_seconds, 3),
                       first_batch_seconds=first_batch_s)


def _save_state(path: Path, recipe: Recipe, optimizer, step: int, bad_total: int, data_skipped: dict,
                ema=None, cursors: dict | None = None, checks: list | None = None, best: dict | None = None,
                val_seconds: float = 0.0) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    if not all(torch.isfinite(t).all() for t in trainable.values()):
        raise TrainingDiverged(f"step {step}: non-finite weights; refusing to write {path}")
    state = {"step": step, "trainable": trainable, "optimizer": optimizer.state_dict(), "recipe": recipe.state_dict(),
             "rng": _rng_state(), "skipped_steps": bad_total, "data_skipped": data_skipped,
             # {rank: {worker stream: (block, offset)}}: resume seeks there (batch_source)
             "cursors": {int(r): {int(k): tuple(v) for k, v in c.items()} for r, c in (cursors or {}).items()},
             "checks": list(checks or []), "val_seconds": float(val_seconds)}
    if best is not None:
        state["best"] = best
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def steps_for_epochs(epochs: float, num_samples: int, batch_size: int, grad_accum: int = 1, world: int = 1) -> int:
    return max(1, math.ceil(epochs * num_samples / (batch_size * grad_accum * world)))
