"""``grace shards convert``: an ImageFolder tree -> WebDataset shards in a registered layout (``shards.list_layouts``:
CLIP_benchmark, timm); the layout entry says where each shard goes, what each sample carries and which index files
the split gets.

Image bytes are copied as they are (no re-encoding, so nothing changes and nothing is lost). Shards are written in
parallel, each to a temp file renamed when complete, so an interrupted conversion resumes by skipping the shards that
exist with the right number of samples. At the end the total is verified against the number of images found.
"""
from __future__ import annotations

import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from grace_plugin.errors import InputNotFound, UsageError

__all__ = ["ConvertResult", "convert_imagefolder", "scan_imagefolder"]

EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".JPEG": "jpg", ".JPG": "jpg",
        ".PNG": "png"}


@dataclass
class ConvertResult:
    out: Path
    layout: str
    split: str
    shards: int
    samples: int
    skipped_existing: int
    classes: int


def scan_imagefolder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class folders (label order) and ``(path, label)`` pairs, like torchvision's ImageFolder."""
    root = Path(root)
    if not root.is_dir():
        raise InputNotFound(f"{root}: ImageFolder root does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UsageError(f"{root}: no class sub-folders")
    samples = []
    for label, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.is_file() and f.suffix in EXTS:
                samples.append((str(f), label))
    if not samples:
        raise UsageError(f"{root}: no images with extensions {sorted(set(EXTS))}")
    return classes, samples


def _count(path: Path) -> int:
    with tarfile.open(path) as tf:
        return sum(1 for m in tf if m.name.endswith(".cls"))


def _write_shard(args) -> int:
    path, items, layout, classes = args
    import webdataset as wds

    from .shards import get_layout

    fields = get_layout(layout).sample_fields

    tmp = Path(str(path) + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:  # mtime 0: the same images give the same bytes
        for key, (src, label) in items:
            sample = {"__key__": key, EXTS[Path(src).suffix]: Path(src).read_bytes(), "cls": label}
            sink.write(sample | fields(src, label, classes))
    os.replace(tmp, path)
    return len(items)


def convert_imagefolder(src: str | Path, out: str | Path, layout: str = "clip_benchmark", split: str | None = None,
                        maxcount: int = 1000, workers: int = 2, prefix: str = "imagenet1k",
                        classnames: list[str] | None = None, templates: list[str] | None = None,
                        progress: bool = False) -> ConvertResult:
    from .shards import get_layout

    lay = get_layout(layout)
    if not lay.from_imagefolder:
        raise UsageError(f"--layout {layout}: not written from an ImageFolder tree ({lay.description})")
    if maxcount <= 0:
        raise UsageError(f"--maxcount must be > 0, got {maxcount}")
    classes, samples = scan_imagefolder(src)
    split = split or lay.default_split
    out = Path(out)
    keyed = [(f"s{i:07d}", s) for i, s in enumerate(samples)]
    chunks = [keyed[i:i + maxcount] for i in range(0, len(keyed), maxcount)]
    jobs, skipped = [], 0
    for i, chunk in enumerate(chunks):
        path = lay.shard_path(out, split, i, prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            try:
                if _count(path) == len(chunk):
                    skipped += 1
                    continue
            except tarfile.TarError:
                pass  # a broken leftover: rewrite it
        jobs.append((path, chunk, layout, classes))
    if jobs:
        it = None
        with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
            it = ex.map(_write_shard, jobs)
            if progress:
                from ..progress import progress as bar

                it = bar(it, total=len(jobs), desc="convert", unit="shard")
            list(it)
    paths = [lay.shard_path(out, split, i, prefix) for i in range(len(chunks))]
    names, lengths = [p.name for p in paths], [_count(p) for p in paths]
    if sum(lengths) != len(samples):
        raise RuntimeError(f"{out}: wrote {sum(lengths)} samples but found {len(samples)} images")
    if classnames is None and len(classes) == 1000 and all(c.startswith("n") and c[1:].isdigit() for c in classes):
        from .shards import imagenet_metadata

        classnames, default_templates = imagenet_metadata()  # wnid folders sort into the standard index order
        templates = templates or default_templates
    names_file = "\n".join(classnames or classes) + "\n"
    tmpl = "\n".join(templates or ["a photo of a {c}."]) + "\n"
    from ..tensor_io import atomic_write_text

    atomic_write_text(out / "classnames.txt", names_file)
    atomic_write_text(out / "zeroshot_classification_templates.txt", tmpl)
    lay.write_index(out, split, names, lengths, len(classes), prefix)
    return ConvertResult(out, layout, split, len(chunks), sum(lengths), skipped, len(classes))
