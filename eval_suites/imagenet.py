"""ImageNet val (and ImageNet-C) in folder form, read exactly as RobustBench reads it
(``load_imagenet`` and ``CORRUPTIONS`` in https://github.com/RobustBench/robustbench/blob/master/robustbench/data.py).

RobustBench evaluates ImageNet on a fixed 5000-image subset listed in its package file
``robustbench/helper_files/imagenet_test_image_ids.txt``; labels are the index of the wnid among the **sorted**
sub-folders of ``val/``, so all 1000 wnid folders must exist (else labels shift silently). We use RobustBench's own
``CustomImageFolder`` over that list, in batches instead of its single 5000-image batch (3 GB at 224 px).
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable, Iterator

import torch

from grace_plugin.errors import GraceError

__all__ = ["ImageNetFolderError", "imagenet_wnids", "imagenet_val_dir", "is_imagenet_folder", "check_imagenet_folder",
           "imagenet_batches", "imagenet_classnames", "CORRUPTIONS", "imagenet_c_batches"]

# The 15 ImageNet-C corruptions RobustBench evaluates, in its own order (robustbench/data.py ``CORRUPTIONS``).
CORRUPTIONS = ("shot_noise", "motion_blur", "snow", "pixelate", "gaussian_noise", "defocus_blur", "brightness", "fog",
               "zoom_blur", "frost", "glass_blur", "impulse_noise", "contrast", "jpeg_compression", "elastic_transform")


class ImageNetFolderError(GraceError, ValueError):
    """An ImageNet folder that RobustBench would mislabel or cannot read; the message names what is wrong."""


def _helper() -> Path:
    from grace_plugin._compat import check_robustbench_install

    check_robustbench_install()
    import robustbench

    return Path(robustbench.__file__).parent / "helper_files"


def imagenet_wnids() -> list[str]:
    """The 1000 wnids in sorted order (label order)."""
    return sorted(json.loads((_helper() / "imagenet_class_to_id_map.json").read_text()))


def subset_files(n: int | None = None) -> list[str]:
    """RobustBench's fixed evaluation subset (``wnid/file.JPEG``), first ``n``."""
    files = (_helper() / "imagenet_test_image_ids.txt").read_text().split()
    return files if n is None else files[:n]


def imagenet_val_dir(path: str | Path) -> Path:
    """``DIR`` or ``DIR/val``: the folder whose sub-folders are wnids."""
    p = Path(path).expanduser()
    return p / "val" if (p / "val").is_dir() else p


def is_imagenet_folder(path: str | Path) -> bool:
    """True when ``path`` (or ``path/val``) holds wnid sub-folders (``n01440764`` ...), i.e. not a shard set."""
    d = imagenet_val_dir(path)
    return d.is_dir() and (d / "n01440764").is_dir()


def check_imagenet_folder(path: str | Path, n: int | None = 5000) -> Path:
    """Check all 1000 wnid folders and the first ``n`` subset files exist; return the val folder."""
    d = imagenet_val_dir(path)
    if not d.is_dir():
        raise ImageNetFolderError(f"{path}: ImageNet folder does not exist")
    wnids = imagenet_wnids()
    missing = [w for w in wnids if not (d / w).is_dir()]
    if missing:
        raise ImageNetFolderError(
            f"{d}: missing {len(missing)} of the 1000 ImageNet class folders (first: {', '.join(missing[:3])}); "
            "labels are the index among the sorted wnid folders, so every class folder must exist (empty is fine)")
    extra = sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in set(wnids))
    if extra:
        raise ImageNetFolderError(f"{d}: unexpected sub-folders {', '.join(extra[:3])} would shift the labels")
    absent = [f for f in subset_files(n) if not (d / f).is_file()]
    if absent:
        raise ImageNetFolderError(f"{d}: {len(absent)} of the first {n} images of RobustBench's evaluation subset "
                                  f"are missing (first: {absent[0]})")
    return d


def imagenet_classnames() -> tuple[list[str], list]:
    """open_clip's ImageNet class names and OpenAI's 80 templates (the GRACE paper
    does not list its templates; these, the WiSE-FT/FLYP convention, are our choice)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES]


def _folder_batches(folder: Path, transform: Callable, n: int, batch_size: int,
                    ranks: tuple[int, int] | None = None) -> Iterator[dict]:
    """Batch ``k`` holds subset images ``k*B .. k*B+B-1``; under torchrun, rank ``r`` of ``W`` reads the batches
    with ``k % W == r`` (``eval_suites.distributed`` gathers them)."""
    from robustbench.loaders import CustomImageFolder

    from grace_plugin.runtime import world_info

    rank, world = ranks or world_info()
    ds = CustomImageFolder(str(folder), transform)
    total = min(n, len(ds))
    for k in range(rank, (total + batch_size - 1) // batch_size, world):
        items = [ds[i] for i in range(k * batch_size, min(total, (k + 1) * batch_size))]
        yield {"image": torch.stack([x for x, _, _ in items]), "label": torch.tensor([y for _, y, _ in items]),
               "skipped": {}, "key": (0, k)}


def imagenet_batches(path: str | Path, transform: Callable, n: int = 5000, batch_size: int = 64,
                     ranks: tuple[int, int] | None = None) -> Iterator[dict]:
    """Batches of RobustBench's subset in its order: ``{"image": [0,1] float, "label", "skipped": {}}``."""
    if n > 5000:
        raise ImageNetFolderError(f"--n-imagenet {n}: RobustBench's ImageNet subset has 5000 images")
    d = check_imagenet_folder(path, n)
    yield from _folder_batches(d, transform, n, batch_size, ranks)


def imagenet_c_batches(root: str | Path, corruption: str, severity: int, transform: Callable, n: int = 5000,
                       batch_size: int = 64) -> Iterator[dict]:
    """``<root>/ImageNet-C/<corruption>/<severity>/<wnid>/<file>``, the same subset
    (as ``robustbench/data.py`` reads it)."""
    d = Path(root).expanduser()
    d = d / "ImageNet-C" if (d / "ImageNet-C").is_dir() else d
    folder = d / corruption / str(severity)
    check_imagenet_folder(folder, n)
    yield from _folder_batches(folder, transform, n, batch_size)
