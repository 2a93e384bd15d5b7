"""timm model names for GRACE checkpoints, the RobustBench name bridge, and model resolution.

After ``import registry`` every GRACE model card in the weights dir (``$GRACE_WEIGHTS_DIR``) is a timm architecture
named by the RobustBench rule (``registry.naming.timm_name``), the folder being read when a name is first resolved
or listed; ``import grace_plugin`` does the same through its plugin hook (once timm is imported) when the
distribution is installed. A VQA run is registered under a name of its own (``registry.vqa_entries``). timm has no
entry points of its own
(https://github.com/huggingface/pytorch-image-models/issues/1694).
"""
import grace_plugin  # noqa: F401  (installs the autoattack shim before anything imports robustbench)

from .grace_models import (GraceClassifier, HeadSizeError, RegistryError, get_card, list_grace_models,
                           register_card, scan_once, scan_weights_dir, weights_dir)
from .naming import timm_name
from .resolve import LoadedModel, ModelNotFound, load_model
from .weights import UnsafeWeightsError, WeightsError, load_state_dict_safe
from .vqa_entries import list_vqa_models, load_vqa_entry, register_vqa_run

__all__ = ["LoadedModel", "ModelNotFound", "load_model", "timm_name", "GraceClassifier", "RegistryError",
           "HeadSizeError", "WeightsError", "UnsafeWeightsError", "load_state_dict_safe", "register_card",
           "scan_weights_dir", "scan_once", "list_grace_models", "get_card", "weights_dir", "register_vqa_run",
           "load_vqa_entry", "list_vqa_models"]
