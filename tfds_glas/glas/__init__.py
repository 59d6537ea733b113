"""The `glas` TFDS dataset (GlaS@MICCAI'2015 gland segmentation)."""
from .glas_dataset_builder import Builder
from .release import GlasDataError, GlasIntegrityWarning

__all__ = ["Builder", "GlasDataError", "GlasIntegrityWarning"]
