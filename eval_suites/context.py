"""What an evaluation runs on: ``EvalSet`` (a shard set or an ImageNet val folder, with its class names, templates
and batches) and ``SuiteContext`` (every ``grace eval`` flag a suite may read, parsed and validated in one place: the
``NAME=DIR`` spellings (``split_named``, the one parser), eps, the runtime (process group and device, joined once by
``prepare``), and the resolution of set names: ``NAME=DIR``, a named set, a folder, the catalogue or
``<data_root>/<NAME>``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from grace_plugin.config import checked, validate
from grace_plugin.errors import GraceError, UsageError

from .attacks import NORMS, check_eps_for_norm, parse_eps

__all__ = ["EvalSet", "open_eval_set", "SuiteContext", "SetScoringError", "GeometryOptions", "ShiftOptions",
           "EvalStats", "split_named"]

log = logging.getLogger(__name__)


class SetScoringError(GraceError, ValueError):
    """A set that cannot be scored as asked (labels beyond its class list, skips under --strict, a mapping missing)."""


def split_named(text: str | Path, flag: str = "", required: bool = False) -> tuple[str | None, str]:
    """The one parser of ``NAME=DIR`` (``--data``, ``--ood``, ``--mapping``, suite arguments): ``"v2=/d/v2"`` ->
    ``("v2", "/d/v2")``; a path that exists (even one with ``=`` in it) or a plain name -> ``(None, text)``.
    ``required``: the ``NAME=`` part must be there. A missing name or path is one line naming ``flag``."""
    text = str(text)
    if "=" in text and not Path(text).exists():
        name, path = text.split("=", 1)
        if not name or not path:
            raise UsageError(f"{flag or 'argument'} {text!r}: expected NAME=PATH")
        return name, path
    if required:
        raise UsageError(f"{flag or 'argument'} {text!r}: expected NAME=PATH")
    return None, text


@dataclass
class EvalSet:
    """A data set a suite reads: a shard set or an ImageNet folder (``kind``), with its catalogue entry if any."""

    name: str
    path: Path
    kind: str  # "shards" | "imagenet"
    classnames: list[str] | None
    templates: list[str] | None
    urls: list[str] | None = None
    expected: int | None = None  # samples the layout promises
    entry: object | None = None  # shardsets.ShardSetEntry when the name is catalogued
    unlisted: list[str] = field(default_factory=list)  # tars the layout does not list (counted as unaccounted)

    def batches(self, transform, batch_size: int, n: int | None = None, num_workers: int = 0, decode: str = "pil",
                limit: int | None = None, whole: bool = False, num_classes: int | None = None):
        """This rank's batches (``whole``: every batch, on every rank); ``limit``: only the first ``limit`` samples
        (the attacked subset)."""
        ranks = (0, 1) if whole else None
        if self.kind == "imagenet":
            from .imagenet import imagenet_batches

            return imagenet_batches(self.path, transform, n=min(limit or n or 5000, 5000), batch_size=batch_size,
                                    ranks=ranks)
        from grace_plugin.data.loader import make_eval_loader

        return make_eval_loader(self.urls, transform, batch_size,
                                num_classes=num_classes or len(self.classnames or []) or None,
                                num_workers=0 if limit is not None else num_workers, decode=decode, limit=limit,
                                ranks=ranks)

    def files_signature(self, n: int | None = None) -> list:
        """``[[file, size, mtime_ns], ...]`` of what this set reads (local files; URLs as given)."""
        if self.kind == "imagenet":
            from .imagenet import imagenet_val_dir, subset_files

            d = imagenet_val_dir(self.path)
            files = [d / f for f in subset_files(min(n or 5000, 5000))]
        else:
            files = self.urls
        return files_signature(files)


def files_signature(files) -> list:
    """``[[file, size, mtime_ns], ...]`` of ``files`` (paths or URLs): what a resume state was computed from; a
    URL, or a path that is not a local file, as given with no size or mtime."""
    out = []
    for f in files:
        if os.path.exists(f):
            st = os.stat(f)
            out.append([str(Path(f)), st.st_size, st.st_mtime_ns])
        else:
            out.append([str(f), None, None])
    return out


def open_eval_set(name: str, path: str | Path) -> EvalSet:
    from grace_plugin.data.shards import open_shard_set

    from .imagenet import check_imagenet_folder, imagenet_classnames, is_imagenet_folder
    from .shardsets import get_shardset

    p = Path(path).expanduser()
    if is_imagenet_folder(p):
        check_imagenet_folder(p, n=0)  # classes now; subset files when read
        names, templates = imagenet_classnames()
        return EvalSet(name, p, "imagenet", names, templates, entry=get_shardset(name))
    s = open_shard_set(p)
    return EvalSet(name, p, "shards", s.classnames, s.templates, urls=s.urls, expected=s.expected,
                   entry=get_shardset(name), unlisted=s.unlisted)


@dataclass
class GeometryOptions:
    """Suite ``geometry``: images, power-iteration steps, Hutchinson samples, the attack for the Adv centroid, k of
    the LID estimate, and the loss whose Hessian is measured: ``clean`` (cross-entropy on the images) or
    ``adversarial`` (on the attack's adversarial images, found once at the model's weights and then held fixed)."""

    n: int = checked(64, gt=1)
    iters: int = checked(20, gt=0)
    samples: int = checked(8, gt=0)
    attack: str = "apgd-ce"
    lid_k: int = checked(20, gt=0)
    hessian_loss: str = checked("clean", choices=("clean", "adversarial"))

    def __post_init__(self):
        validate(self)


@dataclass
class ShiftOptions:
    """Suite ``shift``: images (VQA: questions) per set and the covariance ridge (None: scale-aware default); VQA
    fits its Gaussians on the first ``n_fit`` questions of the ID set's train split (classification: on the ID
    images scored)."""

    n: int = checked(1000, gt=1)
    ridge: float | None = None
    n_fit: int = checked(2000, gt=1)

    def __post_init__(self):
        validate(self)


@dataclass
class EvalStats:
    """What an evaluation records about itself while it runs (the report's ``startup`` and ``config.rank_split``)."""

    process_group: float | None = None  # seconds to join the torchrun process group (None: not yet joined)
    heads: float = 0.0  # seconds building zero-shot heads (text-tower forwards)
    rank_split: dict[str, str] = field(default_factory=dict)  # set name -> how the ranks share it


@dataclass
class SuiteContext:
    """Everything a suite may need; each field is a `grace eval` flag (or a tox environment variable)."""

    task: str = "classification"  # whose suites run (grace_plugin.tasks; eval_suites.engine.register_eval_task)
    id_set: tuple[str, str | Path] | str | None = None  # (NAME, DIR) or --data's text, [NAME=]DIR (NAME: "id")
    sets: dict[str, str | Path] = field(default_factory=dict)
    data_root: str | Path | None = None
    eps: float | str = 4 / 255  # a number or --eps's text (4/255); parsed and checked once, here
    norm: str = checked("Linf", flag="--norm", choices=NORMS)
    n_adv: int = checked(500, flag="--n-adv", ge=0)
    batch_size: int = checked(128, flag="--batch-size", gt=0)
    num_workers: int = checked(0, flag="--num-workers", ge=0)
    # shard decoding: "pil" (timm's PIL preprocessing exactly) or "tensor" (torchvision, faster)
    decode: str = checked("pil", flag="--decode", choices=("pil", "tensor"))
    device: str = "auto"  # "auto": CUDA when available (this rank's GPU under torchrun), else CPU
    seed: int = 0
    strict: bool = False
    scoring: str | None = None  # override every ood set's scoring: own | subset | mapping
    mapping_files: dict[str, str | Path] | list[str] = field(default_factory=dict)  # set -> JSON, or NAME=FILE texts
    unit_input: bool | None = None
    out_dir: str | Path | None = None  # resume state for adversarial suites lives under out_dir/state/
    imagenet_dir: str | Path | None = None
    corruptions_dir: str | Path | None = None
    n_imagenet: int = checked(5000, flag="--n-imagenet", gt=0)
    reference: str | None = None  # pretrained model spec for the parameter drift (geometry)
    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    shift: ShiftOptions = field(default_factory=ShiftOptions)
    model_info_name: str | None = None  # write RobustBench model_info JSON for adversarial results under this name
    # VQA: result files scored instead of a model's answers ([SET=]FILE texts, or set -> file), and the answers a
    # zero-shot CLIP scores (those of the ID set given at least this often)
    predictions: dict[str, str | Path] | list[str] = field(default_factory=dict)
    answers_min_count: int = checked(9, flag="--answers-min-count", gt=0)
    progress: bool = False
    # set by the engine while it runs: the suites of this evaluation (geometry and shift read their OOD sets from
    # them), what it records about itself, and a memo of opened sets, heads and clean results shared by the suites
    suite_names: list[str] = field(default_factory=list)
    stats: EvalStats = field(default_factory=EvalStats)
    cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self.eps = parse_eps(self.eps)
        if isinstance(self.id_set, (str, Path)):
            name, path = split_named(self.id_set, "--data")
            # a VQA set's name is its group's key (FRAMES-VQA's names) and its predictions file's: the folder's name
            self.id_set = (name or ("id" if self.task == "classification" else Path(path).name), path)
        if not isinstance(self.predictions, dict):
            self.predictions = dict(split_named(p, "--predictions") for p in self.predictions)
        if not isinstance(self.mapping_files, dict):
            self.mapping_files = dict(split_named(m, "--mapping", required=True) for m in self.mapping_files)
        validate(self)

    __validate__ = check_eps_for_norm

    def prepare(self) -> None:
        """Join the ``torchrun`` process group (when ``WORLD_SIZE`` > 1) and resolve ``device`` (``auto``: this
        rank's GPU, else the CPU), once for the whole evaluation."""
        if self.stats.process_group is not None:
            return
        import time

        from grace_plugin.runtime import init_distributed, resolve_device

        t0 = time.perf_counter()
        init_distributed()  # before choosing this rank's device
        self.stats.process_group = time.perf_counter() - t0
        self.device = str(resolve_device(self.device))

    def resolve_set(self, spec: str) -> tuple[str, Path]:
        """``NAME=DIR`` | a name in ``sets`` | a folder | the catalogued folder or ``<data_root>/<name>``."""
        from grace_plugin.data.shards import ShardSetError

        from .shardsets import get_shardset

        name, path = split_named(spec, "set")
        if name is not None:
            return name, Path(path)
        if spec in self.sets:
            return spec, Path(self.sets[spec])
        p = Path(spec).expanduser()
        if p.exists():
            return p.name, p
        entry = get_shardset(spec)
        if self.data_root is not None:
            if entry is not None and (Path(self.data_root) / entry.folder).exists():
                return spec, Path(self.data_root) / entry.folder
            if (Path(self.data_root) / spec).exists():
                return spec, Path(self.data_root) / spec
        if entry is not None and self.data_root is None:
            raise ShardSetError(f"set {spec!r}: a catalogued set name needs --data-root (its folder there is "
                                f"{entry.folder}/), or pass {spec}=DIR")
        known = sorted(self.sets) + ([f"<{self.data_root}>/*"] if self.data_root else [])
        raise ShardSetError(f"set {spec!r}: not a folder, not given with --ood NAME=DIR and not under --data-root "
                            f"(known: {', '.join(known) or 'none'})")

    def eval_set(self, name: str, path: str | Path) -> EvalSet:
        key = ("set", name, str(path))
        if key not in self.cache:
            self.cache[key] = open_eval_set(name, path)
        return self.cache[key]

    def id_eval_set(self) -> EvalSet:
        if self.id_set is None:
            raise UsageError("this suite needs an ID set: pass --data [NAME=]DIR")
        return self.eval_set(*self.id_set)
