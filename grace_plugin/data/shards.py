"""Shard sets: the public WebDataset layouts of ImageNet and its OOD sets, read as they are. Each layout is an entry
of a registry (``register_layout``, ``list_layouts``, ``get_layout``: ``ShardLayout``) holding how a folder is
recognised, how it is read, and how ``grace shards convert`` writes it; a new layout is a new entry.

* **CLIP_benchmark** (``clip-benchmark/wds_*``): ``<root>/{train,test}/{0..N-1}.tar`` + ``nshards.txt``,
  ``classnames.txt``, ``zeroshot_classification_templates.txt`` (templates use ``{c}``), optional
  ``dataset_type.txt``; image keys webp/png/jpg/jpeg, label key ``cls``.
* **timm** (``timm/imagenet-1k-wds``): ``_info.json`` (or ``info.json``) with per-split ``num_samples``,
  ``shard_lengths`` and ``filenames``; shards ``imagenet1k-{train,validation}-NNNN.tar`` with ``jpg``, ``cls``,
  ``json``. The split ``test`` is read as ``validation``.
* Remote or pattern specs: a brace pattern (``/data/{0..9}.tar``), ``http(s)://``, ``pipe:`` (and any URL scheme
  webdataset opens, e.g. ``hf://``-style hub URLs when online). Metadata files beside the shards are fetched with
  webdataset's ``gopen``; append ``|N`` to state the expected sample count (timm's split-string convention).

When a 1000-class layout carries no class names, the ImageNet names and the 80 OpenAI templates are taken from
open_clip (``IMAGENET_CLASSNAMES``, ``OPENAI_IMAGENET_TEMPLATES``).
"""
from __future__ import annotations

import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import GraceError, read_json
from ..registries import Registry

__all__ = ["ShardSet", "ShardSetError", "open_shard_set", "read_lines", "count_samples", "imagenet_metadata",
           "ShardLayout", "register_layout", "get_layout", "list_layouts", "detect_layout", "label_counts",
           "labels_beyond"]

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
_REMOTE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://|pipe:)")


class ShardSetError(GraceError, ValueError):
    """A shard folder that cannot be used; the message names the file."""


@dataclass
class ShardSet:
    root: Path | str
    split: str
    urls: list[str]
    classnames: list[str] | None = None
    templates: list[str] | None = None
    expected: int | None = None  # number of samples the layout promises (``_info.json`` or ``|N``)
    layout: str = "clip_benchmark"
    meta: dict = field(default_factory=dict)
    # tars in the split folder that the layout does not list (nshards.txt smaller than the number of tars): their
    # samples are not read, so a report counts them as ``unaccounted`` (and --strict refuses the set)
    unlisted: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int | None:
        return len(self.classnames) if self.classnames else None

    def require_classnames(self) -> list[str]:
        if not self.classnames:
            where = (Path(self.root) / "classnames.txt" if not isinstance(self.root, str)
                     else f"{self.root}/classnames.txt")
            raise ShardSetError(f"{where}: missing or empty; a CLIP zero-shot head needs one class name per line "
                                "in label order")
        return self.classnames


def read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]


