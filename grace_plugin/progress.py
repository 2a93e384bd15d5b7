"""Progress for people and for log files: a live tqdm bar on a terminal, plain lines in a batch job's log.

A redrawn bar written to a file is a stream of ``\\r`` updates (tens of MB for a long run); timm's and open_clip's
training scripts log a line every N steps instead. ``progress(...)`` returns tqdm when stderr is a terminal and a
``LogProgress`` otherwise, which writes one line at each tenth of the total, at most every ``interval`` seconds in
between (and at the end), with the rate, the ETA and the postfix (e.g. the loss). ``GRACE_PROGRESS=bar|log|off``
overrides the choice.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable

__all__ = ["progress", "LogProgress"]


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LogProgress:
    """The part of tqdm's interface this package uses (``update``, ``set_postfix``, ``close``, iteration), written
    as plain lines."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, interval: float = 60.0, stream=None, silent: bool = False):
        self.iterable, self.desc, self.unit, self.interval = iterable, desc, unit, interval
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n, self.written_n = total, initial, initial, initial
        self.silent = silent
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict = {}
        self.t0 = self.last_t = time.monotonic()
        self.last_tenth = self._tenth(initial)
        self.closed = False

    def _tenth(self, n: int) -> int:
        return 10 * n // self.total if self.total else 0

    def line(self) -> str:
        dt = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total} {self.unit}s ({100 * self.n / self.total:.0f}%)"
                                               if self.total else f" {self.unit}s"),
                 f"{rate:.2f} {self.unit}/s", f"elapsed {_hms(dt)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {_hms((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _write(self) -> None:
        self.last_t, self.written_n = time.monotonic(), self.n
        if not self.silent:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = self._tenth(self.n)
        if tenth > self.last_tenth or time.monotonic() - self.last_t >= self.interval:
            self.last_tenth = tenth
            self._write()

    def set_postfix(self, postfix: dict | None = None, **kwargs) -> None:
        self.postfix = {**(postfix or {}), **kwargs}

    def close(self) -> None:
        """A last line, unless the last one written already says where the count ended."""
        if not self.closed and self.n != self.written_n:
            self._write()
        self.closed = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             initial: int = 0, leave: bool = True):
    """A progress display: tqdm on a terminal, ``LogProgress`` lines elsewhere, a silent ``LogProgress`` with
    ``GRACE_PROGRESS=off``."""
    mode = os.environ.get("GRACE_PROGRESS") or ("bar" if sys.stderr.isatty() else "log")
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, silent=mode == "off")
