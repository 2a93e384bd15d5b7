"""``fine_tune``: the library call behind ``grace train`` (CLIP -> zero-shot classifier -> recipe -> run folder)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import save_run
from .config import (RESUME_MAY_CHANGE, ConfigError, DataConfig, RunConfig, TrainConfig, apply_overrides,
                     load_yaml, parse_overrides, resume_differences, to_dict, validate)
from .errors import read_json
from .tensor_io import atomic_write_text

__all__ = ["build_config", "fine_tune"]

log = logging.getLogger(__name__)


def build_config(recipe: str, config_file: str | Path | list[str | Path] | None = None,
                 overrides: list[str] | dict | None = None, steps: int | None = None,
                 epochs: float | None = None) -> RunConfig:
    """Defaults < YAML (one file, or several layered in order: configs/testbed/) < ``--set`` overrides < explicit
    ``steps``/``epochs``."""
    from .recipes import get_recipe_class

    cls = get_recipe_class(recipe)
    cfg = RunConfig(train=TrainConfig(), data=DataConfig(), recipe=cls.Config())
    files = config_file if isinstance(config_file, (list, tuple)) else [config_file] if config_file else []
    layers: list[tuple[str, dict]] = [(str(f), load_yaml(f)) for f in files]
    if overrides:
        layers.append(("", overrides if isinstance(overrides, dict) else parse_overrides(overrides)))
    for source, layer in layers:
        where = f"{source}: " if source else ""
        unknown = set(layer) - {"train", "data", "recipe"}
        if unknown:
            raise ConfigError(f"{where}unknown config section(s) {sorted(unknown)}; valid sections: train, data, "
                              "recipe")
        for section in ("train", "data", "recipe"):
            if section in layer:
                if not isinstance(layer[section], dict):
                    raise ConfigError(f"{where}config section {section!r} must be a mapping")
                try:
                    setattr(cfg, section, apply_overrides(getattr(cfg, section), layer[section],
                                                          prefix=f"{section}."))
                except ConfigError as e:
                    raise ConfigError(f"{where}{e}") from None
    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    for flag, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            other = "epochs" if flag == "steps" else "steps"
            try:
                cfg.train = validate(apply_overrides(cfg.train, {flag: value, other: None}, prefix="train."),
                                     prefix="train.")
            except ConfigError as e:  # name the flag the value came from
                raise ConfigError(str(e).replace(f"train.{flag}=", f"--{flag} ", 1)) from None
    validate(cfg)  # every field's declared constraint (config.checked), before any data is read
    return cfg


def check_resume(out: Path, recipe: str, resolved: dict) -> None:
    """``--resume`` continues only the run its folder holds: the resolved config must equal the saved one except
    ``RESUME_MAY_CHANGE``; otherwise one line names every differing field."""
    saved_file = out / "config.yaml"
    if not (out / "train_state.pt").is_file():
        return
    if not saved_file.is_file():  # written before training starts: a state without it was not made by fine_tune
        log.warning("--resume: %s has train_state.pt but no config.yaml; the run's config cannot be checked", out)
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    diffs = resume_differences(saved, {"recipe_name": recipe, **resolved})
    if diffs:
        raise ConfigError(f"--resume: {out} was trained with another config: {'; '.join(diffs)} (only "
                          f"{', '.join(RESUME_MAY_CHANGE)} may change on resume)")


def check_extension(out: Path, work: Path, total: int) -> None:
    """``--resume`` on a finished run (``out`` holds it, no killed run is staged) extends it: refused in one line when
    it asks for no more steps than were run, or when the run kept no resumable state."""
    if (work / "train_state.pt").is_file() or not (out / "checkpoint.json").is_file():
        return
    meta = read_json(out / "checkpoint.json", ConfigError)
    done = int(((meta.get("metrics") or {}).get("train") or {}).get("steps") or 0)
    if total <= done:
        raise ConfigError(f"--resume: {out} already finished {done} steps; ask for more with --steps N (N > {done})")
    if not (out / "train_state.pt").is_file():
        raise ConfigError(f"--resume: {out} finished {done} steps without a resumable state (train.keep_state was "
                          "false); it cannot be extended: train it again with another --out")


def build_validator(data: str | Path, cfg: RunConfig, pretrained_cfg: dict, num_classes: int):
    """The first ``train.val_n`` images of split ``data.val_split`` (shard order), held in memory as tensors; with
    ``train.val_train_n`` also the first that many of ``data.train_split`` (scored as ``train_clean/robust``)."""
    from .config import parse_val_attack
    from .robust_validation import Validator, ValidatorSet

    t = cfg.train
    eps = t.val_eps if t.val_eps is not None else float(getattr(cfg.recipe, "pgd_eps", 4 / 255) or 4 / 255)
    slices = {"val": ("data.val_split", cfg.data.val_split, t.val_n)}
    if t.val_train_n:
        slices["train"] = ("data.train_split", cfg.data.train_split, t.val_train_n)
    made = {}
    for prefix, (field, split, n) in slices.items():
        x, y = _first_images(data, field, split, n, cfg, pretrained_cfg, num_classes)
        made[prefix] = Validator(x, y, eps, parse_val_attack(t.val_attack), batch_size=t.batch_size)
    return made["val"] if len(made) == 1 else ValidatorSet(made)


def _first_images(data, field: str, split: str, n_max: int, cfg: RunConfig, pretrained_cfg: dict,
                  num_classes: int):
    """The first ``n_max`` usable images of ``split`` (shard order); none: a one-line error naming ``field``."""

    from .data.loader import make_eval_loader
    from .data.shards import open_shard_set
    from .data.transforms import eval_transform

    shards = open_shard_set(data, split=split)
    xs, ys, n = [], [], 0
    for b in make_eval_loader(shards.urls, eval_transform(pretrained_cfg), min(256, n_max), num_classes,
                              decode=cfg.data.decode):
        if b["label"].numel():
            xs.append(b["image"])
            ys.append(b["label"])
            n += b["label"].numel()
        if n >= n_max:
            break
    if not n:
        raise ConfigError(f"{field}: {data} split {split!r} has no usable image")
    return torch.cat(xs)[:n_max], torch.cat(ys)[:n_max]


class _Watched:
    """A robust validator whose every check is also handed to ``on_check(step, result)`` (e.g. a tuner's pruner,
    which may raise to stop the run); checks come every ``every`` steps and at the last one (trainer.train)."""

    def __init__(self, inner, on_check, every: int, total: int):
        self.inner, self.on_check, self.every, self.total, self.calls = inner, on_check, every, total, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, *args, **kwargs) -> dict:
        res = self.inner(*args, **kwargs)
        self.calls += 1
        self.on_check(min(self.calls * self.every, self.total), dict(res))
        return res


def fine_tune(recipe: str, init: str | Path, data: str | Path, out: str | Path, cfg: RunConfig,
              progress: bool = True, resume: bool = False, on_check=None) -> Path:
    """Fine-tune the CLIP ``init`` with ``recipe`` on the train split of shard set ``data``; write ``out``.
    ``on_check(step, {"val_clean", "val_robust", ...})``: called after each robust validation check
    (``train.val_every``) of a fresh run; it may raise to abandon the run (a pruned tuning trial)."""
    from .runfolder import check_output_dir, folder_lock
    from .runtime import init_distributed

    if on_check is not None and resume:  # _Watched numbers the checks from step 0
        raise ValueError("fine_tune: on_check counts validation checks from step 0; it cannot follow a resumed run")

    validate(cfg)  # library callers may build RunConfig by hand

    check_output_dir(out)  # an existing file or a read-only place fails before any work
    rank, world = init_distributed()  # a no-op unless launched by torchrun with WORLD_SIZE > 1
    # rank 0 holds the run folder's lock for the whole run; the other ranks write nothing there
    with folder_lock(out) if rank == 0 else contextlib.nullcontext():
        return _fine_tune(recipe, init, data, Path(out), cfg, progress, resume, rank, world, on_check)


def _fine_tune(recipe: str, init, data, out: Path, cfg: RunConfig, progress: bool, resume: bool, rank: int,
               world: int, on_check=None) -> Path:
    from .tensor_io import check_outputs_finite
    from .data.loader import make_train_loader
    from .data.shards import count_samples, open_shard_set
    from .data.transforms import train_transform
    from .models.clip import load_clip, text_state_dict, tower_spec
    from .recipes import TextSide, create_recipe, get_recipe_class
    from .tasks import get_task
    from .runfolder import StagedRun
    from .runtime import resolve_device, seed_everything
    from .trainer import steps_for_epochs, train

    shards = open_shard_set(data, split=cfg.data.train_split)
    task = get_task(cfg.data.task)
    if task.name not in get_recipe_class(recipe).tasks:
        raise ConfigError(f"data.task={task.name}: recipe {recipe!r} trains only "
                          f"{', '.join(get_recipe_class(recipe).tasks)}")
    if task.name != "classification" and cfg.train.val_every:
        raise ConfigError(f"train.val_every: robust validation checks classification sets only; set it to 0 for "
                          f"data.task={task.name}")
    device = resolve_device(cfg.train.device)
    bundle = load_clip(init)
    built = task.build(bundle, shards, cfg.data, cfg.train.seed)
    model, classnames = built.model, built.labels
    seed_everything(cfg.train.seed)  # adapter initialisation (LoRA A) draws from the RNG
    rec = create_recipe(recipe, model, cfg.recipe, text=TextSide(bundle, classnames, list(shards.templates or [])))
    transform = train_transform(model.pretrained_cfg, cfg.data.augment)
    if cfg.train.steps is not None:
        total = int(cfg.train.steps)
    else:
        n = count_samples(shards.urls)
        total = steps_for_epochs(cfg.train.epochs or 1.0, n, cfg.train.batch_size, cfg.train.grad_accum, world)
    loader = make_train_loader(shards.urls, transform, cfg.train.batch_size, num_classes=len(classnames),
                               seed=cfg.train.seed, shuffle_buffer=cfg.train.shuffle_buffer,
                               num_workers=cfg.train.num_workers, decode=cfg.data.decode, source=str(data),
                               target=built.target)
    # Everything is written into a staging folder beside ``out`` and published in one rename when complete
    # (grace_plugin/runfolder.py): ``out`` is always the previous complete run or the new complete run.
    staged = StagedRun(out)
    work = staged.work
    resolved = to_dict(cfg)
    if resume:  # a killed run's state is in the staging folder; a finished run's in ``out`` itself
        for folder in (work, out):
            check_resume(folder, recipe, resolved)
        check_extension(out, work, total)
    validator = build_validator(data, cfg, model.pretrained_cfg, len(classnames)) if cfg.train.val_every else None
    if validator is not None and on_check is not None:
        validator = _Watched(validator, on_check, cfg.train.val_every, total)
    if rank == 0:
        staged.begin(resume=resume)
        if resume:
            staged.resumable_state()
        atomic_write_text(work / "config.yaml", yaml.safe_dump({"recipe_name": recipe, **resolved}, sort_keys=False))
        log.info("training in %s; moved to %s when complete", work, out)
    from .preemption import PreemptionGuard

    with PreemptionGuard(cfg.train.preempt_signals) as guard:
        result = train(rec, loader, cfg.train, total, work, progress=progress, resume=bool(resume),
                       validator=validator, preempt=guard, bind=built.bind)
    if rank != 0:
        return out
    final = rec.export_model().cpu().eval()
    # finite weights can still give NaN logits (e.g. after a few skipped NaN steps): check on a real batch
    probe = next(iter(loader))
    with built.bind({k: v[:64] for k, v in probe.items() if isinstance(v, (list, torch.Tensor))}):
        check_outputs_finite(final, probe["image"][:64].cpu(), f"run {out}")
    metrics: dict[str, Any] = {"train": {"steps": result.steps, "skipped_steps": result.skipped_steps,
                                         "final_loss": result.final_loss, "seconds": round(result.seconds, 2),
                                         "cpu_seconds": result.cpu_seconds,
                                         # over every invocation of a resumed run (seconds/cpu_seconds: this one)
                                         "total_seconds": result.total_seconds,
                                         "total_cpu_seconds": result.total_cpu_seconds,
                                         "data_skipped": result.data_skipped,
                                         "val_seconds": result.val_seconds, "resumed_at": result.resumed_at}}
    if rec.summary():
        metrics["recipe"] = rec.summary()
    extra = {"init": str(init), "data": str(data), "device": str(device), "world_size": world, "task": task.name,
             # CPU sums split over threads: the same run on another thread count can differ in the last bits
             "torch_threads": torch.get_num_threads()}
    if result.selection is not None:  # which weights were exported, and the validation check that chose them
        extra["selection"] = result.selection
    if result.stopped:
        extra["stopped"] = result.stopped
    save_run(work, final, tower=built.tower or tower_spec(bundle.model_name, bundle.model_cfg),
             clip_meta={"model_name": bundle.model_name, "model_cfg": bundle.model_cfg},
             text_state=text_state_dict(bundle), classnames=classnames, templates=shards.templates,
             recipe=recipe, config=resolved, metrics=metrics, extra=extra)
    state = work / "train_state.pt"
    if state.exists() and not cfg.train.keep_state:
        state.unlink()  # train.keep_state=false: the finished run cannot be extended, and takes less disk
    return staged.commit()