def imagenet_metadata() -> tuple[list[str], list[str]]:
    """The 1000 CLIP ImageNet class names and the 80 OpenAI templates (as ``{c}`` strings), from open_clip."""
    import open_clip

    return list(open_clip.IMAGENET_CLASSNAMES), [t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]


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
    tars = sorted(split_dir.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not tars:
        raise ShardSetError(f"{split_dir}: no shards (no nshards.txt and no *.tar files)")
    return [str(t) for t in tars]


def _timm_info(p: Path) -> Path | None:
    for name in ("_info.json", "info.json"):
        if (p / name).is_file():
            return p / name
    return None


def _open_timm(p: Path, info_file: Path, split: str | None) -> ShardSet:
    info = read_json(info_file, ShardSetError)
    splits = info.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ShardSetError(f"{info_file}: field 'splits' is missing or empty")
    split = split or "validation"
    if split == "test" and "test" not in splits:
        split = "validation"
    if split not in splits:
        raise ShardSetError(f"{info_file}: no split {split!r}; splits: {', '.join(sorted(splits))}")
    sp = splits[split]
    files = sp.get("filenames")
    if not files:
        raise ShardSetError(f"{info_file}: splits.{split}.filenames is missing or empty")
    urls = [p / f for f in files]
    missing = [u.name for u in urls if not u.is_file()]
    if missing:
        raise ShardSetError(f"{p}: _info.json lists {len(urls)} {split} shards but {len(missing)} are missing "
                            f"(first: {missing[0]})")
    expected = sp.get("num_samples")
    lengths = sp.get("shard_lengths")
    if expected is not None and lengths and sum(lengths) != expected:
        raise ShardSetError(f"{info_file}: splits.{split}: shard_lengths sum to {sum(lengths)} but num_samples is "
                            f"{expected}")
    classnames = read_lines(p / "classnames.txt")
    templates = read_lines(p / "zeroshot_classification_templates.txt")
    num_classes = info.get("num_classes") or (info.get("features", {}).get("cls", {}) or {}).get("num_classes")
    if classnames is None and (num_classes in (None, 1000)) and "imagenet" in (info.get("name", "") + p.name).lower():
        classnames, default_templates = imagenet_metadata()
        templates = templates or default_templates
    return ShardSet(root=p, split=split, urls=[str(u) for u in urls], classnames=classnames, templates=templates,
                    expected=expected, layout="timm", meta={"info": info_file.name, "shard_lengths": lengths})


def _read_remote_lines(url: str) -> list[str] | None:
    import webdataset as wds

    try:
        with wds.gopen(url) as f:
            data = f.read()
    except Exception:  # a metadata file that is not there is normal for some layouts
        return None
    lines = [ln.strip() for ln in data.decode("utf-8").splitlines()]
    return [ln for ln in lines if ln] or None


def _open_pattern(spec: str) -> ShardSet:
    """A brace pattern or URL (optionally ``|N``); metadata is looked for beside the shards and one level up."""
    import braceexpand

    expected = None
    if "|" in spec and spec.rsplit("|", 1)[1].strip().isdigit():
        spec, n = spec.rsplit("|", 1)
        expected = int(n)
    urls = list(braceexpand.braceexpand(spec))
    if not _REMOTE.match(spec):
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ShardSetError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    base = spec.split("{", 1)[0].rsplit("/", 1)[0] if "/" in spec.split("{", 1)[0] else "."
    parent = base.rsplit("/", 1)[0] if "/" in base else base
    classnames = templates = None
    for d in (base, parent):
        if _REMOTE.match(spec):
            classnames = classnames or _read_remote_lines(f"{d}/classnames.txt")
            templates = templates or _read_remote_lines(f"{d}/zeroshot_classification_templates.txt")
        else:
            classnames = classnames or read_lines(Path(d) / "classnames.txt")
            templates = templates or read_lines(Path(d) / "zeroshot_classification_templates.txt")
    return ShardSet(root=base, split=Path(base).name, urls=urls, classnames=classnames, templates=templates,
                    expected=expected, layout="pattern")


@dataclass(frozen=True)
class ShardLayout:
    """A folder layout of WebDataset shards: how a set folder is recognised (``detect``) and read (``read``: folder,
    split -> ``ShardSet``), and how ``grace shards convert`` writes one: the split's default name, shard ``i``'s path
    (``shard_path(out, split, i, prefix)``), the fields each sample carries beside its image and ``cls``
    (``sample_fields(src, label, classes)``) and the split's index files (``write_index(out, split, names, lengths,
    num_classes, prefix)``)."""

    name: str
    description: str
    default_split: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, str | None], ShardSet]
    shard_path: Callable[[Path, str, int, str], Path]
    sample_fields: Callable[[str, int, list[str]], dict]
    write_index: Callable[[Path, str, list[str], list[int], int, str], None]
    from_imagefolder: bool = True  # False: written by another converter (a VQA set: grace_plugin/vqa/convert.py)


