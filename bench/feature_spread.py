"""Feature collapse probe: how much a model's image features still vary across images (docs/studies.md "Studies").

For each model (a pretrained CLIP folder: zero-shot; or a run folder) on the first ``--n`` images of a shard set:
the mean cosine between the L2-normalised features of *different* images, the mean cosine between class centroids,
the mean entropy of the zero-shot head's prediction (a uniform prediction over C classes has ln C) and top-1.
A collapsed model has cosines near 1 and an entropy near ln C; zero-shot CLIP is far from both.

    PYTHONPATH=. python bench/feature_spread.py SHARD_SET RUN [RUN ...] [--split test] [--n 400]
    e.g. studies/tune/val_split studies/tune/pretrained studies/tune/trials/grace/trial1
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


def spread_stats(features: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> dict:
    """Pure statistics of one model's features (N x D), labels (N) and logits (N x C)."""
    f = F.normalize(features.float(), dim=-1)
    n = f.shape[0]
    cos = f @ f.t()
    classes = sorted(set(labels.tolist()))
    cent = F.normalize(torch.stack([f[labels == k].mean(0) for k in classes]), dim=-1)
    cc = cent @ cent.t()
    k = len(classes)
    p = logits.float().softmax(-1)
    return {"cos_images": float((cos.sum() - cos.diag().sum()) / (n * (n - 1))),
            "cos_centroids": float((cc.sum() - cc.diag().sum()) / (k * (k - 1))),
            "entropy": float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()), "ln_c": math.log(logits.shape[1]),
            "top1": float(100 * (logits.argmax(-1) == labels).float().mean())}


def main() -> None:
    from grace_plugin.data.loader import make_eval_loader
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.transforms import eval_transform
    from grace_plugin.models.clip import classifier_from_clip, load_clip
    from registry import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=400)
    a = ap.parse_args()
    shards = open_shard_set(a.data, split=a.split)
    for path in a.runs:
        model = load_model(path, device="cpu").model
        if model is None:  # a pretrained CLIP folder: its zero-shot classifier
            model = classifier_from_clip(load_clip(path), shards.classnames, shards.templates or [], device="cpu")
        model.eval()
        xs, ys = [], []
        for b in make_eval_loader(shards.urls, eval_transform(model.pretrained_cfg), 200, len(shards.classnames)):
            xs.append(b["image"])
            ys.append(b["label"])
        x, y = torch.cat(xs)[:a.n], torch.cat(ys)[:a.n]
        with torch.no_grad():
            feats = model.encode(x)
            st = spread_stats(feats, y, model.head(feats.float()))
        print(f"{path}: cos between images {st['cos_images']:.3f} | between class centroids "
              f"{st['cos_centroids']:.3f} | prediction entropy {st['entropy']:.2f} (ln C = {st['ln_c']:.2f}) | "
              f"top-1 {st['top1']:.1f} (n={len(y)})")


if __name__ == "__main__":
    main()
