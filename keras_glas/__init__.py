"""Gland segmentation in colon histology (GlaS@MICCAI'2015) with Keras 3 / TensorFlow."""

__version__ = "0.1.0"
