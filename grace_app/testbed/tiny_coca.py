"""The VQA testbed's tiny CoCa: the generative backbone (open_clip's ``CoCa``, arXiv 2205.01917), pretrained on the
VQA world's image-caption pairs with CoCa's two losses.

``tiny_coca(data_dir, out)`` returns a folder loadable with ``grace train --init`` (a CoCa ``--init`` makes a VQA
run generative: ``grace_plugin/vqa/backbones.py``); the first call pretrains (minutes on a CPU), later calls with the
same world and settings reuse the copy cached under ``$GRACE_CACHE_DIR`` (as the tiny CLIP, ``tiny_clip.py``).

Pretraining: open_clip's CoCa objective, the contrastive loss (``open_clip.ClipLoss``) plus ``caption_weight`` times
the captioning cross-entropy (open_clip's training defaults: 1 and 2, ``--coca-contrastive-loss-weight`` /
``--coca-caption-loss-weight``). The captioning loss is computed on the caption's tokens only: a forward hook on the
decoder's final norm keeps the positions whose label is a token, so the vocabulary projection (49,408 outputs)
runs on those positions and not on the padding; the loss is the same as ``open_clip.CoCaLoss``'s caption term
(``ignore_index`` = the pad id), tested. About half of the VQA world's captions are "question: ... answer: ..." (the
prompt ``CocaVQA`` answers after), so the pretrained CoCa can answer some questions zero-shot.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["CocaPretrainConfig", "pretrain_tiny_coca", "tiny_coca", "TINY_COCA_NAME", "caption_loss"]

TINY_COCA_NAME = "GRACE-Tiny-CoCa"
_VERSION = 1  # bump when the pretraining procedure changes (invalidates caches)


@dataclass
class CocaPretrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    width: int = 96
    layers: int = 3
    caption_weight: float = 2.0
    contrastive_weight: float = 1.0
    threads: int = 1  # pinned, and part of the cache key, as for the tiny CLIP (CPU reductions split by thread count)


def caption_loss(coca, images: torch.Tensor, text: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, dict]:
    """``(caption cross-entropy over the caption's tokens, CoCa's forward output)`` for normalised ``images`` and
    padded ``text`` (``[B, C]``): the decoder's output at the positions whose label ``text[:, 1:]`` is not padding."""
    labels = text[:, 1:]
    keep = labels != pad_id

    def only_labelled(_module, _inputs, out):  # [B, C-1, W] -> [N, W]: the projection then runs on N rows
        return out[keep]

    handle = coca.text_decoder.ln_final.register_forward_hook(only_labelled)
    try:
        out = coca(images, text)
    finally:
        handle.remove()
    return F.cross_entropy(out["logits"].float(), labels[keep]), out


def pretrain_tiny_coca(pairs_dir: str | Path, out: str | Path, cfg: CocaPretrainConfig | None = None,
                       progress: bool = True) -> Path:
    """Pretrain the tiny CoCa on ``pairs_dir`` under ``cfg.threads`` intra-op threads (restored after)."""
    cfg = cfg or CocaPretrainConfig()
    ambient = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(Path(pairs_dir), Path(out), cfg, progress)
    finally:
        torch.set_num_threads(ambient)


def _pretrain(pairs_dir: Path, out: Path, cfg: CocaPretrainConfig, progress: bool) -> Path:
    import open_clip
    from timm.scheduler import create_scheduler_v2

    from grace_plugin.models.clip import ClipBundle, register_open_clip_config, save_clip
    from grace_plugin.vqa.generative import tiny_coca_config

    from .tiny_clip import load_pairs

    torch.manual_seed(cfg.seed)
    model_cfg = tiny_coca_config(width=cfg.width, layers=cfg.layers)
    register_open_clip_config(TINY_COCA_NAME, model_cfg)
    coca = open_clip.create_model(TINY_COCA_NAME, pretrained=None)
    tok = open_clip.get_tokenizer(TINY_COCA_NAME)
    images, captions = load_pairs(pairs_dir, model_cfg["vision_cfg"]["image_size"])
    texts = tok(captions, context_length=int(coca.context_length))
    mean = torch.tensor(coca.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(coca.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    try:  # fused AdamW (CPU since torch 2.4), as for the tiny CLIP
        opt = torch.optim.AdamW(coca.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(coca.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=cfg.steps, warmup_epochs=cfg.warmup_steps,
                                   warmup_lr=cfg.lr * 1e-2, step_on_epochs=False, updates_per_epoch=1)
    contrastive = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if progress:
        from grace_plugin.progress import progress as progress_bar

        bar = progress_bar(total=cfg.steps, desc="pretrain tiny CoCa", unit="step")
    t0, n = time.time(), images.shape[0]
    coca.train()
    for step in range(cfg.steps):
        sched.step_update(step)
        idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
        x = (images[idx].float() / 255 - mean) / std
        cap, fwd = caption_loss(coca, x, texts[idx])
        con = contrastive(fwd["image_features"], fwd["text_features"], fwd["logit_scale"])
        loss = cfg.contrastive_weight * con + cfg.caption_weight * cap
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            coca.logit_scale.clamp_(0, 4.6052)  # CLIP's cap at 100
        if bar is not None:
            bar.update(1)
            bar.set_postfix(caption=f"{float(cap.detach()):.3f}", contrastive=f"{float(con.detach()):.3f}")
    if bar is not None:
        bar.close()
    coca.eval()
    return save_clip(ClipBundle(TINY_COCA_NAME, model_cfg, coca), out,
                     extra={"pretrain": asdict(cfg), "seconds": round(time.time() - t0, 1), "pairs": n,
                            "final_caption_loss": float(cap.detach()), "final_contrastive_loss": float(con.detach())})


def _key(data_dir: Path, cfg: CocaPretrainConfig) -> str:
    world = (data_dir / "world.json").read_text() if (data_dir / "world.json").is_file() else str(data_dir)
    blob = json.dumps({"world": world, "cfg": asdict(cfg), "version": _VERSION, "model": "coca"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_coca(data_dir: str | Path, out: str | Path, cfg: CocaPretrainConfig | None = None, progress: bool = True,
              use_cache: bool = True) -> Path:
    """Pretrain (or fetch from the cache) the tiny CoCa for the VQA world in ``data_dir``; copy it to ``out``."""
    from .tiny_clip import cached_model

    data_dir, cfg = Path(data_dir), cfg or CocaPretrainConfig()
    return cached_model("tiny_coca", _key(data_dir, cfg), Path(out),
                        lambda tmp: pretrain_tiny_coca(data_dir / "pairs", tmp, cfg, progress=progress), use_cache)
