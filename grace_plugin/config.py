"""Typed configuration: dataclass defaults < YAML file < ``--set a.b=value`` overrides (docs/cli.md "Command line
and report.json").

Every section is a dataclass; recipes bring their own ``RecipeConfig`` subclass. Overrides are validated against
the dataclass fields, so a typo is an error naming the field and the valid choices instead of a silent no-op.

Value constraints live beside the fields, as ``checked(default, gt=0)`` (dataclass field metadata), and
:func:`validate` checks a resolved config (recursively, every section) before any work: one line naming the field
(``train.batch_size=0: must be > 0``) or, for a dataclass whose fields are command-line flags, the flag
(``--n-adv -5: must be >= 0``). Cross-field rules go in a ``__validate__(self)`` method that raises ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import yaml

from .errors import GraceError

__all__ = ["ConfigError", "TrainConfig", "DataConfig", "RunConfig", "parse_overrides", "apply_overrides",
           "load_yaml", "to_dict", "checked", "Constraint", "validate", "timm_optimizer_names",
           "timm_scheduler_names", "resume_differences", "RESUME_MAY_CHANGE"]


class ConfigError(GraceError, ValueError):
    """A bad configuration value or field; the message names the field."""


# ---------------------------------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Constraint:
    """Bounds and choices of one field. ``choices`` may be a callable returning them (looked up when validating);
    ``test`` a callable ``value -> error text or None`` for anything else. ``None`` values are not checked (the
    field's type says whether ``None`` is allowed)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: Any = None
    test: Any = None

    def error(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value) and any(b is not None for b in (self.gt, self.ge, self.lt, self.le)):
                return "must be a finite number"
            for bound, ok, word in ((self.gt, lambda v, b: v > b, ">"), (self.ge, lambda v, b: v >= b, ">="),
                                    (self.lt, lambda v, b: v < b, "<"), (self.le, lambda v, b: v <= b, "<=")):
                if bound is not None and not ok(value, bound):
                    return f"must be {word} {bound:g}"
        if self.choices is not None:
            choices = self.choices() if callable(self.choices) else self.choices
            if value not in choices:
                return f"valid: {', '.join(map(str, choices))}"
        if self.test is not None:
            return self.test(value)
        return None


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, flag: str | None = None,
            **bounds: Any) -> Any:
    """A dataclass field with a :class:`Constraint` (``gt``, ``ge``, ``lt``, ``le``, ``choices``, ``test``).

    ``flag``: the command-line flag this field comes from, named in the error instead of the field."""
    meta = {"constraint": Constraint(**bounds)}
    if flag:
        meta["flag"] = flag
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def validate(obj: Any, prefix: str = "") -> Any:
    """Check every declared constraint (and ``__validate__`` hooks) of dataclass ``obj`` and its sub-sections.

    Returns ``obj``; raises :class:`ConfigError` with one line naming the first bad field (or flag)."""
    if not is_dataclass(obj) or isinstance(obj, type):
        return obj
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            validate(value, prefix=f"{prefix}{f.name}.")
            continue
        c = f.metadata.get("constraint")
        msg = c.error(value) if c is not None else None
        if msg:
            flag = f.metadata.get("flag")
            where = f"{flag} {_fmt(value)}" if flag else f"{prefix}{f.name}={_fmt(value)}"
            raise ConfigError(f"{where}: {msg}")
    hook = getattr(obj, "__validate__", None)
    if callable(hook):
        hook()
    return obj


def timm_optimizer_names(name: str) -> str | None:
    """Error text unless ``timm.optim.create_optimizer_v2`` builds ``name`` (probed on one dummy parameter;
    timm 1.0 has no list of names)."""
    import torch
    from timm.optim import create_optimizer_v2

    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=name, lr=1e-3)
    except (AssertionError, ValueError, KeyError, ImportError):
        return "not an optimizer timm.optim.create_optimizer_v2 builds (e.g. adamw, sgd, momentum, lamb, lion)"
    return None


