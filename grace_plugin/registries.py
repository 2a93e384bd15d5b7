"""One registry per extension kind (recipes, attacks, suites): a name -> entry table filled by a decorator at import
time, listed sorted, and looked up with an error that names the valid choices. Tests parametrise over ``names()``."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry", "first_doc_line"]

T = TypeVar("T")


def first_doc_line(obj) -> str:
    return ((obj.__doc__ or "").strip().splitlines() or [""])[0]


class Registry(Generic[T]):
    def __init__(self, kind: str, error: type[Exception]):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry_of: Callable[[object], T] = lambda obj: obj):
        """A decorator storing ``entry_of(obj)`` under ``name`` and returning ``obj`` unchanged."""
        def deco(obj):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry_of(obj)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(f"unknown {self.kind} {name!r}; valid {self.kind}s: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def in_registration_order(self) -> list[T]:
        """The entries in the order they were registered (where order means something, e.g. which shard layout
        recognises a folder first)."""
        return list(self._entries.values())