class UnknownLayoutError(ShardSetError, KeyError):
    pass


_LAYOUTS: Registry[ShardLayout] = Registry("layout", UnknownLayoutError)


def register_layout(layout: ShardLayout) -> ShardLayout:
    """Add a layout; a folder is read by the first layout, in registration order, that recognises it."""
    return _LAYOUTS.register(layout.name)(layout)


def get_layout(name: str) -> ShardLayout:
    return _LAYOUTS.get(name)


def list_layouts() -> list[str]:
    return _LAYOUTS.names()


def detect_layout(p: Path) -> ShardLayout:
    """The layout of a local set folder: the first registered one that recognises it (CLIP_benchmark, the
    fallback, recognises every folder and refuses a bad one in its reader)."""
    return next(lay for lay in _LAYOUTS.in_registration_order() if lay.detect(p))


def open_shard_set(path: str | Path, split: str | None = None) -> ShardSet:
    """Resolve a shard set (folder of a registered layout, split folder, brace pattern or URL) into URLs and
    metadata."""
    spec = str(path)
    if isinstance(path, str) and (_REMOTE.match(spec) or "{" in spec or spec.endswith(".tar") or "|" in spec):
        return _open_pattern(spec)
    p = Path(path).expanduser()
    if not p.exists():
        raise ShardSetError(f"{p}: shard folder does not exist")
    if not p.is_dir():
        raise ShardSetError(f"{p}: not a folder (expected a shard set root or split folder)")
    return detect_layout(p).read(p, split)


def _open_clip_benchmark(p: Path, split: str | None) -> ShardSet:
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
    listed = {str(Path(u).resolve()) for u in urls}
    unlisted = [str(t) for t in sorted(split_dir.glob("*.tar")) if str(t.resolve()) not in listed]
    classnames = read_lines(root / "classnames.txt") or read_lines(split_dir / "classnames.txt")
    templates = (read_lines(root / "zeroshot_classification_templates.txt")
                 or read_lines(split_dir / "zeroshot_classification_templates.txt"))
    dtype = read_lines(root / "dataset_type.txt")
    return ShardSet(root=root, split=split, urls=urls, classnames=classnames, templates=templates,
                    meta={"dataset_type": dtype[0] if dtype else "classification"}, unlisted=unlisted)


def _write_nshards(out: Path, split: str, names: list[str], lengths: list[int], num_classes: int, prefix: str):
    from ..tensor_io import atomic_write_text

    atomic_write_text(out / split / "nshards.txt", f"{len(names)}\n")


def _write_timm_info(out: Path, split: str, names: list[str], lengths: list[int], num_classes: int, prefix: str):
    import json

    from ..tensor_io import atomic_write_text

    info_file = out / "_info.json"
    info = read_json(info_file, ShardSetError) if info_file.is_file() else {"name": prefix, "splits": {}}
    info["num_classes"] = num_classes
    info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}
    atomic_write_text(info_file, json.dumps(info, indent=2) + "\n")


# timm first: its _info.json marks it; CLIP_benchmark reads (or refuses) every other folder
register_layout(ShardLayout(
    name="timm", description="timm/imagenet-1k-wds: _info.json (splits: num_samples, shard_lengths, filenames), "
    "<prefix>-<split>-NNNN.tar with jpg, cls, json", default_split="validation",
    detect=lambda p: _timm_info(p) is not None, read=lambda p, split: _open_timm(p, _timm_info(p), split),
    shard_path=lambda out, split, i, prefix: out / f"{prefix}-{split}-{i:04d}.tar",
    sample_fields=lambda src, label, classes: {"json": {"filename": Path(src).name, "label": label,
                                                        "class": classes[label]}},
    write_index=_write_timm_info))
VQA_INFO = "vqa.json"  # marks a VQA set folder (written by grace_plugin/vqa/convert.py)


def _vqa_root(p: Path) -> Path | None:
    return p if (p / VQA_INFO).is_file() else p.parent if (p.parent / VQA_INFO).is_file() else None


