"""``fine_tune``: the library call behind ``grace train`` (CLIP -> zero-shot classifier -> recipe -> run folder)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from .checkpoint import atomic_write_text, save_run
from .config import ConfigError, DataConfig, RunConfig, TrainConfig, apply_overrides, load_yaml, parse_overrides, to_dict
from .errors import UsageError

__all__ = ["build_config", "fine_tune"]

log = logging.getLogger(__name__)


def build_config(recipe: str, config_file: str | Path | None = None, overrides: list[str] | dict | None = None,
                 steps: int | None = None, epochs: float | None = None) -> RunConfig:
    """Defaults < YAML < ``--set`` overrides < explicit ``steps``/``epochs``."""
    from .recipes import get_recipe_class

    cls = get_recipe_class(recipe)
    cfg = RunConfig(train=TrainConfig(), data=DataConfig(), recipe=cls.Config())
    layers: list[dict] = []
    if config_file:
        layers.append(load_yaml(config_file))
    if overrides:
        layers.append(overrides if isinstance(overrides, dict) else parse_overrides(overrides))
    for layer in layers:
        unknown = set(layer) - {"train", "data", "recipe"}
        if unknown:
            raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid sections: train, data, recipe")
        for section in ("train", "data", "recipe"):
            if section in layer:
                if not isinstance(layer[section], dict):
                    raise ConfigError(f"config section {section!r} must be a mapping")
                setattr(cfg, section, apply_overrides(getattr(cfg, section), layer[section], prefix=f"{section}."))
    if steps is not None and epochs is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if steps is not None:
        cfg.train = apply_overrides(cfg.train, {"steps": steps, "epochs": None}, prefix="train.")
    if epochs is not None:
        cfg.train = apply_overrides(cfg.train, {"epochs": epochs, "steps": None}, prefix="train.")
    return cfg


def fine_tune(recipe: str, init: str | Path, data: str | Path, out: str | Path, cfg: RunConfig,
              progress: bool = True, resume: bool = False) -> Path:
    """Fine-tune the CLIP ``init`` with ``recipe`` on the train split of shard set ``data``; write ``out``."""
    from .data.loader import DECODERS, make_train_loader
    from .data.shards import count_samples, open_shard_set
    from .data.transforms import train_transform
    from .models.clip import classifier_from_clip, load_clip, text_state_dict, tower_spec
    from .recipes import TextSide, create_recipe
    from .trainer import init_distributed, resolve_device, seed_everything, steps_for_epochs, train

    rank, world = init_distributed()  # a no-op unless launched by torchrun with WORLD_SIZE > 1
    shards = open_shard_set(data, split=cfg.data.train_split)
    classnames = shards.require_classnames()
    if cfg.data.decode not in DECODERS:
        raise UsageError(f"data.decode {cfg.data.decode!r} is not a decoder; valid: {', '.join(DECODERS)}")
    device = resolve_device(cfg.train.device)
    bundle = load_clip(init)
    model = classifier_from_clip(bundle, classnames, shards.templates or [], device="cpu")
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
                               num_workers=cfg.train.num_workers, decode=cfg.data.decode)
    out = Path(out)
    resolved = to_dict(cfg)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump({"recipe_name": recipe, **resolved}, sort_keys=False))
    result = train(rec, loader, cfg.train, total, out, progress=progress, resume=resume)
    if rank != 0:
        return out
    final = rec.export_model().cpu().eval()
    metrics: dict[str, Any] = {"train": {"steps": result.steps, "skipped_steps": result.skipped_steps,
                                         "final_loss": result.final_loss, "seconds": round(result.seconds, 2),
                                         "data_skipped": result.data_skipped}}
    save_run(out, final, tower=tower_spec(bundle.model_name, bundle.model_cfg),
             clip_meta={"model_name": bundle.model_name, "model_cfg": bundle.model_cfg},
             text_state=text_state_dict(bundle), classnames=classnames, templates=shards.templates,
             recipe=recipe, config=resolved, metrics=metrics,
             extra={"init": str(init), "data": str(data), "device": str(device), "world_size": world})
    state = out / "train_state.pt"
    if state.exists():
        state.unlink()  # the run finished; its resumable state is no longer needed
    return out
