"""TFDS datasets of keras-glas. Importing this package registers `glas` with TFDS:

    import tfds_glas
    ds = tfds.load("glas/synthetic", split="train")
"""
from .glas import Builder, GlasDataError, GlasIntegrityWarning

__all__ = ["Builder", "GlasDataError", "GlasIntegrityWarning"]
