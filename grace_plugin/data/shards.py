"""Self-describing WebDataset shard sets (CLIP_benchmark layout).

A *shard set* is a folder ``<root>`` holding ``classnames.txt``, ``zeroshot_classification_templates.txt`` (templates
use ``{c}``) and one folder per split with ``nshards.txt`` and ``0.tar .. (N-1).tar``. ``open_shard_set`` accepts
the set root (the split defaults to ``test`` for evaluation) or a split folder itself.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ShardSet", "ShardSetError", "open_shard_set", "read_lines", "count_samples"]

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")


class ShardSetError(ValueError):
    """A shard folder that cannot be used; the message names the file."""


@dataclass
class ShardSet:
    root: Path
    split: str
    urls: list[str]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        return len(self.classnames) if self.classnames else None

    def require_classnames(self) -> list[str]:
        if not self.classnames:
            raise ShardSetError(f"{self.root / 'classnames.txt'}: missing or empty; a CLIP zero-shot head needs "
                                "one class name per line in label order")
        return self.classnames


def read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def _split_urls(split_dir: Path) -> list[str]:
    nfile = split_dir / "nshards.txt"
    if nfile.is_file():
        txt = nfile.read_text().strip()
        try:
            n = int(txt)
        except ValueError:
            raise ShardSetError(f"{nfile}: expected one integer, got {txt!r}") from None
        if n <= 0:
            raise ShardSetError(f"{nfile}: says {n} shards; a split needs at least one")
        urls = [split_dir / f"{i}.tar" for i in range(n)]
        missing = [u.name for u in urls if not u.is_file()]
        if missing:
            raise ShardSetError(f"{split_dir}: nshards.txt says {n} shards but {len(missing)} are missing "
                                f"(first: {missing[0]})")
        return [str(u) for u in urls]
    tars = sorted(split_dir.glob("*.tar"))
    if not tars:
        raise ShardSetError(f"{split_dir}: no shards (no nshards.txt and no *.tar files)")
    return [str(t) for t in tars]


def open_shard_set(path: str | Path, split: str | None = None) -> ShardSet:
    """Resolve a shard set folder (or one of its split folders) into shard URLs and metadata."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ShardSetError(f"{p}: shard folder does not exist")
    if not p.is_dir():
        raise ShardSetError(f"{p}: not a folder (expected a shard set root or split folder)")
    if (p / "nshards.txt").is_file() or (split is None and any(p.glob("*.tar"))):
        split_dir, root = p, p.parent
        split = p.name
    else:
        root = p
        if split is None:
            split = "test" if (p / "test").is_dir() else None
            if split is None:
                subs = sorted(d.name for d in p.iterdir() if d.is_dir())
                raise ShardSetError(f"{p}: no 'test' split folder and no shards here "
                                    f"(found sub-folders: {', '.join(subs) or 'none'})")
        split_dir = p / split
        if not split_dir.is_dir():
            raise ShardSetError(f"{split_dir}: split folder does not exist")
    urls = _split_urls(split_dir)
    classnames = read_lines(root / "classnames.txt") or read_lines(split_dir / "classnames.txt")
    templates = (read_lines(root / "zeroshot_classification_templates.txt")
                 or read_lines(split_dir / "zeroshot_classification_templates.txt"))
    return ShardSet(root=root, split=split, urls=urls, classnames=classnames, templates=templates)


def count_samples(urls: list[str]) -> int:
    """Number of distinct sample keys in local tar shards (reads tar headers only)."""
    n = 0
    for u in urls:
        keys = set()
        with tarfile.open(u, "r:") as tf:
            for m in tf:
                if m.isfile() and "." in Path(m.name).name:
                    keys.add(m.name.split(".", 1)[0])
        n += len(keys)
    return n
