"""ResNet-FPN Mask R-CNN for gland instance segmentation (contract 8)."""
from keras_glas.models.maskrcnn.model import DEFAULT_OPTIONS, MaskRCNN, build_maskrcnn

__all__ = ["DEFAULT_OPTIONS", "MaskRCNN", "build_maskrcnn"]
