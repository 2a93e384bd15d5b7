"""The one exception family for user mistakes.

Anything a user can get wrong (a path, a config field, a flag, a name, a file's contents) raises a subclass of
:class:`GraceError` whose message names the file, field or flag. The ``grace`` CLI prints such an error as one
line and exits 2; every other exception is a bug in this package and keeps its traceback (exit 1).

Subclasses may also derive from a builtin (``ValueError``, ``KeyError``, ``FileNotFoundError``) so library callers
that catch the builtin keep working; the CLI catches only ``GraceError``.
"""
from __future__ import annotations

__all__ = ["BrokenInstall", "GraceError", "InputNotFound", "UsageError", "read_json"]


class GraceError(Exception):
    """Base of every user-facing error: the message is one line naming what to fix."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise print their message quoted
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(GraceError, ValueError):
    """A bad flag, config value or argument combination; the message names the flag or field."""


class InputNotFound(GraceError, FileNotFoundError):
    """A path the user named does not exist; the message names the path and what it was for."""


class BrokenInstall(GraceError, ImportError):
    """A dependency whose installed files are not the ones its own wheel recorded; the message says how to repair."""


def read_json(path, error: type[GraceError] = UsageError, what: str = "not valid JSON"):
    """The parsed contents of a JSON file; one that cannot be read or parsed raises ``error`` naming the file."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{path}: {what} ({e})") from None
