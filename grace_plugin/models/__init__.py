"""CLIP classifier (timm image tower + open_clip text head) and LoRA adapters."""
from .classifier import ClipClassifier, ImageNormalizer, ZeroShotHead

__all__ = ["ClipClassifier", "ImageNormalizer", "ZeroShotHead"]
