"""Reading WebDataset tars: samples grouped from members (streamed, or read lazily by offset from local tars),
truncation and damage turned into skip records, and member indexes for seekable training streams.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

from .decode import skip_record
from .shards import IMAGE_KEYS

__all__ = ["index_tar", "read_members"]

log = logging.getLogger(__name__)


_warned: set = set()


def _warn_once(url: str, reason: str, msg: str, *args) -> None:
    """A broken shard drawn again and again (resampled training) is logged once per process, then only counted."""
    if (url, reason) not in _warned:
        _warned.add((url, reason))
        log.warning(msg, *args)


_MAX_PENDING = 256  # incomplete samples waiting for a non-contiguous member (bounded memory)


def _complete(sample: dict) -> bool:
    return "cls" in sample and any(k in sample for k in IMAGE_KEYS)


class _Member:
    """A tar member's data not read yet: ``(path, offset, size)``; ``read()`` reads it (``_lazy_members``)."""

    __slots__ = ("path", "offset", "size")

    def __init__(self, path: str, offset: int, size: int):
        self.path, self.offset, self.size = path, offset, size

    def read(self, f=None) -> bytes:
        """The bytes, from ``f`` (the tar, already open) or by opening ``path``."""
        if f is None:
            with open(self.path, "rb") as f:
                return self.read(f)
        f.seek(self.offset)
        return f.read(self.size)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def plain_local_tar(url: str) -> str | None:
    """The path of ``url`` when it is a local, uncompressed file (what ``_lazy_members`` can index), else None."""
    path = local_path(url)
    if path is None:
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return None if head.startswith(_COMPRESSED_MAGIC) else path


def _lazy_members(path: str) -> Iterator[dict]:
    """webdataset's ``tar_file_iterator`` (the same tarfile header walk, the same member filters) without reading
    any data: each ``data`` is a :class:`_Member`. A member whose data runs past the end of the file raises
    ``tarfile.ReadError`` where reading it would have, so the samples, skips and errors are the streaming reader's
    (tests/test_loader_lazy.py compares the two on the fault table's shards). Why: under ``torchrun`` each rank
    scores only its own batches; reading only their bytes keeps a rank's I/O at 1/W of the set instead of all of it."""
    import re
    import tarfile

    size = os.path.getsize(path)
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            name = info.name
            if not info.isreg() or name is None:
                continue
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or re.match(r"__[^/]*__($|/)",
                                                                                                name):
                continue  # webdataset's meta-member filters (tariterators.tar_file_iterator)
            if info.offset_data + info.size > size:
                raise tarfile.ReadError("unexpected end of data")
            yield {"fname": name, "data": _Member(path, info.offset_data, info.size)}


def _members(item: dict, lazy: bool) -> Iterator[dict]:
    from webdataset.tariterators import tar_file_iterator, url_opener

    path = plain_local_tar(item["url"]) if lazy else None
    if path is not None:
        yield from _lazy_members(path)
        return
    for src in url_opener([dict(item)]):
        yield from tar_file_iterator(src["stream"])


def read_members(rec: dict, f=None) -> dict:
    """A record of ``_shard_samples(..., lazy=True)`` with its members' data read (from ``f``, its open tar, if
    given)."""
    return {k: (v.read(f) if isinstance(v, _Member) else v) for k, v in rec.items()}