def _open_vqa(p: Path, split: str | None) -> ShardSet:
    """A VQA set (``grace_plugin/vqa/convert.py``): ``vqa.json`` + ``<split>/{0..N-1}.tar`` + ``nshards.txt``."""
    root = _vqa_root(p)
    info = read_json(root / VQA_INFO, ShardSetError)
    splits = sorted(info.get("splits") or {})
    if root != p:
        split = p.name
    elif split is None:
        split = splits[0] if len(splits) == 1 else next((s for s in ("test", "val") if s in splits), None)
        if split is None:
            raise ShardSetError(f"{root}: several splits ({', '.join(splits)}); name one")
    split_dir = root / split
    if not split_dir.is_dir():
        raise ShardSetError(f"{split_dir}: split folder does not exist (splits: {', '.join(splits) or 'none'})")
    return ShardSet(root=root, split=split, urls=_split_urls(split_dir), layout="vqa",
                    meta={"task": "vqa", "info": info})


register_layout(ShardLayout(
    name="vqa", description="a VQA set: vqa.json (name, group, splits) + <split>/{0..N-1}.tar + nshards.txt; each "
    "sample an image and json (question_id, question, answers, question_type, answer_type)", default_split="test",
    detect=lambda p: _vqa_root(p) is not None, read=_open_vqa,
    shard_path=lambda out, split, i, prefix: out / split / f"{i}.tar",
    sample_fields=lambda src, label, classes: {}, write_index=_write_nshards, from_imagefolder=False))
register_layout(ShardLayout(
    name="clip_benchmark", description="clip-benchmark/wds_*: <split>/{0..N-1}.tar + nshards.txt, classnames.txt, "
    "zeroshot_classification_templates.txt; images + cls", default_split="test",
    detect=lambda p: True, read=_open_clip_benchmark,
    shard_path=lambda out, split, i, prefix: out / split / f"{i}.tar",
    sample_fields=lambda src, label, classes: {}, write_index=_write_nshards))


def _file_members(urls: list[str]):
    """``(shard index, open tar, member)`` for every file member of local tar shards, in order; an unreadable shard
    or tail ends that shard's walk silently (the callers count what they could read)."""
    for i, u in enumerate(urls):
        try:
            with tarfile.open(u, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        yield i, tf, m
        except (tarfile.TarError, OSError, EOFError):
            pass


def count_samples(urls: list[str]) -> int:
    """Number of distinct sample keys in local tar shards (reads tar headers only; an unreadable tail is ignored)."""
    return len({(i, m.name.split(".", 1)[0]) for i, _, m in _file_members(urls) if "." in Path(m.name).name})


def label_counts(urls: list[str]) -> dict[int, int]:
    """How many samples carry each integer label (the ``cls`` members of local tar shards; images are not read;
    a label that is not an integer, or an unreadable tar tail, is left out)."""
    from collections import Counter

    counts: Counter = Counter()
    for _, tf, m in _file_members(urls):
        if m.name.endswith(".cls"):
            try:
                counts[int(tf.extractfile(m).read().decode("ascii").strip())] += 1
            except (ValueError, UnicodeDecodeError):
                pass
    return dict(counts)


def labels_beyond(counts: dict[int, int], classes: int) -> tuple[dict[int, int], dict[int, int]]:
    """Split the label values outside ``[0, classes)`` into ``(set-level, sample-level)``: a value carried by at
    least ``max(2, ceil(n / classes / 2))`` samples (half an average class) is a class the class list lacks, so the
    list and the labels disagree and the set is refused; rarer values are corrupt labels on single samples, which
    are skipped and counted (``label_out_of_range``)."""
    import math

    n = sum(counts.values())
    many = max(2, math.ceil(n / max(1, classes) / 2))
    beyond = {v: c for v, c in sorted(counts.items()) if v < 0 or v >= classes}
    return {v: c for v, c in beyond.items() if c >= many}, {v: c for v, c in beyond.items() if c < many}

