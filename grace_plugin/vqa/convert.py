"""``grace shards convert --format frames|coco-vqa``: a VQA set's records and images -> WebDataset shards in the
``vqa`` layout (``grace_plugin.data.shards``): ``OUT/<split>/{0..N-1}.tar`` + ``nshards.txt``, and ``OUT/vqa.json``
naming the set, its FRAMES-VQA group and, per split, how many questions were written and which were skipped.

Each sample is one question: its image's bytes as they are (no re-encoding; an image asked about several times is
stored with each of its questions, as WebDataset samples are self-contained) and ``json``: the record
(``records.check_record``'s shape). A question whose image is missing or unreadable is skipped and counted by reason;
the skipped question ids are written to ``OUT/<split>/skipped.json`` (``strict`` refuses instead): nothing is dropped
silently. Shards are written to temp files renamed when complete.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.shards import VQA_INFO
from ..errors import InputNotFound, UsageError, read_json
from ..tensor_io import atomic_write_text
from .records import RecordFormatError, get_format

__all__ = ["VqaConvertResult", "convert_vqa", "write_vqa_split", "VQA_INFO", "IMAGE_EXT"]

IMAGE_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class VqaConvertResult:
    out: Path
    split: str
    shards: int
    questions: int
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.out}: {self.questions} questions in {self.shards} shards (vqa, split {self.split}); "
                f"skipped: {skipped} (their ids in {self.out / self.split / 'skipped.json'})")


class StrictConvertError(UsageError):
    pass


def _image(images: Path, rec: dict) -> tuple[bytes | None, str]:
    """(bytes, extension) of a record's image, or (None, skip reason)."""
    from ..data.decode import check_image_header

    path = images / rec["image"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "image_missing"
    except OSError:
        return None, "image_unreadable"
    fmt = check_image_header(data)
    if fmt not in IMAGE_EXT:
        return None, "image_unreadable"
    return data, IMAGE_EXT[fmt]


def write_vqa_split(records: list[dict], image_of, out: str | Path, split: str, name: str | None = None,
                    group: str | None = None, maxcount: int = 1000, strict: bool = False,
                    source: str = "") -> VqaConvertResult:
    """Write ``records`` (common shape) as split ``split`` of the VQA set ``out``; ``image_of(record) -> (bytes,
    ext) | (None, reason)``. Used by the converter and by the testbed's VQA world."""
    import webdataset as wds

    if maxcount <= 0:
        raise UsageError(f"--maxcount must be > 0, got {maxcount}")
    if group not in (None, "id", "near", "far"):
        raise UsageError(f"--group must be id, near or far, got {group!r}")
    ids = [r["question_id"] for r in records]
    if len(set(map(str, ids))) != len(ids):
        raise RecordFormatError(f"{source or out}: question ids repeat; each question must have its own id")
    out = Path(out)
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("*.tar"):  # a re-conversion replaces the split as a whole
        old.unlink()
    skipped: dict[str, list] = {}
    written = shard = 0
    sink = f = tmp = None

    def close():
        nonlocal sink, f
        if sink is not None:
            sink.close()
            f.close()
            os.replace(tmp, split_dir / f"{shard}.tar")
            sink = f = None

    for i, rec in enumerate(records):
        data, ext = image_of(rec)
        if data is None:
            if strict:
                raise StrictConvertError(f"{source or out}: question_id {rec['question_id']!r}: {ext} "
                                         f"({rec['image']}); --strict refuses the set")
            skipped.setdefault(ext, []).append(rec["question_id"])
            continue
        if sink is not None and written and written % maxcount == 0:
            close()
            shard += 1
        if sink is None:
            tmp = split_dir / f".{shard}.tar.tmp{os.getpid()}"
            f = open(tmp, "wb")
            sink = wds.TarWriter(f, mtime=0)  # mtime 0: the same inputs give the same bytes
        sink.write({"__key__": f"q{i:08d}", ext: data, "json": rec})
        written += 1
    close()
    n_shards = shard + 1 if written else 0
    if not written:
        raise RecordFormatError(f"{source or out}: no question has a readable image "
                                f"({', '.join(f'{k}: {len(v)}' for k, v in skipped.items())})")
    atomic_write_text(split_dir / "nshards.txt", f"{n_shards}\n")
    atomic_write_text(split_dir / "skipped.json", json.dumps(skipped, indent=1) + "\n")
    info_file = out / VQA_INFO
    info = read_json(info_file) if info_file.is_file() else {"task": "vqa", "name": name or out.name, "splits": {}}
    if group is not None:
        info["group"] = group
    if name is not None:
        info["name"] = name
    info.setdefault("splits", {})[split] = {"questions": written, "shards": n_shards, "source": source,
                                            "skipped": {k: len(v) for k, v in sorted(skipped.items())}}
    atomic_write_text(info_file, json.dumps(info, indent=2, sort_keys=True) + "\n")
    return VqaConvertResult(out, split, n_shards, written, {k: len(v) for k, v in skipped.items()})


def convert_vqa(fmt: str, args: dict, images: str | Path, out: str | Path, split: str, name: str | None = None,
                group: str | None = None, maxcount: int = 1000, strict: bool = False) -> VqaConvertResult:
    """Read a VQA set in format ``fmt`` (``records.list_formats``; ``args``: its flags) and write it to ``out``."""
    f = get_format(fmt)
    missing = [k for k in f.needs if not args.get(k)]
    if missing:
        raise UsageError(f"--format {fmt} needs {', '.join('--' + k.replace('_', '-') for k in missing)}")
    images = Path(images)
    if not images.is_dir():
        raise InputNotFound(f"{images}: --images folder does not exist")
    records = f.read(args)
    if not records:
        raise RecordFormatError(f"{args.get('records') or args.get('questions')}: holds no question")
    return write_vqa_split(records, lambda r: _image(images, r), out, split, name, group, maxcount, strict,
                           source=f"{fmt}:{args.get('records') or args.get('questions')}")
