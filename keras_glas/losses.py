"""Segmentation losses for the U-Net heads, in `keras.ops`.

All losses take `y_true` and `y_pred` of shape `(B, H, W, 1)` (targets in {0, 1}, predictions
sigmoid probabilities) and are serializable as `keras_glas>Name`.

- `bce`: pixel-wise binary cross-entropy (the seed's loss); per-pixel values `(B, H, W)`.
- `weighted_bce`: the same values, weighted per pixel by the original U-Net border weight map
  that the pipeline yields as `sample_weight` `(B, H, W)` (`make_dataset(border_weights=True)`).
  Keras multiplies the `(B, H, W)` losses by that map and divides the sum by `B*H*W`, i.e. the
  U-Net energy `mean(w * bce)`.
- `dice`: soft Dice loss per image `(B,)`, `1 - (2 |y p| + s) / (|y| + |p| + s)`.
- `bce_dice`: per image, mean pixel BCE + soft Dice loss `(B,)`.
"""
import keras
from keras import ops


def pixelwise_binary_crossentropy(y_true, y_pred, epsilon=1e-7):
    """Binary cross-entropy of probabilities, averaged over the channel axis.

    Args:
        y_true: float `(B, H, W, C)` targets in [0, 1].
        y_pred: float `(B, H, W, C)` probabilities.
        epsilon: clip for `y_pred` so that the logarithms stay finite.

    Returns:
        float `(B, H, W)` per-pixel losses.
    """
    y_pred = ops.clip(y_pred, epsilon, 1.0 - epsilon)
    values = -(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred))
    return ops.mean(values, axis=-1)


def soft_dice_loss(y_true, y_pred, smooth=1.0):
    """Soft Dice loss per image.

    Args:
        y_true: float `(B, ...)` targets in [0, 1].
        y_pred: float `(B, ...)` probabilities.
        smooth: added to numerator and denominator; makes two empty masks a perfect match (0).

    Returns:
        float `(B,)`, `1 - (2 sum(y p) + smooth) / (sum(y) + sum(p) + smooth)`.
    """
    axes = tuple(range(1, len(y_pred.shape)))
    intersection = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


@keras.saving.register_keras_serializable(package="keras_glas")
class BinaryCrossentropy(keras.losses.Loss):
    """Pixel-wise binary cross-entropy; `sample_weight` may be `(B,)` or per pixel `(B, H, W)`."""

    def __init__(self, epsilon=1e-7, name="bce", **kwargs):
        super().__init__(name=name, **kwargs)
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        return pixelwise_binary_crossentropy(y_true, y_pred, self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="keras_glas")
class WeightedBinaryCrossentropy(BinaryCrossentropy):
    """Border-weighted BCE of the original U-Net: per-pixel weights come as `sample_weight`.

    Calling it without `sample_weight` is an error rather than a silent plain BCE, because it
    means the pipeline was built without `border_weights=True`.
    """

    def __init__(self, epsilon=1e-7, name="weighted_bce", **kwargs):
        super().__init__(epsilon=epsilon, name=name, **kwargs)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is None:
            raise ValueError(
                "weighted_bce needs per-pixel border weights as sample_weight (B, H, W): build "
                "the dataset with keras_glas.data.make_dataset(..., border_weights=True), or use "
                "loss 'bce'"
            )
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)


@keras.saving.register_keras_serializable(package="keras_glas")
class DiceLoss(keras.losses.Loss):
    """Soft Dice loss per image `(B,)`; `sample_weight`, if any, is per image `(B,)`."""

    def __init__(self, smooth=1.0, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth

    def call(self, y_true, y_pred):
        return soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="keras_glas")
class BCEDiceLoss(keras.losses.Loss):
    """Per image: mean pixel BCE + soft Dice loss, `(B,)`."""

    def __init__(self, smooth=1.0, epsilon=1e-7, name="bce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = smooth
        self.epsilon = epsilon

    def call(self, y_true, y_pred):
        bce = pixelwise_binary_crossentropy(y_true, y_pred, self.epsilon)
        bce = ops.mean(bce, axis=tuple(range(1, len(bce.shape))))
        return bce + soft_dice_loss(y_true, y_pred, self.smooth)

    def get_config(self):
        return {**super().get_config(), "smooth": self.smooth, "epsilon": self.epsilon}


LOSSES = {
    "bce": BinaryCrossentropy,
    "dice": DiceLoss,
    "bce_dice": BCEDiceLoss,
    "weighted_bce": WeightedBinaryCrossentropy,
}


def get_loss(name):
    """Returns a new loss by name: one of `bce`, `dice`, `bce_dice`, `weighted_bce`."""
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]()
