"""Where a training run's batches come from after a resume: the stream positioned after the batches already
consumed, by seeking (O(1) in the steps done) wherever the loader allows it."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

__all__ = ["batch_source"]


def _cycle(loader: Iterable) -> Iterator[dict]:
    """Endless batches; passes are numbered and the loader's dataset re-seeded per pass when it supports it."""
    epoch, ds = 0, getattr(loader, "dataset", None)
    while True:
        got = False
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        epoch += 1
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise RuntimeError("training stream produced no batches (are the shards empty or all corrupt?)")


def batch_source(loader: Iterable, consumed: int = 0, cursors: dict | None = None) -> tuple[Iterator[dict], str]:
    """Endless batches starting after the first ``consumed`` ones, and how the start was reached.

    ``seek`` (O(1) in ``consumed``): a sequence is indexed (batch ``k`` is ``loader[k % len]``); a ``DataLoader``
    over a seekable ``TrainStream`` restarts each worker stream at its saved cursor, the loader's worker ``i``
    playing stream ``(consumed + i) % num_workers`` (the DataLoader visits workers round-robin, so that is the
    stream the uninterrupted run would have read next). ``replay``: any other iterable is re-read from the start.
    """
    if isinstance(loader, Sequence):
        if not len(loader):
            raise RuntimeError("training stream produced no batches (empty batch list)")

        def indexed():
            k = consumed
            while True:
                yield loader[k % len(loader)]
                k += 1

        return indexed(), "seek"
    ds = getattr(loader, "dataset", None)
    if getattr(ds, "seekable", False):
        ds.seek(cursors or {}, rotation=consumed % max(1, getattr(loader, "num_workers", 0)))

        def endless():
            yield from loader
            raise RuntimeError("the training stream ended")

        return endless(), "seek"
    stream = _cycle(loader)
    for _ in range(consumed):
        next(stream)
    return stream, "replay"
