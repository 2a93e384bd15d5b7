"""The one rule that names a GRACE checkpoint in timm from its RobustBench name.

See docs/publishing.md "Publishing: timm and RobustBench names"; the lookup is ``load_model`` in
https://github.com/RobustBench/robustbench/blob/master/robustbench/utils.py.

``robustbench.utils.load_model(name, dataset=..., threat_model=...)`` first builds
``f"{name.lower().replace('-', '_')}_{dataset}_{threat}"`` (``corruptions_3d`` folded into ``corruptions``) and, if
timm knows that name, returns ``timm.create_model(that, num_classes=<10|100|1000>, pretrained=True)``. Registering our
models under exactly that string is how RobustBench loads them without any change to its model zoo. This module
mirrors the rule without importing robustbench (slow, and it needs the autoattack shim); ``tests/test_registry.py``
checks it against RobustBench's own resolution.
"""
from __future__ import annotations

import functools
import re

from grace_plugin.errors import UsageError

__all__ = ["timm_name", "DATASETS", "THREAT_MODELS", "NUM_CLASSES", "check_rb_name", "model_info_fields"]

# robustbench.model_zoo.enums.BenchmarkDataset / ThreatModel values, and robustbench.utils.DATASET_CLASSES.
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}

# A '.' would be read by timm as an "arch.tag" separator; anything else outside [A-Za-z0-9_-] cannot be a Python-ish
# entrypoint name. RobustBench names follow <FirstAuthor><Year><FirstTitleWord>[_<Arch>]
# (e.g. Singh2023Revisiting_ViT-B-ConvStem in RobustBench's model_info/).
_RB_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def check_rb_name(rb_name: str) -> str:
    if not isinstance(rb_name, str) or not _RB_NAME.match(rb_name):
        raise UsageError(f"RobustBench name {rb_name!r}: expected letters, digits, '_' or '-' starting with a letter, "
                         "e.g. 'Grace2026Gram_ViT-B-32' (<FirstAuthor><Year><Keyword>_<Arch>)")
    return rb_name


def timm_name(rb_name: str, dataset: str = "imagenet", threat_model: str = "Linf") -> str:
    """timm model name under which ``robustbench.utils.load_model(rb_name, dataset, threat_model)`` looks first.

    Args:
        rb_name: RobustBench model name, e.g. ``Grace2026Gram_ViT-B-32``.
        dataset: one of ``cifar10``, ``cifar100``, ``imagenet``.
        threat_model: one of ``Linf``, ``L2``, ``corruptions``, ``corruptions_3d`` (the last shares the
            ``corruptions`` name, as in RobustBench's model zoo).

    Returns:
        e.g. ``grace2026gram_vit_b_32_imagenet_linf``.
    """
    check_rb_name(rb_name)
    if dataset not in DATASETS:
        raise UsageError(f"dataset {dataset!r}: valid choices are {', '.join(DATASETS)}")
    if threat_model not in THREAT_MODELS:
        raise UsageError(f"threat model {threat_model!r}: valid choices are {', '.join(THREAT_MODELS)}")
    threat = threat_model.replace("_3d", "")
    return f"{rb_name.lower().replace('-', '_')}_{dataset.lower()}_{threat.lower()}"


@functools.cache
def model_info_fields() -> tuple[str, ...]:
    """The field names of ``robustbench.utils.ModelInfo``, in its order, read from the dataclass itself.

    The model cards (``registry.publish``) and the ``model_info/*.json`` files (``eval_suites.leaderboard``) both
    carry exactly these fields. robustbench is imported here, on first use, not when this module is.
    """
    import dataclasses

    import grace_plugin  # noqa: F401  (the autoattack import hook robustbench needs)
    from robustbench.utils import ModelInfo

    return tuple(f.name for f in dataclasses.fields(ModelInfo))
