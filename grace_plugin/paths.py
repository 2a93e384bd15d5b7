"""The grace cache folder: one definition for every cached artefact (the testbed's tiny CLIP, the model registry).

``$GRACE_CACHE_DIR``, else ``$XDG_CACHE_HOME/grace_plugin``, else ``~/.cache/grace_plugin`` (the XDG base-directory
convention, https://specifications.freedesktop.org/basedir-spec/latest/, as timm and huggingface_hub use it).
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(sub: str = "") -> Path:
    """The grace cache folder, or ``sub`` below it (not created here)."""
    if os.environ.get("GRACE_CACHE_DIR"):
        base = Path(os.environ["GRACE_CACHE_DIR"]).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grace_plugin"
    return base / sub if sub else base
