"""The embedded testbed's tiny CLIP: contrastive pretraining on the synthetic image-caption pairs.

``tiny_clip(data_dir)`` returns a folder loadable with ``grace train --init``; the first call pretrains (minutes on
a CPU), later calls with the same world and settings reuse the copy cached under ``$GRACE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/grace_plugin`` or ``~/.cache/grace_plugin``).

The default world's tiny CLIP (world v2 seed 0, the default ``PretrainConfig``), the model every published testbed
number rests on, ships with the package (``artifacts/``, listed in ``SHIPPED`` by its cache key and sha256): for
that world and those settings it is copied and its sha256 checked instead of pretrained, so the default world's
table does not depend on how this machine's CPU kernels round a pretraining run. Every other world or setting is
pretrained.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from grace_plugin.models.clip import TINY_CLIP_NAME, ClipBundle, register_open_clip_config, save_clip, tiny_clip_config
from grace_plugin.paths import cache_dir

__all__ = ["PretrainConfig", "pretrain_tiny_clip", "tiny_clip", "tiny_clip_identity", "cache_dir", "SHIPPED",
           "cached_model", "load_pairs", "pretrain_loop", "with_threads"]

_VERSION = 2  # bump when the pretraining procedure changes (invalidates caches); 2: fused AdamW


@dataclass
class PretrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    width: int = 96
    layers: int = 3
    # torch's intra-op threads while pretraining: CPU reductions split by thread count, so two thread counts give two
    # different tiny CLIPs (measured: the default world's zero-shot ID 60.00 at 1 thread, 59.50 at 2) and every
    # testbed number would depend on the OMP_NUM_THREADS of whichever process first filled the cache. Pinned, and
    # part of the cache key.
    threads: int = 1


def load_pairs(pairs_dir: Path, image_size: int):
    """All pairs in memory as uint8 images + captions (the set is small; read through webdataset)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from grace_plugin.data.shards import open_shard_set

    shards = open_shard_set(pairs_dir, split="train")
    images, captions = [], []
    for s in wds.DataPipeline(wds.SimpleShardList(shards.urls), wds.tarfile_to_samples()):
        img_key = next(k for k in ("webp", "png", "jpg", "jpeg") if k in s)
        im = Image.open(io.BytesIO(s[img_key])).convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.BICUBIC)
        images.append(np.asarray(im))
        captions.append(s["txt"].decode("utf-8"))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, captions


def pretrain_tiny_clip(pairs_dir: str | Path, out: str | Path, cfg: PretrainConfig | None = None,
                       progress: bool = True) -> Path:
    """Pretrain the tiny CLIP on ``pairs_dir`` under ``cfg.threads`` intra-op threads (restored after)."""
    cfg = cfg or PretrainConfig()
    return with_threads(cfg.threads, lambda: _pretrain(Path(pairs_dir), Path(out), cfg, progress))


def with_threads(threads: int, fn):
    """``fn()`` under ``threads`` intra-op threads, the ambient count restored after (pretraining pins it: CPU
    reductions split by thread count, so the count is part of what the model is)."""
    ambient = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(ambient)


