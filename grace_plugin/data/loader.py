"""WebDataset streams for training and evaluation, with faults counted inside the stream.

Every batch is a dict ``{"image": float32[B,3,H,W] in [0,1], "label": int64[B], "skipped": {reason: count}}``.
A sample that cannot be used (undecodable image, missing image or label, bad label, truncated tar) becomes a skip
record that travels down the same stream as the good samples, so the counts survive DataLoader worker processes and
reach the report. Nothing is dropped silently.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import torch

from ..errors import GraceError
from .decode import DECODERS, SKIP_REASONS, tensor_path, decode_sample
from .tars import local_path, number_shards, plain_local_tar, tar_samples, index_tar, read_members

__all__ = ["make_eval_loader", "make_train_loader", "TrainStream", "NoUsableSamples", "rank_split",
           "DECODERS", "SKIP_REASONS"]

log = logging.getLogger(__name__)



def _count_skip(rec: dict, skipped: Counter, logged: set) -> bool:
    """Count a skip record by its reason (logging the first of each reason); False for a usable sample."""
    reason = rec.get("__skip__")
    if reason is None:
        return False
    skipped[reason] += 1
    if reason not in logged:
        logged.add(reason)
        log.warning("skipping sample %r in %s: %s (further '%s' skips are counted, not logged)",
                    rec.get("__key__"), rec.get("__url__"), reason, reason)
    return True


def collate(rows: list[dict]) -> dict:
    """Decoded samples -> one batch: tensors stacked, integer labels as a long tensor, other fields (a VQA
    question, its record) as lists; an empty batch has ``image`` and ``label`` of length 0."""
    if not rows:
        return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long)}
    out = {}
    for k in rows[0]:
        if k.startswith("__"):
            continue
        vals = [r[k] for r in rows]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif k == "label":
            out[k] = torch.tensor(vals, dtype=torch.long)
        else:
            out[k] = vals
    return out


def _batches(samples: Iterable[dict], batch_size: int, partial: bool = True) -> Iterator[dict]:
    rows, skipped = [], Counter()
    logged: set = set()
    pos = None
    for s in samples:
        pos = s.get("__pos__", pos)
        if _count_skip(s, skipped, logged):
            continue
        rows.append(s)
        if len(rows) == batch_size:
            batch = {**collate(rows), "skipped": dict(skipped)}
            if pos is not None:  # a seekable stream's position after this batch (TrainStream.seek)
                batch["cursor"] = pos
            yield batch
            rows, skipped = [], Counter()
    if (rows and partial) or skipped:
        yield {**collate(rows if partial else []), "skipped": dict(skipped)}


class NoUsableSamples(GraceError, ValueError):
    """A training stream with no usable sample in a full pass over its shards; the message names the folder."""


def make_eval_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                     num_workers: int = 0, draft_size: int | None = None, decode: str = "pil",
                     limit: int | None = None, ranks: tuple[int, int] | None = None,
                     target: Callable | None = None) -> torch.utils.data.DataLoader:
    """Every sample exactly once across ranks and workers, in shard order (batched inside the workers).
    ``target``: the task's fields of a raw sample (``decode_sample``); default the classification label.

    Batches are cut by position inside each shard: batch ``(s, k)`` holds the records ``k*B .. k*B+B-1`` of shard
    ``s`` (a skipped sample keeps its position and counts in that batch's ``skipped``), so which samples share a
    batch does not depend on the number of ranks or workers; each batch carries its ``"key": (s, k)``. Rank ``r`` of
    ``W`` (torchrun's ``RANK``/``WORLD_SIZE`` or the initialised process group) reads, with at least ``W`` shards,
    only the shards ``s % W == r`` (webdataset's ``split_by_node``: the others are never opened); with fewer shards,
    or with ``limit`` (the attacked subset, often inside one shard, whose cost must be shared evenly), it reads the
    batches with ``(s + k) % W == r`` (``rank_split`` says which). Workers split a rank's shards. ``limit``: only the
    first ``limit`` records of the stream (in shard order; needs ``num_workers=0``). ``ranks=(0, 1)``: every batch,
    whatever the world.

    ``decode``: ``pil`` (default: exactly timm's and RobustBench's PIL preprocessing) or ``tensor`` (torchvision
    decoding and tensor resize, ``decode_sample``'s ``tensor_transform``; PIL where the transform needs it)."""
    import webdataset as wds

    tt = tensor_path(transform, decode)
    if limit is not None and num_workers > 0:
        raise ValueError("make_eval_loader: limit counts records in shard order and needs num_workers=0")

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        number_shards,
        lambda src: _rank_shards(src, ranks, len(urls), limit),
        wds.split_by_worker,  # after the ranks' split: each rank's workers share its own shards
        lambda src: _owned_records(src, batch_size, limit, ranks, n_shards=len(urls)),
        wds.map(lambda s: s if "__skip__" in s else dict(
            decode_sample(s, transform, num_classes, draft_size, tt, target), __batch__=s["__batch__"])),
        _keyed_batches,
    )
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers)




def rank_split(n_shards: int, world: int, limit: int | None = None) -> str:
    """How an evaluation stream is shared by ``world`` ranks: ``"shards"`` (each rank owns whole shards) or
    ``"batches"`` (fewer shards than ranks, or a ``limit``ed stream: batches strided over the ranks)."""
    return "shards" if limit is None and n_shards >= world else "batches"


def _rank_world(ranks: tuple[int, int] | None) -> tuple[int, int]:
    import webdataset as wds

    return ranks or tuple(wds.utils.pytorch_worker_info()[:2])


def _rank_shards(items: Iterable[dict], ranks: tuple[int, int] | None, n_shards: int,
                 limit: int | None) -> Iterator[dict]:
    """When ranks own shards (``rank_split``), only this rank's (``s % W == r``); the others are never opened."""
    rank, world = _rank_world(ranks)
    by_shard = rank_split(n_shards, world, limit) == "shards"
    for item in items:
        if not by_shard or item["__shard__"] % world == rank:
            yield item


def _owned_records(items: Iterable[dict], batch_size: int, limit: int | None,
                   ranks: tuple[int, int] | None = None, n_shards: int = 0) -> Iterator[dict]:
    """Tar records tagged with their batch ``(shard, position // batch_size)``: every record of the shards given
    when ranks own shards (``_rank_shards`` chose them upstream), else this rank's batches ``(s + k) % W == r``;
    only the records kept have their members' data read from a local tar (``_lazy_members``)."""
    rank, world = _rank_world(ranks)
    by_shard = rank_split(n_shards, world, limit) == "shards"
    seen = 0
    for item in items:
        s = item["__shard__"]
        path = plain_local_tar(item["url"])
        with contextlib.ExitStack() as stack:  # the owned members are read through one handle per shard
            f = stack.enter_context(open(path, "rb")) if path is not None else None
            for i, rec in enumerate(tar_samples([{"url": item["url"]}], lazy=True)):
                if limit is not None and seen >= limit:
                    return
                seen += 1
                k = i // batch_size
                if by_shard or (s + k) % world == rank:
                    rec = read_members(rec, f)
                    rec["__batch__"] = (s, k)
                    yield rec


def _keyed_batches(records: Iterable[dict]) -> Iterator[dict]:
    """Group consecutive records of one batch key into ``{"image", "label", "skipped", "key"}``."""
    key, rows, skipped = None, [], Counter()
    logged: set = set()

    def emit():
        return {**collate(rows), "skipped": dict(skipped), "key": key}

    for r in records:
        if r["__batch__"] != key:
            if key is not None:
                yield emit()
            key, rows, skipped = r["__batch__"], [], Counter()
        if _count_skip(r, skipped, logged):
            continue
        rows.append(r)
    if key is not None:
        yield emit()




class TrainStream(torch.utils.data.IterableDataset):
    """Endless resampled training stream whose position can be *sought*, not replayed.

    Each (rank, worker) stream is a sequence of blocks. Block ``b`` draws shards with replacement from a generator
    seeded by ``(seed, epoch, rank, worker, b)`` until it holds ``shuffle_buffer`` samples (at least one shard, at
    most 64) and visits their samples in a permutation from the same generator. A block's content is therefore a
    function of those five numbers and the shards' headers, and a stream position is ``(block, offset)``: each batch
    carries ``cursor = (worker, block, offset after its last sample)``, and ``seek`` restarts every worker there by
    reading one block's tar headers, decoding nothing before it. Per-sample augmentation randomness is seeded from the
    sample's position, so it is the same whether the stream ran through or was sought (and whatever the workers).

    Every rank yields the same number of full batches (``batches_per_epoch``, or as many as the trainer asks for), so
    DDP never hangs on a short rank, whatever the number of shards (webdataset issues #225/#303: resampling + a fixed
    epoch length is the maintainers' recipe). Shards that are not local files fall back to webdataset's streaming
    reader (shard draws per ``(seed, epoch, rank, worker)``, a shuffle buffer), which cannot seek.
    """

    MAX_SHARDS_PER_BLOCK = 64

    def __init__(self, urls, transform, batch_size, num_classes=None, seed=0, shuffle_buffer=1000,
                 batches_per_worker=None, draft_size=None, decode="tensor", source=None, target=None):
        super().__init__()
        self.source = source or (os.path.dirname(urls[0]) if urls else "?")
        self.draft_size, self.tensor_transform = draft_size, tensor_path(transform, decode)
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.num_classes, self.seed, self.shuffle_buffer = num_classes, seed, shuffle_buffer
        self.batches_per_worker, self.target = batches_per_worker, target
        self.epoch = 0
        self.cursors: dict[int, tuple[int, int]] = {}
        self.rotation = 0
        self.local = all(local_path(u) for u in self.urls)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def seekable(self) -> bool:
        return self.local and self.batches_per_worker is None

    def seek(self, cursors: dict[int, tuple[int, int]], rotation: int = 0) -> None:
        """Start worker stream ``w`` at ``cursors[w] = (block, offset)``; the DataLoader's worker ``i`` plays stream
        ``(i + rotation) % num_workers`` (a resumed loader's first batch must come from the stream that was next)."""
        if not self.seekable:
            raise RuntimeError("this training stream cannot seek (remote shards or a fixed epoch length)")
        self.cursors = {int(k): (int(v[0]), int(v[1])) for k, v in cursors.items()}
        self.rotation = int(rotation)

    def _block(self, rank: int, stream: int, b: int, index, drawn: set | None = None) -> list[tuple[str, dict]]:
        import random

        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{stream}/{b}")
        entries: list[tuple[str, dict]] = []
        for _ in range(self.MAX_SHARDS_PER_BLOCK):
            url = self.urls[rng.randrange(len(self.urls))]
            if drawn is not None:
                drawn.add(url)
            entries.extend((url, e) for e in index(url))
            if len(entries) >= self.shuffle_buffer:
                break
        rng.shuffle(entries)
        return entries

    def _positioned(self, rank: int, stream: int) -> Iterator[dict]:
        """Samples (decoded or skip records) of one worker stream from its cursor, each with ``__pos__``."""
        import functools
        import random

        index = functools.lru_cache(maxsize=256)(lambda url: index_tar(local_path(url)))
        files: dict[str, object] = {}
        transform, n_cls, draft, tt = self.transform, self.num_classes, self.draft_size, self.tensor_transform
        b, off = self.cursors.get(stream, (0, 0))
        good, empty_blocks, drawn, skips = 0, 0, set(), Counter()
        try:
            while True:
                entries = self._block(rank, stream, b, index, drawn)
                for i in range(off, len(entries)):
                    url, e = entries[i]
                    pos = (stream, b, i + 1)
                    if "__skip__" in e:
                        skips[e["__skip__"]] += 1
                        yield {**e, "__pos__": pos}
                        continue
                    path = local_path(url)
                    f = files.get(path)
                    if f is None:
                        if len(files) >= 16:
                            files.pop(next(iter(files))).close()
                        f = files[path] = open(path, "rb")
                    raw = {"__key__": e["key"], "__url__": url}
                    for ext, (o, n) in e["members"].items():
                        f.seek(o)
                        raw[ext] = f.read(n)
                    seed = random.Random(f"{self.seed}/{self.epoch}/{rank}/{stream}/{b}/{i}").getrandbits(63)
                    with _seeded(seed):
                        s = decode_sample(raw, transform, n_cls, draft, tt, self.target)
                    good += "__skip__" not in s
                    if "__skip__" in s:
                        skips[s["__skip__"]] += 1
                    yield {**s, "__pos__": pos}
                empty_blocks = 0 if good else empty_blocks + 1
                # a stream where nothing is usable must fail, not spin: once every shard has been drawn (or after
                # many blocks, whichever comes first) with no usable sample, name the folder and the skip reasons
                if not good and (len(drawn) == len(self.urls) or empty_blocks > max(16, 4 * len(self.urls))):
                    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skips.items())) or "the shards hold no samples"
                    raise NoUsableSamples(f"{self.source}: no usable training sample in a full pass over its "
                                          f"{len(self.urls)} shard(s) ({reasons})")
                b, off = b + 1, 0
        finally:
            for f in files.values():
                f.close()

    def __iter__(self):
        import itertools
        import random

        import webdataset as wds

        rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
        if self.local:
            stream = (worker + self.rotation) % max(1, nworkers)
            it = _batches(self._positioned(rank, stream), self.batch_size, partial=False)
        else:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")

            # A stream where nothing is usable must fail, not spin: count the records a full pass over every shard
            # produces (``raw`` when the last unseen shard has been expanded) and fail if at least that many records
            # have been decoded without one usable sample.
            watch = {"drawn": set(), "raw": 0, "pass": None, "seen": 0, "good": 0, "skips": Counter()}

            def fail():
                reasons = (", ".join(f"{k}={v}" for k, v in sorted(watch["skips"].items()))
                           or "the shards hold no samples")
                raise NoUsableSamples(f"{self.source}: no usable training sample in a full pass over its "
                                      f"{len(self.urls)} shard(s) ({reasons})")

            def shards(_=None):
                while True:
                    if watch["pass"] is None and len(watch["drawn"]) == len(self.urls):
                        watch["pass"] = watch["raw"]  # every shard has been expanded once
                        if watch["raw"] == 0:
                            fail()
                    url = self.urls[rng.randrange(len(self.urls))]
                    watch["drawn"].add(url)
                    yield {"url": url}

            def counted(src):
                for sample in src:
                    watch["raw"] += 1
                    yield sample

            def checked(src):
                for sample in src:
                    watch["seen"] += 1
                    reason = sample.get("__skip__")
                    if reason is None:
                        watch["good"] += 1
                    else:
                        watch["skips"][reason] += 1
                        if not watch["good"] and watch["pass"] is not None and watch["seen"] >= watch["pass"]:
                            fail()
                    yield sample

            transform, n_cls, draft, tt = self.transform, self.num_classes, self.draft_size, self.tensor_transform
            pipeline = wds.DataPipeline(
                shards,
                tar_samples,
                counted,
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                            rng=random.Random(rng.random())),
                wds.map(lambda s: s if "__skip__" in s else decode_sample(s, transform, n_cls, draft, tt,
                                                                                  self.target)),
                checked,
                lambda src: _batches(src, self.batch_size, partial=False),
            )
            it = iter(pipeline)
        if self.batches_per_worker is not None:
            it = itertools.islice(it, self.batches_per_worker)
        yield from it


