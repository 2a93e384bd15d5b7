"""Loader throughput: our eval and train streams vs a torchvision ImageFolder DataLoader, side by side in one run.

Same JPEGs (ImageNet-like 500x375 photos written here), same transform (timm's CLIP eval transform at 224: resize
shortest side, bicubic, centre crop, to [0,1] tensor), same number of workers and batch size. ImageFolder runs it
the usual way (PIL decode, PIL resize); our streams run it with ``decode="pil"`` (the same PIL steps) and with
``decode="tensor"`` (torchvision decode, the same transform steps on uint8 tensors). Prints images/s per loader
and the ratios to ImageFolder. ``--draft`` adds the PIL streams with JPEG draft decoding.

    python bench/loader.py --images 2000 --workers 2
    python bench/loader.py --seeding     # the train stream's per-sample seeding: torch.manual_seed vs CPU generator
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    # smooth random images compress like photos; one base per class plus noise keeps the writer fast
    bases = [np.kron(rng.uniform(0, 255, (24, 32, 3)), np.ones((16, 16, 1))).astype(np.float32)
             for _ in range(classes)]
    for i in range(n):
        c = i % classes
        img = np.clip(bases[c][:375, :500] + rng.normal(0, 12, (375, 500, 3)), 0, 255).astype("uint8")
        Image.fromarray(img).save(root / f"n{c:08d}" / f"img{i:06d}.JPEG", quality=90)


def rate(loader, limit_batches=None) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for i, b in enumerate(loader):
        x = b["image"] if isinstance(b, dict) else b[0]
        n += x.shape[0]
        if limit_batches and i + 1 >= limit_batches:
            break
    return n / (time.perf_counter() - t0), n


def seeding(n: int = 5000) -> None:
    """Per-sample cost of seeding torch for one augmentation, as the train stream does (``loader._seeded``), with
    ``torch.manual_seed`` (which also seeds CUDA: lazily, with a stack trace per call on a CUDA build) and with the
    CPU generator alone; interleaved rounds, medians. Both give the same CPU draws (checked)."""
    def global_seed(s):
        st = torch.get_rng_state()
        torch.manual_seed(s)
        torch.rand(1)
        torch.set_rng_state(st)

    def cpu_seed(s):
        st = torch.get_rng_state()
        torch.default_generator.manual_seed(s)
        torch.rand(1)
        torch.set_rng_state(st)

    times: dict = {"torch.manual_seed": [], "default_generator.manual_seed": []}
    for _ in range(3):
        for name, fn in zip(times, (global_seed, cpu_seed)):
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            times[name].append((time.perf_counter() - t0) / n)
    torch.manual_seed(7)
    a = torch.rand(8)
    torch.default_generator.manual_seed(7)
    same = torch.equal(a, torch.rand(8))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda is not None}), {n} samples, median of 3")
    for k, v in med.items():
        print(f"{k:32s} {v * 1e6:8.1f} us/sample")
    print(f"ratio {med['torch.manual_seed'] / med['default_generator.manual_seed']:.1f}x; same CPU draws: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--draft", action="store_true", help="also measure JPEG draft decoding")
    ap.add_argument("--dir", help="reuse/keep data here")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each loader's median is printed")
    ap.add_argument("--seeding", action="store_true", help="only the per-sample seeding cost (no images)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.seeding:
        return seeding()

    from torchvision.datasets import ImageFolder

    from grace_plugin.data.convert import convert_imagefolder
    from grace_plugin.data.loader import make_eval_loader, make_train_loader
    from grace_plugin.data.shards import open_shard_set
    from grace_plugin.data.transforms import eval_transform

    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="grace_bench_loader_"))
    folder, shards_dir = base / "folder", base / "shards"
    if not folder.exists():
        make_folder(folder, a.images)
    if not (shards_dir / "test" / "nshards.txt").exists():
        convert_imagefolder(folder, shards_dir, maxcount=250, workers=a.workers)
    cfg = {"input_size": (3, 224, 224), "crop_pct": 1.0, "interpolation": "bicubic"}
    tf = eval_transform(cfg)
    urls = open_shard_set(shards_dir).urls
    nb = a.images // a.batch_size
    per_epoch = nb - nb % max(1, a.workers)
    loaders = {"imagefolder": lambda: torch.utils.data.DataLoader(
        ImageFolder(str(folder), transform=tf), batch_size=a.batch_size, num_workers=a.workers, shuffle=False)}
    for decode in ("pil", "tensor"):
        loaders[f"ours eval ({decode})"] = lambda d=decode: make_eval_loader(
            urls, tf, a.batch_size, num_workers=a.workers, decode=d)
        loaders[f"ours train ({decode})"] = lambda d=decode: make_train_loader(
            urls, tf, a.batch_size, num_workers=a.workers, shuffle_buffer=500, batches_per_epoch=per_epoch, decode=d)
    if a.draft:
        loaders["ours eval (pil, draft)"] = lambda: make_eval_loader(urls, tf, a.batch_size, num_workers=a.workers,
                                                                     draft_size=224)
        loaders["ours train (pil, draft)"] = lambda: make_train_loader(
            urls, tf, a.batch_size, num_workers=a.workers, shuffle_buffer=500, draft_size=224, decode="pil",
            batches_per_epoch=per_epoch)
    # interleaved rounds, median rate per loader: drift on a busy machine hits every loader alike
    runs: dict = {k: [] for k in loaders}
    for _ in range(a.rounds):
        for name, make in loaders.items():
            runs[name].append(rate(make()))
    rows = {k: (statistics.median(r for r, _ in v), v[0][1]) for k, v in runs.items()}
    ref = rows["imagefolder"][0]
    print(f"{a.images} JPEGs 500x375 -> 224 crop, batch {a.batch_size}, {a.workers} workers, "
          f"median of {a.rounds} interleaved rounds")
    for name, (r, n) in rows.items():
        print(f"{name:24s} {r:8.1f} img/s ({n} images)  ratio vs imagefolder {r / ref:.2f}")


if __name__ == "__main__":
    main()
