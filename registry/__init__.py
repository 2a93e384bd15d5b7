"""timm model names for GRACE checkpoints, the RobustBench name bridge, and model resolution.

``import registry`` (or ``import grace_plugin`` through the ``grace`` CLI) makes our timm names visible; timm has no
plugin entry points (ecosystem.md B10).
"""
import grace_plugin  # noqa: F401  (installs the autoattack shim before anything imports robustbench)

from .resolve import LoadedModel, ModelNotFound, load_model

__all__ = ["LoadedModel", "ModelNotFound", "load_model"]