# timm.scheduler.create_scheduler_v2 (timm 1.0.9) returns None for any other name; these are the names it builds
# that step per update (plateau needs a validation metric, which the trainer does not feed it).
_TIMM_SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly")


def timm_scheduler_names() -> tuple[str, ...]:
    return _TIMM_SCHEDULERS


@dataclass
class TrainConfig:
    """Optimisation loop settings shared by every recipe (the trainer reads only these)."""

    steps: int | None = checked(None, gt=0)  # exactly one of steps/epochs; None for both means 1 epoch
    epochs: float | None = checked(None, gt=0)
    batch_size: int = checked(64, gt=0)
    grad_accum: int = checked(1, ge=1)
    opt: str = checked("adamw", test=timm_optimizer_names)  # any name timm.optim.create_optimizer_v2 accepts
    lr: float = checked(1e-4, ge=0)
    weight_decay: float = checked(0.1, ge=0)
    sched: str = checked("cosine", choices=timm_scheduler_names)  # names timm.scheduler.create_scheduler_v2 builds
    warmup_steps: int = checked(0, ge=0)
    min_lr: float = checked(0.0, ge=0)
    grad_clip: float | None = checked(1.0, ge=0)
    precision: str = checked("auto", choices=("auto", "bf16", "fp32"))  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    num_workers: int = checked(0, ge=0)
    shuffle_buffer: int = checked(1000, ge=1)
    log_every: int = checked(10, ge=1)
    ckpt_every: int = checked(0, ge=0)  # 0: only at the end
    max_bad_steps: int = checked(5, ge=1)  # stop after this many consecutive non-finite losses
    device: str = "auto"
    ema_decay: float | None = checked(None, gt=0, lt=1)  # timm ModelEmaV3; the exported weights are the EMA's
    tensorboard: bool = False  # also log to RUN_DIR/tb (needs the `tensorboard` package)
    # keep the final resumable state in the run folder: `--resume --steps N` then extends the run without re-reading
    # its stream (false saves the disk it takes: trainable weights and optimizer state)
    keep_state: bool = True
    # signals that make `grace train` save its state at the next step boundary and exit 75 ("": none)
    preempt_signals: str = checked("SIGTERM,SIGUSR1", test=lambda v: _error_of(_parse_signals, v))
    # robust validation during training (grace_plugin/robust_validation.py); 0: never
    val_every: int = checked(0, ge=0)  # steps between checks (and one at the last step)
    val_n: int = checked(512, ge=1)  # images of data.val_split (the first ones, in shard order)
    # > 0: each check also scores the first this many images of data.train_split (train_clean, train_robust): the
    # train-test robust gap of robust overfitting (Rice et al., arXiv 2002.11569, Fig. 1); 0: held-out images only
    val_train_n: int = checked(0, ge=0)
    # pgdN (l_inf PGD, N steps of 2.5 eps/N, no random start) | none
    val_attack: str = checked("pgd10", test=lambda v: _error_of(parse_val_attack, v))
    val_eps: float | None = checked(None, ge=0, le=1)  # None: the recipe's training eps (recipe.pgd_eps), else 4/255
    # exported weights: last | best_robust | best_hm (harmonic mean of clean and robust)
    select: str = checked("last", choices=lambda: SELECT_RULES)
    # stop when robust acc falls by more than this many points while clean rises
    co_guard: float | None = checked(None, ge=0)

    def __validate__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"train.steps={self.steps} and train.epochs={self.epochs}: give one of them, not both")
        if self.select != "last" and not self.val_every:
            raise ConfigError(f"train.select={self.select} needs validation checks: set train.val_every > 0")
        if self.co_guard is not None and not self.val_every:
            raise ConfigError(f"train.co_guard={self.co_guard:g} needs validation checks: set train.val_every > 0")


