"""The training loop. It knows no GRACE maths: recipes compute the loss, the trainer does everything else.

Device and precision are decided once here (bf16 autocast on CUDA, fp32 on CPU) and passed to the recipe as an
autocast factory. Optimizer and schedule come from timm's factories. Non-finite losses and gradients are skipped;
too many in a row stop the run with a clear message and no NaN checkpoint is ever written. The loop state
(optimizer, scheduler, recipe state, RNG states, data position) is checkpointed atomically and ``resume`` continues
a killed run to identical weights on CPU, seeking the data stream to its saved position instead of re-reading it.
Gradients are averaged over ranks during backward (``OverlappedGradSync``) or after it, as the recipe declares;
robust validation checks, checkpoint selection and the catastrophic-overfitting guard run here too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable, Iterator

import torch

from .data.source import batch_source
from .gradsync import OverlappedGradSync, all_reduce_grads, ranks_agree
from .rng import rng_state, set_rng_state
from .tensor_io import atomic_path, torch_load_tensors
from .config import TrainConfig
from .errors import GraceError
from .recipes.base import Recipe, StepContext, batch_feature_spread
from .runtime import autocast_factory, resolve_device, seed_everything, world_info

__all__ = ["train", "TrainingDiverged", "TrainResult", "steps_for_epochs"]

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
    # the step a resumed run started from (None: from 0); ``seconds`` counts this invocation's steps only, and a run
    # extended to more steps followed the schedule of its earlier length up to here
    resumed_at: int | None = None
    # this process's CPU time over the same steps (all its threads): the compute that matched controls compare
    cpu_seconds: float | None = None
    # the run's wall and CPU time over every invocation that kept its steps (the resumable states carry the earlier
    # invocations' totals; the work of steps redone after a kill is not counted): a resumed run's whole compute
    total_seconds: float | None = None
    total_cpu_seconds: float | None = None


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


@dataclass
class _LoopState:
    """What a resumable state carries besides weights, optimizer and RNG: where the loop is and what it has seen."""
    step: int = 0
    bad_total: int = 0
    data_skipped: dict = field(default_factory=dict)
    cursors: dict = field(default_factory=dict)  # this rank's {worker stream: (block, offset)}
    checks: list = field(default_factory=list)
    best: dict | None = None
    val_seconds: float = 0.0
    # the earlier invocations' totals (from the resumable state) and where this invocation's clocks started
    prior_seconds: float = 0.0
    prior_cpu_seconds: float = 0.0
    clock_start: tuple[float, float] = field(default_factory=lambda: (time.time(), time.process_time()))

    def totals(self) -> tuple[float, float]:
        """(wall, CPU) seconds of the run so far, over every invocation."""
        return (self.prior_seconds + time.time() - self.clock_start[0],
                self.prior_cpu_seconds + time.process_time() - self.clock_start[1])


def _load_state(state_file: Path, recipe: Recipe, optimizer, device, rank: int) -> tuple[_LoopState, dict]:
    """Put a resumable state's weights, optimizer and recipe state in place; the loop state and the raw dict back."""
    st = torch_load_tensors(state_file, device, what="resumable state")  # a pickle with code: one line
    trainable = dict((n, p) for n, p in recipe.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, t in st["trainable"].items():
            trainable[n].copy_(t)
    optimizer.load_state_dict(st["optimizer"])
    recipe.load_state_dict(st["recipe"])
    mine = st.get("cursors", {}).get(rank, {})  # every rank's stream has its own position
    loop = _LoopState(step=st["step"], bad_total=st["skipped_steps"], data_skipped=dict(st.get("data_skipped", {})),
                      cursors={int(k): tuple(v) for k, v in mine.items()}, checks=list(st.get("checks", [])),
                      best=st.get("best"), val_seconds=float(st.get("val_seconds", 0.0)),
                      prior_seconds=float(st.get("total_seconds", 0.0)),
                      prior_cpu_seconds=float(st.get("total_cpu_seconds", 0.0)))
    return loop, st


def _save_state(path: Path, recipe: Recipe, optimizer, loop: _LoopState, ema, cursors: dict) -> None:
    """Write the resumable state atomically (``cursors``: every rank's stream position, gathered on rank 0)."""
    trainable = {n: p.detach().cpu().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}
    if not all(torch.isfinite(t).all() for t in trainable.values()):
        raise TrainingDiverged(f"step {loop.step}: non-finite weights; refusing to write {path}")
    state = {"step": loop.step, "trainable": trainable, "optimizer": optimizer.state_dict(),
             "recipe": recipe.state_dict(), "rng": rng_state(), "skipped_steps": loop.bad_total,
             "data_skipped": loop.data_skipped,
             # {rank: {worker stream: (block, offset)}}: resume seeks there (batch_source)
             "cursors": {int(r): {int(k): tuple(v) for k, v in c.items()} for r, c in cursors.items()},
             "checks": list(loop.checks), "val_seconds": float(loop.val_seconds)}
    state["total_seconds"], state["total_cpu_seconds"] = loop.totals()
    if loop.best is not None:
        state["best"] = loop.best
    if ema is not None:
        state["ema"] = ema.module.state_dict()
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


class _RunLog:
    """``log.jsonl`` (and TensorBoard) on rank 0, and the progress bar."""

    def __init__(self, out: Path, cfg: TrainConfig, main_proc: bool, append: bool, progress: bool, total: int,
                 start: int, desc: str):
        self.tb = self.file = self.bar = None
        self.postfix: dict = {}
        if not main_proc:
            return
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        self.file = open(out / "log.jsonl", "a" if append else "w")
        if progress:
            from .progress import progress as progress_bar

            self.bar = progress_bar(total=total, initial=start, desc=desc, unit="step")

    def write(self, rec: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if self.postfix:
                self.bar.set_postfix(self.postfix)

    def close(self) -> None:
        for h in (self.file, self.tb, self.bar):
            if h is not None:
                h.close()


@dataclass
class _Loop:
    """One run's fixed parts, built once by ``train``."""
    recipe: Recipe
    cfg: TrainConfig
    total_steps: int
    device: torch.device
    autocast: object
    rank: int
    world: int
    params: list
    optimizer: object
    ema: object
    sync: OverlappedGradSync | None
    t_seek: float = 0.0  # when the stream was (re)started
    # the task's binder (grace_plugin/tasks.py): a context held around every forward of a batch (a VQA batch's
    # questions); none for classification
    bind: object = None
    first_batch_s: float | None = None  # from then to its first batch (the resume cost)


def _bound(lp: _Loop, batch: dict):
    return lp.bind(batch) if lp.bind is not None else contextlib.nullcontext()


def _forward_batches(lp: _Loop, stream: Iterator[dict], loop: _LoopState, step: int):
    """Draw ``grad_accum`` batches and run the recipe on each (all but the last backwarded here); ``(ok, last
    output, last batch, ctx, logs)``. A non-finite loss loses the step but its batches are still consumed."""
    cfg, world, rank = lp.cfg, lp.world, lp.rank
    ok, batch, ctx, last, logs = True, None, None, None, {}
    for a in range(cfg.grad_accum):
        batch = next(stream)
        if lp.first_batch_s is None:
            lp.first_batch_s = time.time() - lp.t_seek
        for k, v in batch.get("skipped", {}).items():
            loop.data_skipped[k] = loop.data_skipped.get(k, 0) + v
        if "cursor" in batch:
            w, blk, off = (int(v) for v in batch["cursor"])
            loop.cursors[w] = (blk, off)
        if not ok:
            continue  # the step is lost; still consume its batches so the stream stays in step
        b = int(batch["label"].shape[0])
        index = (a * world + rank) * b + torch.arange(b)  # this rank's samples in the global step
        ctx = StepContext(device=lp.device, autocast=lp.autocast, step=step, total_steps=lp.total_steps,
                          seed=cfg.seed, sample_index=index, world=world)
        with _bound(lp, batch):
            out_step = lp.recipe.training_step(batch, ctx)
        if not torch.isfinite(out_step.loss):
            ok = False
            continue
        logs = out_step.logs
        if a < cfg.grad_accum - 1:
            (out_step.loss / cfg.grad_accum).backward()
        else:
            last = out_step
    return ok, last, batch, ctx, logs


def _step(lp: _Loop, stream: Iterator[dict], loop: _LoopState, step: int, bad_run: int) -> tuple[dict | None, int]:
    """One optimizer step; ``(logs, bad_run)``, logs None for a step skipped (non-finite loss or gradient)."""
    cfg, world = lp.cfg, lp.world
    lp.optimizer.zero_grad(set_to_none=True)
    ok, last, batch, ctx, logs = _forward_batches(lp, stream, loop, step)
    # every rank agrees before the last backward, whose hooks all-reduce (a rank that skipped it would hang)
    bad = None if ranks_agree(ok, world, lp.device, every=True) else "loss"
    if bad is None:
        if lp.sync is not None:
            lp.sync.arm()
        (last.loss / cfg.grad_accum).backward()
        if lp.sync is not None:
            lp.sync.finish()
        elif world > 1:
            all_reduce_grads(lp.params, world)
        # (the same on every rank) a non-finite gradient under a finite loss would make the weights, then losses, NaN
        norm = torch.nn.utils.clip_grad_norm_(lp.params, cfg.grad_clip or math.inf)
        bad = None if bool(torch.isfinite(norm)) else "gradient"
    if bad is not None:
        loop.bad_total, bad_run = loop.bad_total + 1, bad_run + 1
        lp.optimizer.zero_grad(set_to_none=True)
        log.warning("step %d: non-finite %s; step skipped (%d in a row)", step, bad, bad_run)
        if bad_run >= cfg.max_bad_steps:
            raise TrainingDiverged(f"{bad_run} consecutive non-finite losses or gradients at step {step}; stopping "
                                   "(no checkpoint written for the diverged state). Lower train.lr or check the data.")
        return None, bad_run
    if cfg.grad_clip:
        logs["grad_norm"] = float(norm)
    lp.optimizer.step()
    if lp.ema is not None:
        lp.ema.update(lp.recipe.model, step=step)
    with _bound(lp, batch):
        logs.update(lp.recipe.after_step(batch, ctx))
    if step % cfg.log_every == 0 or step == lp.total_steps - 1:
        logs["feature_spread"] = batch_feature_spread(lp.recipe.model, batch["image"].to(lp.device), lp.autocast,
                                                      lp.world)
    return logs, 0


def _validate(lp: _Loop, validator, loop: _LoopState, step: int, track: str | None, runlog: _RunLog,
              t0: float) -> str | None:
    """One robust validation check: recorded, the tracked best snapshot kept; the catastrophic-overfitting guard's
    message when it trips, else None."""
    from .robust_validation import co_guard_tripped, select_check

    res = validator(lp.ema.module if lp.ema is not None else lp.recipe.model, lp.device, lp.autocast, lp.rank,
                    lp.world)
    loop.val_seconds += res.pop("val_seconds")
    check = {"step": step, **res}
    loop.checks.append(check)
    if track is not None and select_check(loop.checks, track) is check:
        loop.best = {"check": check, **_snapshot(lp.recipe, lp.ema)}
    share = loop.val_seconds / max(1e-9, loop.val_seconds + (time.time() - t0))
    runlog.write({**check, "val_seconds": round(loop.val_seconds, 3), "val_share": round(share, 4)})
    runlog.postfix.update(clean=f"{res['val_clean']:.1f}", robust=f"{res['val_robust']:.1f}")
    if not co_guard_tripped(loop.checks, lp.cfg.co_guard):
        return None
    prev = loop.checks[-2]
    return (f"catastrophic overfitting at step {step}: robust accuracy {prev['val_robust']:.1f} -> "
            f"{check['val_robust']:.1f} while clean {prev['val_clean']:.1f} -> {check['val_clean']:.1f} "
            f"(train.co_guard={lp.cfg.co_guard}); run stopped, exporting the {track} weights of step "
            f"{loop.best['check']['step']}")


def _checkpoint(lp: _Loop, loop: _LoopState, state_file: Path) -> None:
    every = [loop.cursors]
    if lp.world > 1:  # rank 0 writes the state: it needs every rank's stream position
        every = [None] * lp.world
        torch.distributed.all_gather_object(every, loop.cursors)
    if lp.rank == 0:
        _save_state(state_file, lp.recipe, lp.optimizer, loop, lp.ema, dict(enumerate(every)))


def _preemption_agreed(lp: _Loop, preempt) -> bool:
    """Whether any rank got a preemption signal: every rank takes part (one all-reduce of the flag), so all of
    them stop after the same step."""
    if preempt is None:  # the same on every rank (fine_tune gives each rank a guard, or none)
        return False
    return ranks_agree(preempt.requested(), lp.world, lp.device, every=False)


def _finish(lp: _Loop, loop: _LoopState, track: str | None, stopped: str | None) -> dict | None:
    """Leave the selected weights in the model (a stopped run never exports the collapsed ones) and the EMA's when
    there is one; the selection record."""
    selection = None
    if loop.checks:
        rule = track if stopped else lp.cfg.select
        if rule == "last":
            chosen = loop.checks[-1]
        else:
            chosen = loop.best["check"]
            _restore(lp.recipe, lp.ema, loop.best)
        selection = {"rule": rule, "step": int(chosen["step"]), "val_clean": chosen["val_clean"],
                     "val_robust": chosen["val_robust"], "checks": len(loop.checks)}
    if lp.ema is not None:  # the exported model carries the EMA weights
        with torch.no_grad():
            for p_model, p_ema in zip(lp.recipe.model.state_dict().values(), lp.ema.module.state_dict().values()):
                p_model.copy_(p_ema)
    return selection


def _build_loop(recipe: Recipe, cfg: TrainConfig, total_steps: int):
    """Device, precision, optimizer, schedule, grad sync: the parts of a run fixed before its first step."""
    from timm.scheduler import create_scheduler_v2

    rank, world = world_info()
    device = resolve_device(cfg.device)
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
    sync = OverlappedGradSync(params, world) if world > 1 and recipe.grad_sync == "overlap" else None
    lp = _Loop(recipe, cfg, total_steps, device, autocast_factory(device, cfg.precision), rank, world, params,
               optimizer, None, sync)
    return lp, scheduler


def train(recipe: Recipe, loader: Iterable[dict], cfg: TrainConfig, total_steps: int, out_dir: str | Path,
          progress: bool = True, resume: bool = False, validator=None, preempt=None, bind=None) -> TrainResult:
    """Run ``total_steps`` optimizer steps of ``recipe`` on batches from ``loader``; logs to ``out_dir/log.jsonl``.

    ``validator`` (a ``robust_validation.Validator``) is called every ``cfg.val_every`` steps and at the last step;
    its checks drive ``cfg.select`` (the weights left in the model at the end) and ``cfg.co_guard``.
    ``preempt`` (a ``preemption.PreemptionGuard``): once a signal came to any rank, every rank saves the state after
    the same step and :class:`~grace_plugin.preemption.Preempted` is raised. With ``cfg.keep_state`` the state after
    the last step is written too, so the run can be extended (``resume`` with more steps) without re-reading data.
    """
    out = Path(out_dir)
    lp, scheduler = _build_loop(recipe, cfg, total_steps)
    lp.bind = bind  # ``bind(batch)``: the task's context around each batch's forwards (a VQA batch's questions)
    if lp.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.pt"
    loop, st = _LoopState(), {}
    if resume and state_file.is_file():
        loop, st = _load_state(state_file, recipe, lp.optimizer, lp.device, lp.rank)
        log.info("resumed %s at step %d", out, loop.step)
    start = loop.step
    if lp.rank == 0 and resume:
        _clean_run_folder(out, start)
    lp.t_seek = time.time()
    stream, how = batch_source(loader, start * cfg.grad_accum, loop.cursors)
    if start:
        if how == "replay":
            log.warning("resume: this loader cannot seek; re-read %d batches", start * cfg.grad_accum)
        set_rng_state(st["rng"])
    if cfg.ema_decay:
        from timm.utils import ModelEmaV3

        lp.ema = ModelEmaV3(recipe.model, decay=cfg.ema_decay)
        if "ema" in st:
            lp.ema.module.load_state_dict(st["ema"])
    track = cfg.select if cfg.select != "last" else ("best_robust" if cfg.co_guard is not None else None)
    runlog = _RunLog(out, cfg, lp.rank == 0, bool(start), progress, total_steps, start, f"train {recipe.name}")
    t0, cpu0, bad_run, last_loss, stopped, step = time.time(), time.process_time(), 0, None, None, start
    try:
        for step in range(start, total_steps):
            scheduler.step_update(step)
            logs, bad_run = _step(lp, stream, loop, step, bad_run)
            if logs is not None:  # None: a skipped (non-finite) step, counted by _step
                last_loss = logs.get("loss")
                if step % cfg.log_every == 0 or step == total_steps - 1:
                    runlog.write({"step": step, "lr": lp.optimizer.param_groups[0]["lr"], **logs})
                if last_loss is not None:
                    runlog.postfix["loss"] = f"{last_loss:.3f}"
                if validator is not None and cfg.val_every and ((step + 1) % cfg.val_every == 0
                                                                or step == total_steps - 1):
                    stopped = _validate(lp, validator, loop, step, track, runlog, t0)
                runlog.advance()
                if stopped:
                    log.warning(stopped)
                    break
            if step + 1 < total_steps and _preemption_agreed(lp, preempt):
                from .preemption import Preempted

                loop.step = step + 1
                _checkpoint(lp, loop, state_file)
                raise Preempted(step + 1, state_file, preempt.signal_name if preempt is not None else None)
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total_steps:
                loop.step = step + 1
                _checkpoint(lp, loop, state_file)
        if cfg.keep_state and not stopped and start < total_steps:
            loop.step = total_steps
            _checkpoint(lp, loop, state_file)
    finally:
        if lp.sync is not None:
            lp.sync.close()
        runlog.close()
    selection = _finish(lp, loop, track, stopped)
    total_s, total_cpu = loop.totals()
    return TrainResult(step + 1 if stopped else total_steps, loop.bad_total, last_loss, time.time() - t0,
                       loop.data_skipped, selection=selection, stopped=stopped,
                       val_seconds=round(loop.val_seconds, 3), first_batch_seconds=lp.first_batch_s,
                       resumed_at=start or None, cpu_seconds=round(time.process_time() - cpu0, 2),
                       total_seconds=round(total_s, 2), total_cpu_seconds=round(total_cpu, 2))


def steps_for_epochs(epochs: float, num_samples: int, batch_size: int, grad_accum: int = 1, world: int = 1) -> int:
    return max(1, math.ceil(epochs * num_samples / (batch_size * grad_accum * world)))