def _shard_samples(item: dict, lazy: bool = False) -> Iterator[dict]:
    """One shard's samples, every member accounted for.

    webdataset's ``group_by_keys`` groups *consecutive* members by key. Here (a) a key whose members are not
    consecutive is merged (held, bounded, until its image and label are both seen) instead of becoming two
    half-samples and two skips; (b) a repeated member makes *that* sample a ``duplicate_member`` skip instead of
    an exception that drops the rest of the shard; (c) a tar cut inside a member still yields every complete
    sample before the cut, then one ``tar_error`` for the cut; (d) a member of a key already scored that brings
    another image or label is a ``duplicate_member`` skip (metadata-only members of it are ignored).
    ``lazy``: a local uncompressed tar's data is not read (each member is a ``_Member``; ``read_members``).
    """
    from webdataset.tariterators import base_plus_ext

    url = item["url"]
    pending: dict[str, dict] = {}
    done: set = set()
    out: list[dict] = []

    def finish(group: dict | None) -> None:
        if group is None:
            return
        key = group["__key__"]
        if group.pop("__dup__", False):
            pending.pop(key, None)
            done.add(key)
            out.append(skip_record("duplicate_member", key, url))
            return
        if key in done:
            if "cls" in group or any(k in group for k in IMAGE_KEYS):
                out.append(skip_record("duplicate_member", key, url))
            return
        if key in pending:
            prev = pending.pop(key)
            if set(prev) & set(group) - {"__key__", "__url__"}:
                done.add(key)
                out.append(skip_record("duplicate_member", key, url))
                return
            group = {**prev, **group}
        if _complete(group):
            done.add(key)
            out.append(group)
            return
        pending[key] = group
        if len(pending) > _MAX_PENDING:  # the oldest incomplete sample is given up (decode_sample names why)
            oldest = next(iter(pending))
            done.add(oldest)
            out.append(pending.pop(oldest))

    current = None
    error = None
    try:
        for f in _members(item, lazy):
            prefix, suffix = base_plus_ext(f["fname"])
            if prefix is None:
                continue
            suffix = suffix.lower()
            if current is None or prefix != current["__key__"]:
                finish(current)
                current = {"__key__": prefix, "__url__": url}
                yield from out
                out.clear()
            if suffix in current:
                current["__dup__"] = True
            else:
                current[suffix] = f["data"]
    except Exception as e:  # tarfile.ReadError, EOFError, OSError for truncated or unreadable shards
        error = e
    if error is not None and current is not None and not _complete(current):
        key = current["__key__"]  # the sample the cut went through: it is the tar_error below
        pending.pop(key, None)
        current = None
    finish(current)
    done.update(pending)
    out.extend(pending.values())  # never completed: decode_sample counts them as missing_image/missing_label
    yield from out
    if error is not None:
        _warn_once(url, "tar", "shard %s: unreadable from here on (%s); counted as tar_error", url,
                   type(error).__name__)
        yield skip_record("tar_error", "", url)
    elif _truncated_local_tar(url):
        _warn_once(url, "trunc", "shard %s: no end-of-archive marker (truncated); counted as tar_error", url)
        yield skip_record("tar_error", "", url)


def tar_samples(urls: Iterable[dict], lazy: bool = False) -> Iterator[dict]:
    """Expand shards into samples (:func:`_shard_samples`); a broken tar yields one ``tar_error`` skip."""
    for item in urls:
        yield from _shard_samples(item, lazy)


def _truncated_local_tar(url: str) -> bool:
    """Python's tarfile stops silently when a file is cut at a header; a complete tar ends with 2 zero blocks."""
    path = plain_local_tar(url)  # a compressed tar's end is checked by its decompressor (a cut stream raises)
    if path is None:
        return False
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def local_path(url: str) -> str | None:
    path = url[len("file://"):] if url.startswith("file://") else url
    return path if "://" not in path and not path.startswith("pipe:") and os.path.isfile(path) else None


def number_shards(src: Iterable[dict]) -> Iterator[dict]:
    for i, item in enumerate(src):
        yield dict(item, __shard__=i)


def index_tar(path: str) -> list[dict]:
    """The samples of a local tar from its headers alone (no image is read): a list of ``{"key", "members": {ext:
    (offset, size)}}`` in file order, grouped as webdataset groups them (``base_plus_ext``, lower-case extension),
    plus ``{"__skip__": "tar_error"}`` entries for a sample with a repeated member, a member cut short, an unreadable
    header or a missing end-of-archive marker (each counted, as the streaming reader counts them)."""
    import tarfile

    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    out: list[dict] = []
    cur: dict | None = None

    def close():
        if cur is not None:
            out.append(cur if "__bad__" not in cur else skip_record("tar_error", cur["key"], path))

    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None:
                    continue
                ext = ext.lower()
                if cur is None or cur["key"] != key:
                    close()
                    cur = {"key": key, "members": {}}
                if ext in cur["members"] or m.offset_data + m.size > size:
                    cur["__bad__"] = True
                cur["members"][ext] = (m.offset_data, m.size)
    except Exception as e:  # tarfile.ReadError, EOFError, OSError for a truncated or unreadable shard
        log.warning("shard %s: unreadable from here on (%s); counted as tar_error", path, type(e).__name__)
        close()
        cur = None
        out.append(skip_record("tar_error", "", path))
    close()
    if _truncated_local_tar(path) and not (out and out[-1].get("__skip__") == "tar_error"):
        out.append(skip_record("tar_error", "", path))
    return out