@dataclass
class DataConfig:
    """Where the training shards live and how samples become tensors."""

    train_split: str = "train"
    # GRACE (arXiv 2603.27139) states no augmentation; our default "none" trains on the eval transform
    # (CLIP/WiSE-FT style), "rrc" uses timm's RandomResizedCrop + flip derived from the model's pretrained cfg.
    augment: str = checked("none", choices=("none", "rrc"))
    # "tensor": decode with torchvision and resize uint8 tensors (about 2x faster than PIL for photos, within 2 grey
    # levels of it); "pil": timm's PIL transform exactly. Not a paper setting (the paper states no preprocessing
    # detail); training on the faster path is the default, evaluation stays on PIL (grace eval --decode).
    decode: str = checked("tensor", choices=("tensor", "pil"))
    val_split: str = "test"  # the split train.val_every checks read (its first train.val_n images)
    # the task (grace_plugin/tasks.py): classification, or vqa (image + question -> answer)
    task: str = checked("classification", choices=("classification", "vqa"))
    # vqa: the answer head's vocabulary, every annotator answer given at least this often in the train split
    # (VQAv2's 3,129 answers are min count 9, Teney et al. arXiv 1708.02711 §3), at most answers_max of them
    answers_min_count: int = checked(9, ge=1)
    answers_max: int | None = None


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Any = None  # a RecipeConfig dataclass instance


# the rules of the robust-validation fields (grace_plugin/robust_validation.py runs the checks)
SELECT_RULES = ("last", "best_robust", "best_hm")


def parse_val_attack(spec: str) -> int:
    """``pgdN`` -> N attack steps (``pgd10`` is PGD-10); ``none`` -> 0 (clean accuracy only)."""
    if spec == "none":
        return 0
    m = re.fullmatch(r"pgd(\d+)", spec)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown validation attack {spec!r}; valid: pgdN (N >= 1, e.g. pgd10) or none")
    return int(m.group(1))


def _parse_signals(spec: str) -> list:
    from .preemption import parse_signals  # imports signal and subprocess: only when a config is validated

    return parse_signals(spec)


def _error_of(parse, value) -> str | None:
    """The message of the ValueError ``parse(value)`` raises, else None (a ``checked(test=...)`` from a parser)."""
    try:
        parse(value)
    except ValueError as e:
        return str(e)
    return None


# Fields a resumed run may change: the run length and how it reports; everything else changes what is computed.
RESUME_MAY_CHANGE = ("train.steps", "train.epochs", "train.log_every", "train.ckpt_every", "train.tensorboard",
                     "train.max_bad_steps", "train.keep_state", "train.preempt_signals")


def resume_differences(saved: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of fields whose values differ between two resolved configs (``to_dict`` form), except
    ``RESUME_MAY_CHANGE``; ``"field (old -> new)"`` each."""
    out = []
    for k in sorted(set(saved) | set(new)):
        name = f"{prefix}{k}"
        a, b = saved.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += resume_differences(a, b, prefix=f"{name}.")
        elif a != b and name not in RESUME_MAY_CHANGE:
            out.append(f"{name} ({a!r} -> {b!r})")
    return out


def to_dict(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["train.lr=3e-5", "recipe.rho=0.1"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"malformed --set {item!r}: expected key=value, e.g. train.lr=3e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"malformed --set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"malformed --set {item!r}: value is not valid YAML ({e})") from None
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
            try:
                value = float(value) if any(ch in value for ch in ".eE") else int(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with an earlier value for {p!r}")
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at top level")
    return data


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        vals = [_coerce(v, inner, where) for v in value]
        return tuple(vals) if origin is tuple else vals
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def apply_overrides(obj: Any, updates: Mapping[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` applied; unknown fields raise ConfigError."""
    if not is_dataclass(obj):
        raise ConfigError(f"{prefix or 'config'} is not a configurable section")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    changes = {}
    for key, value in updates.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config field {where!r}; valid fields: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if is_dataclass(current) and not isinstance(current, type):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where} is a section; set its fields, e.g. {where}.<field>=...")
            changes[key] = apply_overrides(current, value, prefix=f"{where}.")
        else:
            changes[key] = _coerce(value, hints.get(key, Any), where)
    return dataclasses.replace(obj, **changes)
