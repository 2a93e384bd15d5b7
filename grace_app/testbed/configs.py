"""The testbed's settings as data: configs/testbed/ (methods, studies, tuning grids, selected values).

One run's config is built by ``grace_plugin.finetune.build_config`` (the code that loads configs/paper/) from layered
files: dataclass defaults < ``common.yaml`` < ``attack.yaml`` (adversarial methods) < the method's files (default
``<recipe>.yaml``) < the method's ``set`` < its entry in ``tuned.yaml`` < the caller's overrides. Every layer is
validated against the recipe's dataclasses, so a typo in a YAML file is an error naming the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CLAIM_KEYS", "TESTBED_DIR", "Method", "installed_copy", "load_methods", "load_studies", "load_tuning",
           "load_tuned", "load_yaml_attack", "merge", "method_config", "nest", "testbed_dir"]

_CHECKOUT = Path(__file__).resolve().parents[2] / "configs" / "testbed"
# the wheel's copy (package data; in a checkout a symlink to configs/testbed)
_PACKAGED = Path(__file__).resolve().parents[1] / "testbed_configs"
TESTBED_DIR = _CHECKOUT if (_CHECKOUT / "methods.yaml").is_file() else _PACKAGED


def testbed_dir() -> Path:
    """configs/testbed/ of this checkout, else the installed package's copy (or ``$GRACE_TESTBED_CONFIGS``)."""
    from grace_plugin.config import ConfigError

    d = Path(os.environ.get("GRACE_TESTBED_CONFIGS") or TESTBED_DIR)
    if not (d / "methods.yaml").is_file():
        raise ConfigError(f"{d}: no testbed configs (methods.yaml); run from a checkout or set GRACE_TESTBED_CONFIGS")
    return d


def installed_copy() -> bool:
    """True when the testbed configs in use are the installed package's copy (no checkout, no
    ``$GRACE_TESTBED_CONFIGS``): nothing should be written there."""
    return not os.environ.get("GRACE_TESTBED_CONFIGS") and TESTBED_DIR == _PACKAGED


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"train.lr": 1e-3, "recipe.rho": 0.1}`` -> ``{"train": {"lr": 1e-3}, "recipe": {"rho": 0.1}}``."""
    from grace_plugin.config import ConfigError

    out: dict[str, Any] = {}
    for key, value in dotted.items():
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"setting {key!r}: expected a dotted key such as train.lr or recipe.rho")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k, {}), dict) else v
    return out


def _load(name: str, d: Path | None = None) -> Any:
    from grace_plugin.config import load_yaml

    return load_yaml((d or testbed_dir()) / name)


@dataclass
class Method:
    name: str
    recipe: str | None  # None: the pretrained model itself (zero-shot)
    configs: list[str] = field(default_factory=list)
    adversarial: bool = False
    set: dict[str, Any] = field(default_factory=dict)
    tuned_as: str | None = None
    # a compute-matched control trains round(steps * steps_scale) steps: the same CPU-seconds as the method it is
    # matched to, whose step costs steps_scale times its own (measured: bench/compute_match.py)
    steps_scale: float = 1.0

    @property
    def tuning_key(self) -> str:
        return self.tuned_as or self.name


def load_methods(d: Path | None = None) -> dict[str, Method]:
    from grace_plugin.config import ConfigError

    raw = _load("methods.yaml", d)
    out = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or "recipe" not in spec:
            raise ConfigError(f"methods.yaml: method {name!r} needs a mapping with a 'recipe' field")
        unknown = set(spec) - {"recipe", "configs", "adversarial", "set", "tuned_as", "steps_scale"}
        if unknown:
            raise ConfigError(f"methods.yaml: method {name!r}: unknown field(s) {sorted(unknown)}; valid: recipe, "
                              "configs, adversarial, set, tuned_as, steps_scale")
        scale = spec.get("steps_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"methods.yaml: method {name!r}: steps_scale {scale!r} is not a positive number")
        recipe = spec["recipe"]
        out[name] = Method(name, recipe, list(spec.get("configs") or ([recipe] if recipe else [])),
                           bool(spec.get("adversarial", False)), dict(spec.get("set") or {}), spec.get("tuned_as"),
                           float(scale))
    return out


# the claim kinds ``grace_app.studies.verdicts.evaluate_claim`` knows and the keys each takes besides claim, kind and
# metric: the schema of studies.yaml's claims, checked by ``load_studies``
CLAIM_KEYS = {"greater": {"a", "b", "margin"}, "less": {"a", "b", "margin"}, "greater_all": {"a", "b", "margin"},
              "steps": {"pairs", "margin"}, "at_least": {"a", "b", "fraction"}, "within": {"a", "b"}}
_STUDY_KEYS = {"paper_table", "rows", "claims", "geometry", "shift", "paired_reference", "shift_reference"}
_ROW_KEYS = {"method", "label", "paper"}


def load_studies(d: Path | None = None) -> dict[str, dict]:
    """studies.yaml, validated: a misspelt key is an error naming the file, the study and the key (not ignored)."""
    from grace_plugin.config import ConfigError

    d = d or testbed_dir()
    studies = _load("studies.yaml", d) or {}
    where = d / "studies.yaml"
    for name, st in studies.items():
        bad = set(st) - _STUDY_KEYS
        if bad:
            raise ConfigError(f"{where}: study {name}: unknown key(s) {', '.join(sorted(bad))}; valid: "
                              f"{', '.join(sorted(_STUDY_KEYS))}")
        rows = st.get("rows") or []
        for r in rows:
            if set(r) - _ROW_KEYS or "method" not in r:
                raise ConfigError(f"{where}: study {name}: row {r}: keys are method (required), label, paper")
        for key in ("paired_reference", "shift_reference"):
            ref = st.get(key)
            if ref is not None and ref not in [r["method"] for r in rows]:
                raise ConfigError(f"{where}: study {name}: {key} {ref!r} is not one of its rows")
        for c in st.get("claims") or []:
            kind = c.get("kind")
            if kind not in CLAIM_KEYS:
                raise ConfigError(f"{where}: study {name}: claim {c.get('claim')!r}: unknown kind {kind!r}; valid: "
                                  f"{', '.join(CLAIM_KEYS)}")
            bad = set(c) - CLAIM_KEYS[kind] - {"claim", "kind", "metric"}
            if bad or "metric" not in c or "claim" not in c:
                raise ConfigError(f"{where}: study {name}: claim {c.get('claim')!r}: unknown key(s) "
                                  f"{', '.join(sorted(bad)) or '-'} (needs claim, kind, metric; {kind} takes "
                                  f"{', '.join(sorted(CLAIM_KEYS[kind]))})")
    return studies


def load_tuning(d: Path | None = None) -> dict:
    return _load("tuning.yaml", d)


def load_yaml_attack(d: Path | None = None) -> dict[str, Any]:
    """attack.yaml's recipe fields: the one training attack of every adversarial method."""
    return dict(_load("attack.yaml", d).get("recipe") or {})