class _seeded:
    """Seed python's and torch's CPU generators for one sample's augmentation, restoring them afterwards (in the
    main process they are the trainer's). Only the CPU generator: ``torch.manual_seed`` would also seed CUDA, which
    on a CUDA build of PyTorch queues a lazy call with a stack trace per sample (about 30x the cost of seeding the
    CPU generator alone, measured by ``bench/loader.py --seeding``) and touches CUDA state from the data path."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import random

        self.py, self.pt = random.getstate(), torch.get_rng_state()
        random.seed(self.seed)
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc):
        import random

        random.setstate(self.py)
        torch.set_rng_state(self.pt)
        return False


def make_train_loader(urls: list[str], transform: Callable, batch_size: int, num_classes: int | None = None,
                      seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                      batches_per_epoch: int | None = None, draft_size: int | None = None,
                      decode: str = "tensor", source: str | None = None,
                      target: Callable | None = None) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over a ``TrainStream`` (batched in the workers); ``loader.dataset.set_epoch(e)`` re-seeds it.

    ``decode``: ``tensor`` (default for training: torchvision decoding and tensor resize, PIL where the transform
    needs it) or ``pil``.

    With ``batches_per_epoch`` every rank yields exactly that many batches per pass (split evenly over workers).
    """
    per_worker = None
    if batches_per_epoch is not None:
        if batches_per_epoch % max(1, num_workers):
            raise ValueError(f"batches_per_epoch {batches_per_epoch} must be divisible by num_workers {num_workers}")
        per_worker = batches_per_epoch // max(1, num_workers)
    ds = TrainStream(urls, transform, batch_size, num_classes, seed, shuffle_buffer, per_worker, draft_size, decode,
                     source=source, target=target)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