def pretrain_loop(model, images: torch.Tensor, cfg, step_loss, desc: str, progress: bool) -> tuple[dict, float]:
    """The testbed's pretraining loop, shared by the tiny CLIP and the tiny CoCa: AdamW (fused where the CPU build
    has it: a step over the tiny CLIP's 3.6 M parameters in 3.5 ms instead of 22 ms here) with timm's cosine schedule
    and warmup, ``cfg.steps`` batches of ``cfg.batch_size`` pairs drawn with replacement from a generator seeded by
    ``cfg.seed``, images normalised by the model's pre-processing, the logit scale capped at 100 (CLIP's).
    ``step_loss(x, idx) -> (loss, {name: tensor})``; returns the last step's ``{name: float}`` and the seconds."""
    from timm.scheduler import create_scheduler_v2

    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=cfg.steps, warmup_epochs=cfg.warmup_steps,
                                   warmup_lr=cfg.lr * 1e-2, step_on_epochs=False, updates_per_epoch=1)
    g = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    bar = None
    if progress:
        from grace_plugin.progress import progress as progress_bar

        bar = progress_bar(total=cfg.steps, desc=desc, unit="step")
    t0, logs = time.time(), {}
    model.train()
    for step in range(cfg.steps):
        sched.step_update(step)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = (images[idx].float() / 255 - mean) / std
        loss, logs = step_loss(x, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap at 100
        if bar is not None:
            bar.update(1)
            bar.set_postfix(**{k: f"{float(v.detach()):.3f}" for k, v in logs.items()})
    if bar is not None:
        bar.close()
    model.eval()
    return {k: float(v.detach()) for k, v in logs.items()}, time.time() - t0


def _pretrain(pairs_dir: Path, out: Path, cfg: PretrainConfig, progress: bool) -> Path:
    import open_clip

    torch.manual_seed(cfg.seed)
    model_cfg = tiny_clip_config(width=cfg.width, layers=cfg.layers)
    register_open_clip_config(TINY_CLIP_NAME, model_cfg)
    clip = open_clip.create_model(TINY_CLIP_NAME, pretrained=None)
    tok = open_clip.get_tokenizer(TINY_CLIP_NAME)
    size = model_cfg["vision_cfg"]["image_size"]
    images, captions = load_pairs(Path(pairs_dir), size)
    texts = tok(captions)
    loss_fn = open_clip.ClipLoss()

    def step_loss(x, idx):
        loss = loss_fn(*clip(x, texts[idx]))
        return loss, {"loss": loss}

    last, seconds = pretrain_loop(clip, images, cfg, step_loss, "pretrain tiny CLIP", progress)
    return save_clip(ClipBundle(TINY_CLIP_NAME, model_cfg, clip), out,
                     extra={"pretrain": asdict(cfg), "seconds": round(seconds, 1), "final_loss": last["loss"],
                            "pairs": images.shape[0]})


def _key(data_dir: Path, cfg: PretrainConfig) -> str:
    world = (data_dir / "world.json").read_text() if (data_dir / "world.json").is_file() else str(data_dir)
    blob = json.dumps({"world": world, "cfg": asdict(cfg), "version": _VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# cache key (world.json + PretrainConfig + _VERSION) -> (folder under artifacts/, sha256 of its safetensors)
SHIPPED = {"44e8db95e2a2fa05": ("tiny-clip-v2-seed0",
                                "2672fda12ef5fffeb43945358e53ac553a06b02dbc53bf922a622f8f46e9c3e1")}
_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _shipped_copy(key: str, dest: Path) -> bool:
    """Copy the shipped tiny CLIP for ``key`` (if any) to ``dest``, its sha256 checked; False when none ships."""
    from grace_plugin.errors import GraceError

    if key not in SHIPPED:
        return False
    folder, sha = SHIPPED[key]
    src = _ARTIFACTS / folder
    weights = src / "open_clip_model.safetensors"
    if not weights.is_file() or _weights_sha256(src) != sha:
        raise GraceError(f"{weights}: the shipped tiny CLIP is missing or its sha256 is not {sha[:12]}...; "
                         "reinstall the package")
    shutil.copytree(src, dest)
    return True


def tiny_clip(data_dir: str | Path, out: str | Path, cfg: PretrainConfig | None = None,
              progress: bool = True, use_cache: bool = True) -> Path:
    """Pretrain (or fetch from the cache, or copy the shipped one: ``SHIPPED``) the tiny CLIP for the world in
    ``data_dir``; copy it to ``out``."""
    data_dir, cfg = Path(data_dir), cfg or PretrainConfig()
    key = _key(data_dir, cfg)

    def make(tmp: Path) -> None:
        if not _shipped_copy(key, tmp):
            pretrain_tiny_clip(data_dir / "pairs", tmp, cfg, progress=progress)

    return cached_model("tiny_clip", key, Path(out), make, use_cache)


def cached_model(kind: str, key: str, out: Path, make, use_cache: bool = True) -> Path:
    """``out`` holds the model cached as ``<cache>/<kind>/<key>``, made by ``make(folder)`` when missing (written
    beside and renamed: a kill leaves no half-written cache entry or ``out``)."""
    cached = cache_dir() / kind / key
    if not (use_cache and (cached / "open_clip_model.safetensors").is_file()):
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        make(tmp)
        if use_cache:
            if cached.exists():
                shutil.rmtree(cached)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, cached)
        else:
            cached = tmp
    if not (out.is_dir() and _same_files(cached, out)):  # the same model already there stays untouched: another
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")  # study on this folder may be reading it
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(cached, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # a kill leaves the old folder or the new one, never a half-copied one
    if not use_cache:
        shutil.rmtree(cached)
    return out


def _same_files(a: Path, b: Path) -> bool:
    """True when folders ``a`` and ``b`` hold the same file names with byte-identical contents."""
    import filecmp

    names = sorted(p.name for p in a.iterdir() if p.is_file())
    if names != sorted(p.name for p in b.iterdir() if p.is_file()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def tiny_clip_identity(folder: str | Path) -> dict:
    """What a tiny CLIP folder is: its pretraining settings (threads included) and its weights' sha256, for a
    study's record."""
    folder = Path(folder)
    meta = json.loads((folder / "open_clip_config.json").read_text())
    digest = _weights_sha256(folder)
    pre = dict(meta.get("pretrain") or {})
    pre.setdefault("threads", None)  # pretrained before the thread count was recorded: unknown
    return {"pretrain": pre, "sha256": digest}


def _weights_sha256(folder: Path) -> str:
    """The sha256 of a tiny-CLIP folder's weights: what names the model (study pages, summaries, SHIPPED)."""
    return hashlib.sha256((Path(folder) / "open_clip_model.safetensors").read_bytes()).hexdigest()
