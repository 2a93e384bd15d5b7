"""A validation split held out of a shard set's train split (for tuning: never the test or OOD sets).

``holdout_split(src, out, fraction, seed)`` writes a CLIP_benchmark-layout shard set at ``out`` whose ``train`` split
is ``src``'s train split minus the held-out samples and whose ``test`` split is the held-out samples (so every tool
that evaluates a set's ``test`` split evaluates the validation split). A sample is held out when a seeded hash of
its key falls below ``fraction``: the choice does not depend on shard order and is the same on every run. Written
with ``webdataset.TarWriter``; class names and templates are copied.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

__all__ = ["holdout_split", "is_held_out"]


def is_held_out(key: str, fraction: float, seed: int = 0) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def holdout_split(src: str | Path, out: str | Path, fraction: float = 0.15, seed: int = 0,
                  maxcount: int = 1000) -> dict[str, int]:
    """Write ``out/{train,test}`` from ``src``'s train split; returns the sample counts ``{"train", "val"}``."""
    import webdataset as wds

    from ..errors import UsageError
    from .shards import open_shard_set

    if not 0.0 < fraction < 1.0:
        raise UsageError(f"val_fraction must be in (0, 1), got {fraction}")
    shards = open_shard_set(src, split="train")
    out = Path(out)
    counts = {"train": 0, "val": 0}
    writers = {}
    for split in ("train", "test"):
        (out / split).mkdir(parents=True, exist_ok=True)
        writers[split] = wds.ShardWriter(str(out / split / "%d.tar"), maxcount=maxcount, verbose=0)
    try:
        for sample in wds.WebDataset(shards.urls, shardshuffle=False):
            key = sample["__key__"]
            rec = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            split = "test" if is_held_out(key, fraction, seed) else "train"
            writers[split].write(rec)
            counts["val" if split == "test" else "train"] += 1
    finally:
        for w in writers.values():
            w.close()
    if not counts["val"] or not counts["train"]:
        raise UsageError(f"{src}: holding out {fraction} of {sum(counts.values())} train samples leaves an empty split")
    for split in ("train", "test"):
        n = len(list((out / split).glob("*.tar")))
        (out / split / "nshards.txt").write_text(f"{n}\n")
    root = Path(shards.root)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
        if (root / name).is_file():
            shutil.copyfile(root / name, out / name)
    return counts