def load_tuned(d: Path | None = None) -> dict[str, dict]:
    return _load("tuned.yaml", d) or {}


def method_config(method: Method | str, overrides: dict | None = None, steps: int | None = None,
                  tuned: bool = True, d: Path | None = None):
    """The ``RunConfig`` of one testbed run of ``method``; ``overrides`` (nested dict) on top of the layers. ``steps``
    is the study's run length; a compute-matched method trains ``round(steps * steps_scale)`` of them."""
    from grace_plugin.config import ConfigError
    from grace_plugin.finetune import build_config

    d = d or testbed_dir()
    if isinstance(method, str):
        methods = load_methods(d)
        if method not in methods:
            raise ConfigError(f"unknown testbed method {method!r}; valid: {', '.join(methods)}")
        method = methods[method]
    if method.recipe is None:
        raise ConfigError(f"method {method.name!r} trains nothing (the pretrained model)")
    files = [d / "common.yaml"] + ([d / "attack.yaml"] if method.adversarial else [])
    files += [d / f"{c}.yaml" for c in method.configs]
    layer = nest(method.set)
    if tuned:
        # values tuned for this method win over its set defaults (tuning searched over them); values tuned for
        # another method (tuned_as) lie under its set: an ablation row keeps the one thing it changes
        values = nest(load_tuned(d).get(method.tuning_key) or {})
        layer = merge(layer, values) if method.tuning_key == method.name else merge(values, layer)
    if overrides:
        layer = merge(layer, overrides)
    if method.steps_scale != 1.0:
        base = steps if steps is not None else \
            build_config(method.recipe, config_file=files, overrides=layer).train.steps
        if base is not None:  # (a config that sets no step count trains by epochs: nothing to scale)
            steps = max(1, round(base * method.steps_scale))
    return build_config(method.recipe, config_file=files, overrides=layer, steps=steps)
