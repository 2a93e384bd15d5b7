"""Two measurements on a quickstart folder of the embedded testbed (README, "The embedded testbed").

1. Zero-shot feature stability: cos(f_ID, f_Adv) between the pretrained tiny CLIP's L2-normalised image features
   of clean and attacked ID test images, and the robust accuracy, under the training attack (l_inf PGD on the
   zero-shot CE, random start) at eps 1, 2 and 4/255: PGD-3 with step 3/8 eps (the testbed baselines' attack,
   1.5/255 at 4/255) and PGD-10 with step eps/4 (the paper's, 1/255 at 4/255).
2. Texture reliance (world v2): ID test accuracy of each model with the images as written, with their class's
   texture tile removed, and with another class's tile in its place (the pixels are otherwise the same).

    PYTHONPATH=. python bench/testbed_probe.py QUICKSTART_DIR [RUN ...]   (RUN: e.g. runs/ft/seed0, relative)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def load_set(set_dir: Path, split: str = "test"):
    from grace_app.testbed.world import read_split_images

    return read_split_images(set_dir / split, np.float32)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from grace_app.testbed.world import CLASSNAMES, TEMPLATES, TEXTURE_AMP, texture_tiles
    from grace_plugin.recipes.adversarial import pgd_attack
    from registry import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--n", type=int, default=200, help="ID test images attacked")
    a = ap.parse_args()
    torch.manual_seed(0)
    x_np, y_np = load_set(a.root / "data" / "id")

    def classifier(spec):
        m = load_model(spec).for_classes(CLASSNAMES, TEMPLATES).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def as_tensor(x):
        return torch.from_numpy(np.clip(x, 0, 255) / 255).permute(0, 3, 1, 2).float()

    zs = classifier(a.root / "pretrained")
    x, y = as_tensor(x_np[:a.n]), torch.from_numpy(y_np[:a.n])
    with torch.no_grad():
        f0 = F.normalize(zs.encode(x), dim=-1)
    print(f"zero-shot feature stability on {len(y)} ID test images (logit scale {float(zs.head.logit_scale):.2f})")
    print("| eps | attack | cos(f_ID, f_Adv) | robust top-1 |\n|---|---|---:|---:|")
    for k in (1, 2, 4):
        eps = k / 255
        for steps, alpha, name in ((3, eps * 3 / 8, "PGD-3, step 3/8 eps"), (10, eps / 4, "PGD-10, step eps/4")):
            xa = pgd_attack(zs, x, y, eps, alpha, steps)
            with torch.no_grad():
                fa = F.normalize(zs.encode(xa), dim=-1)
                acc = (zs(xa).argmax(1) == y).float().mean().item() * 100
            print(f"| {k}/255 | {name} | {float((f0 * fa).sum(-1).mean()):.3f} | {acc:.1f} |")

    tiles = np.stack([np.tile(t, (4, 4, 1)) for t in texture_tiles()]).astype(np.float32)
    other = (y_np + 1 + np.arange(len(y_np)) % 9) % len(CLASSNAMES)
    variants = {"as written": x_np, "tile removed": x_np - TEXTURE_AMP * tiles[y_np],
                "another class's tile": x_np - TEXTURE_AMP * tiles[y_np] + TEXTURE_AMP * tiles[other]}
    print(f"\ntexture reliance: ID test top-1 ({len(y_np)} images)")
    print("| model | " + " | ".join(variants) + " |\n|---|" + "---:|" * len(variants))
    for spec in ["pretrained", *a.runs]:
        m = classifier(a.root / spec)
        cells = []
        for v in variants.values():
            with torch.no_grad():
                cells.append(f"{(m(as_tensor(v)).argmax(1).numpy() == y_np).mean() * 100:.1f}")
        print(f"| {spec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
