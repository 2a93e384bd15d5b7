"""The shard-set catalogue (``catalogue.yaml``, data not code) and class-subset scoring.

ImageNet-R and -A carry 200 of the 1000 ImageNet classes. The standard protocol scores them by restricting a
1000-way head to their 200 ImageNet indices (pytorch-image-models #176); the indices are recovered from the set's own
``classnames.txt``, which CLIP_benchmark writes in ascending ImageNet-index order, by a monotone match against the
ID class names (duplicated names such as "crane" resolve by that order). ``scoring`` is a per-set field and a
per-run override, and the report records which was used.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from grace_plugin.errors import InputNotFound, UsageError, read_json

__all__ = ["ShardSetEntry", "list_shardsets", "get_shardset", "match_class_subset", "SCORINGS",
           "apply_mapping", "PAPER_COLUMNS"]

SCORINGS = ("own", "subset", "mapping")
PAPER_COLUMNS = ("v2", "sketch", "r", "a", "a-plus")


@dataclass(frozen=True)
class ShardSetEntry:
    name: str
    folder: str
    split: str = "test"
    scoring: str = "own"
    axis: str = "ood"
    source: str = ""
    mapping_file: str | None = None
    paper: str | None = None  # column in the paper's Table 6: v2 | sketch | r (OOD Avg), a | a-plus (Adv Avg)


@lru_cache(maxsize=1)
def _catalogue() -> dict[str, ShardSetEntry]:
    raw = yaml.safe_load(resources.files("eval_suites").joinpath("catalogue.yaml").read_text())
    out = {}
    for name, d in raw.items():
        entry = ShardSetEntry(name=name, **d)
        if entry.scoring not in SCORINGS:
            raise ValueError(f"catalogue.yaml: {name}.scoring must be one of {SCORINGS}, got {entry.scoring!r}")
        if entry.paper is not None and entry.paper not in PAPER_COLUMNS:
            raise ValueError(f"catalogue.yaml: {name}.paper must be one of {PAPER_COLUMNS}, got {entry.paper!r}")
        out[name] = entry
    return out


def list_shardsets() -> list[str]:
    return sorted(_catalogue())


def get_shardset(name: str) -> ShardSetEntry | None:
    return _catalogue().get(name)


def match_class_subset(subset_names: list[str], full_names: list[str]) -> list[int]:
    """Indices into ``full_names`` of ``subset_names`` (which are in ascending full-index order)."""
    out, last = [], -1
    for name in subset_names:
        idx = next((i for i in range(last + 1, len(full_names)) if full_names[i] == name), None)
        if idx is None:
            where = "at all" if name not in full_names else f"after index {last} (names must be in ascending order)"
            raise UsageError(f"class {name!r} of the subset is not among the ID class names {where}")
        out.append(idx)
        last = idx
    return out


def apply_mapping(mapping_file: str | Path, set_names: list[str], id_names: list[str]) -> dict[int, list[int]]:
    """``{set label: [ID indices]}`` from a JSON ``{set class name: [ID class names]}`` (e.g. ObjectNet's)."""
    p = Path(mapping_file)
    if not p.is_file():
        raise InputNotFound(f"{p}: mapping file not found")
    data = read_json(p, UsageError, "mapping file is not valid JSON")
    pos = {n: i for i, n in enumerate(id_names)}
    out = {}
    for label, name in enumerate(set_names):
        targets = data.get(name)
        if not targets:
            raise UsageError(f"{p}: no mapping for class {name!r}")
        missing = [t for t in targets if t not in pos]
        if missing:
            raise UsageError(f"{p}: {name!r} maps to unknown ID classes {missing[:3]}")
        out[label] = [pos[t] for t in targets]
    return out
