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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .tiny_clip import PretrainConfig

__all__ = ["CocaPretrainConfig", "pretrain_tiny_coca", "tiny_coca", "TINY_COCA_NAME", "caption_loss"]

TINY_COCA_NAME = "GRACE-Tiny-CoCa"
_VERSION = 1  # bump when the pretraining procedure changes (invalidates caches)


@dataclass
class CocaPretrainConfig(PretrainConfig):
    """The tiny CLIP's pretraining settings (threads pinned, part of the cache key), at the CoCa's length and batch,
    with CoCa's two loss weights."""

    steps: int = 1000
    batch_size: int = 64
    caption_weight: float = 2.0
    contrastive_weight: float = 1.0


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
    from .tiny_clip import with_threads

    cfg = cfg or CocaPretrainConfig()
    return with_threads(cfg.threads, lambda: _pretrain(Path(pairs_dir), Path(out), cfg, progress))


def _pretrain(pairs_dir: Path, out: Path, cfg: CocaPretrainConfig, progress: bool) -> Path:
    import open_clip

    from grace_plugin.models.clip import ClipBundle, register_open_clip_config, save_clip
    from grace_plugin.vqa.generative import tiny_coca_config

    from .tiny_clip import load_pairs, pretrain_loop

    torch.manual_seed(cfg.seed)
    model_cfg = tiny_coca_config(width=cfg.width, layers=cfg.layers)
    register_open_clip_config(TINY_COCA_NAME, model_cfg)
    coca = open_clip.create_model(TINY_COCA_NAME, pretrained=None)
    # open_clip 2.32 leaves the decoder's output projection uninitialised (torch.empty; its init is commented out in
    # MultimodalTransformer.init_parameters): whatever the allocator hands back, zeros in a fresh process and other
    # values later, so two pretrainings in one process differed. Zeros, stated: what a fresh process gets
    torch.nn.init.zeros_(coca.text_decoder.text_projection)
    tok = open_clip.get_tokenizer(TINY_COCA_NAME)
    images, captions = load_pairs(pairs_dir, model_cfg["vision_cfg"]["image_size"])
    texts = tok(captions, context_length=int(coca.context_length))
    contrastive = open_clip.ClipLoss()

    def step_loss(x, idx):
        cap, fwd = caption_loss(coca, x, texts[idx])
        con = contrastive(fwd["image_features"], fwd["text_features"], fwd["logit_scale"])
        return cfg.contrastive_weight * con + cfg.caption_weight * cap, {"caption": cap, "contrastive": con}

    last, seconds = pretrain_loop(coca, images, cfg, step_loss, "pretrain tiny CoCa", progress)
    return save_clip(ClipBundle(TINY_COCA_NAME, model_cfg, coca), out,
                     extra={"pretrain": asdict(cfg), "seconds": round(seconds, 1), "pairs": images.shape[0],
                            "final_caption_loss": last["caption"], "final_contrastive_loss": last["contrastive"]})


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
