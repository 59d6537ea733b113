"""U-Net (Ronneberger et al., 2015) for gland segmentation, as in the seed, plus options.

The seed configuration (`base_filters=64, depth=4`) is the original U-Net with same-padded
convolutions: four encoder levels of two 3x3 conv + ReLU and a 2x2 max-pool (64, 128, 256, 512
channels), a 1024-channel bottleneck (32x32 for a 512x512 input), a decoder of 2x2 transposed
conv + skip concatenation + two 3x3 conv, and a 1x1 sigmoid head. `contour_head=True` adds a
second 1x1 sigmoid head for gland contours (DCAN, Chen et al., 2016) so that touching glands can
be split in post-processing.
"""
import keras
from keras import layers


def _conv_block(x, filters, batch_norm, name):
    """Two 3x3 same-padded convolutions, each followed by (batch norm and) ReLU."""
    for index in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            # A bias in front of batch norm is redundant: BN's beta plays its role.
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{index}",
        )(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


def _sigmoid_head(x, name):
    """1x1 convolution to one channel and a float32 sigmoid (float32 even under mixed precision)."""
    x = layers.Conv2D(1, 1, name=f"{name}_logits")(x)
    return layers.Activation("sigmoid", dtype="float32", name=name)(x)


def _check_arguments(input_shape, base_filters, depth, dropout):
    if len(input_shape) != 3:
        raise ValueError(
            f"build_unet: input_shape must be (height, width, channels), got {input_shape}"
        )
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"build_unet: depth must be an integer >= 1, got {depth!r}")
    if not isinstance(base_filters, int) or base_filters < 1:
        raise ValueError(f"build_unet: base_filters must be an integer >= 1, got {base_filters!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"build_unet: dropout must be in [0, 1), got {dropout!r}")
    stride = 2**depth
    for axis, size in zip(("height", "width"), input_shape[:2], strict=True):
        if size is not None and size % stride:
            raise ValueError(
                f"build_unet: input {axis} {size} is not divisible by 2**depth = {stride}; "
                f"pad or resize the images to a multiple of {stride} "
                f"(e.g. {-(-size // stride) * stride}) "
                "or use input_shape=(None, None, 3)"
            )


def build_unet(
    input_shape=(None, None, 3),
    base_filters=64,
    depth=4,
    batch_norm=False,
    dropout=0.0,
    contour_head=False,
    name="unet",
):
    """Builds the functional U-Net.

    Args:
        input_shape: `(H, W, C)`; H and W may be `None`. Static sizes must be divisible by
            `2**depth` (dynamic ones must be too, at call time).
        base_filters: channels of the first level; level `i` has `base_filters * 2**i` and the
            bottleneck `base_filters * 2**depth`.
        depth: number of encoder levels (max-pools).
        batch_norm: batch normalisation after every 3x3 convolution.
        dropout: dropout rate at the end of the contracting path (output of the deepest encoder
            level and of the bottleneck), as in the original U-Net; 0 disables it.
        contour_head: add the DCAN-style gland-contour head.
        name: model name.

    Returns:
        A `keras.Model` mapping float32 images `(B, H, W, C)` in [0, 1] to
        `{"mask": float32 (B, H, W, 1)}` (+ `"contour"`), sigmoid probabilities.
    """
    input_shape = tuple(input_shape)
    _check_arguments(input_shape, base_filters, depth, dropout)
    inputs = keras.Input(shape=input_shape, name="images")

    x = inputs
    skips = []
    for level in range(depth):
        x = _conv_block(x, base_filters * 2**level, batch_norm, name=f"encoder{level + 1}")
        if dropout and level == depth - 1:
            x = layers.Dropout(dropout, name=f"encoder{level + 1}_dropout")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"encoder{level + 1}_pool")(x)

    x = _conv_block(x, base_filters * 2**depth, batch_norm, name="bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"decoder{level + 1}_upconv")(x)
        x = layers.Concatenate(name=f"decoder{level + 1}_concat")([skips[level], x])
        x = _conv_block(x, filters, batch_norm, name=f"decoder{level + 1}")

    outputs = {"mask": _sigmoid_head(x, "mask")}
    if contour_head:
        outputs["contour"] = _sigmoid_head(x, "contour")
    return keras.Model(inputs, outputs, name=name)
