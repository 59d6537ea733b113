"""Augmentations for image + instance-map pairs, written as TensorFlow graph ops.

Every function here is pure and traceable inside `tf.data.Dataset.map`: no Python runs per
sample. Geometric operations apply one and the same transform to the image and to its labels;
the image is interpolated bilinearly, the labels by nearest neighbour, so that a label map never
gains an id that was not in it. Randomness comes only from `tf.random.stateless_*` ops driven by
a per-example `seed` (int32/int64 tensor of shape (2,)): the same seed gives the same result.

Shapes: `image` is (H, W, 3), uint8 or float32 in [0, 1]; `labels` is int32 (H, W) with
0 = background and 1..K instance ids.
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

# skimage.color's haematoxylin-eosin-DAB stain matrix (Ruifrok & Johnston 2001) and its inverse.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
# skimage clips RGB at 1e-6 before the log and divides by log(1e-6) so that stains are >= 0.
_LOG_ADJUST = math.log(1e-6)
# With random crops on, cached examples keep a longer side of CACHE_OVERSAMPLE·S (see
# `cached_side`). The seed cropped the full-resolution image and then resized the crop to S; we
# resize once to CACHE_OVERSAMPLE·S (anti-aliased, cacheable), crop that and resize the crop to S
# with plain bilinear. A crop keeping a fraction f of each side holds f·1.25·S pixels, so crops
# with f >= 0.8 still hold >= S pixels and give the seed's result up to resampling; smaller
# crops (down to f = 0.6: 0.75·S pixels upsampled by 1.33×) are somewhat blurrier than the seed's
# (which held 0.6·775 = 465 pixels for GlaS at S = 512). Larger factors keep more detail but
# cost cache memory (∝ factor²) and alias more when an uncropped example is shrunk by 1/factor
# without anti-aliasing; 1.25 keeps that shrink mild (a bilinear footprint of 2 input pixels
# for an ideal 2.5).
CACHE_OVERSAMPLE = 1.25


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Which augmentations `keras_glas.data.make_dataset` applies, and how strongly.

    The defaults are the seed study's: horizontal flip, vertical flip and a random crop, each with
    probability 0.5. The three extras (its "future work") are off by default because they cost
    throughput.

    Attributes:
        flip: random horizontal and vertical flips, each with probability 0.5.
        crop: random crop with probability `crop_probability`.
        crop_probability: probability that an example is cropped.
        min_crop_fraction: a crop keeps a fraction in [min_crop_fraction, 1] of each side
            (the same fraction for height and width, so the aspect ratio is kept).
        elastic: elastic deformation (smooth random displacement field).
        elastic_alpha: standard deviation of the displacement, in pixels of the output.
        elastic_sigma: correlation length of the displacement field, in pixels of the output.
        rotate_scale: random rotation about the centre and isotropic scaling.
        max_rotation_degrees: rotation angle drawn uniformly in [-max, max] degrees.
        scale_range: scale factor drawn uniformly in [low, high] (> 1 zooms in).
        stain_jitter: H&E stain jitter (Tellez et al. 2018) in haematoxylin-eosin-DAB space.
        stain_sigma: each stain channel is multiplied by 1 + U(-stain_sigma, stain_sigma).
        stain_bias: ... and shifted by U(-stain_bias, stain_bias).
    """

    flip: bool = True
    crop: bool = True
    crop_probability: float = 0.5
    min_crop_fraction: float = 0.6
    elastic: bool = False
    elastic_alpha: float = 4.0
    elastic_sigma: float = 32.0
    rotate_scale: bool = False
    max_rotation_degrees: float = 15.0
    scale_range: tuple = (0.9, 1.1)
    stain_jitter: bool = False
    stain_sigma: float = 0.05
    stain_bias: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.crop_probability <= 1.0:
            raise ValueError(
                f"AugmentOptions.crop_probability must be in [0, 1], got {self.crop_probability}"
            )
        if not 0.0 < self.min_crop_fraction <= 1.0:
            raise ValueError(
                f"AugmentOptions.min_crop_fraction must be in (0, 1], got {self.min_crop_fraction}"
            )
        if self.elastic_alpha < 0 or self.elastic_sigma <= 0:
            raise ValueError(
                "AugmentOptions.elastic_alpha must be >= 0 and elastic_sigma > 0, got "
                f"{self.elastic_alpha} and {self.elastic_sigma}"
            )
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(
                "AugmentOptions.scale_range must be (low, high) with 0 < low <= high, "
                f"got {self.scale_range}"
            )
        if self.stain_sigma < 0 or self.stain_bias < 0:
            raise ValueError("AugmentOptions.stain_sigma and stain_bias must be >= 0")

    @classmethod
    def resolve(cls, augment):
        """`True` → the seed's augmentation, `False`/`None` → none, `AugmentOptions` as is."""
        if isinstance(augment, cls):
            return augment
        if augment is True:
            return cls()
        if augment is False or augment is None:
            return cls(flip=False, crop=False)
        raise TypeError(
            f"augment must be a bool or keras_glas.augment.AugmentOptions, got {augment!r}"
        )

    @property
    def any(self):
        """Whether any augmentation is switched on."""
        return self.flip or self.crop or self.elastic or self.rotate_scale or self.stain_jitter


def _coin(seed, probability=0.5):
    """A scalar bool tensor, True with `probability`."""
    return tf.random.stateless_uniform([], seed) < probability


def random_flip(image, labels, seed):
    """Flips image and labels left-right, then up-down, each with probability 0.5.

    One `tf.reverse` over the axes drawn (none, one or both) instead of a `tf.cond` per axis:
    an empty axis list returns the input without a copy.

    Args:
        image: (H, W, C) tensor, any dtype.
        labels: (H, W) int32.
        seed: (2,) int tensor.
    Returns:
        `(image, labels)` with the same shapes and dtypes.
    """
    flips = tf.random.stateless_uniform([2], seed) < 0.5
    axes = tf.boolean_mask(tf.constant([1, 0]), flips)
    return tf.reverse(image, axes), tf.reverse(labels, axes)


def random_crop(image, labels, seed, probability=0.5, min_fraction=0.6):
    """With `probability`, crops the same random window out of image and labels.

    The window keeps a fraction f ~ U(min_fraction, 1) of both the height and the width (the
    aspect ratio is kept) at a uniformly random position. Instances cut by the window keep their
    ids; instances outside it disappear.

    Args:
        image: (H, W, C) tensor, any dtype.
        labels: (H, W) int32.
        seed: (2,) int tensor.
    Returns:
        `(image, labels)`, shapes (h, w, C) and (h, w) with h <= H, w <= W.
    """
    coin_seed, size_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    shape = tf.shape(labels)
    fraction = tf.random.stateless_uniform([], size_seed, minval=min_fraction, maxval=1.0)
    fraction = tf.where(_coin(coin_seed, probability), fraction, 1.0)
    size = tf.maximum(tf.cast(tf.round(fraction * tf.cast(shape, tf.float32)), tf.int32), 1)
    size = tf.minimum(size, shape)
    top = tf.random.stateless_uniform(
        [], y_seed, minval=0, maxval=shape[0] - size[0] + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        [], x_seed, minval=0, maxval=shape[1] - size[1] + 1, dtype=tf.int32
    )
    image = tf.slice(image, [top, left, 0], [size[0], size[1], -1])
    labels = tf.slice(labels, [top, left], [size[0], size[1]])
    return image, labels


def _fitted_shape(shape, side):
    """int32 (2,): an (H, W) shape scaled so that its longer side is `side` (aspect kept)."""
    shape = tf.cast(shape, tf.float32)
    scale = side / tf.reduce_max(shape)
    return tf.clip_by_value(tf.cast(tf.round(shape * scale), tf.int32), 1, side)


def resize_with_pad(image, labels, size, antialias=True, height=None):
    """Resizes image and labels so that the longer side is `size`, onto a `height`×`size` canvas.

    The aspect ratio is kept and the content is centred: zero-padded where it is smaller than
    the canvas, cropped where it is taller (a canvas lower than `size` suits landscape images
    such as GlaS's, 775×522: at `size` 384 they are 384×259, so a 272-row canvas holds them
    whole with 29% fewer pixels than the square). The image is resampled bilinearly,
    anti-aliased by default (as skimage's `resize(anti_aliasing=True)` in the seed study); the
    labels by nearest neighbour, so no new ids appear. `antialias=False` is ~4× faster; it is
    exact when upsampling and close when downsampling by less than 2× (the 2-pixel bilinear
    footprint then still reaches every input pixel), which is how `augment_and_resize` uses it.

    Args:
        image: (H, W, 3) uint8 or float32 in [0, 1].
        labels: (H, W) int32.
        size: int, the longer side S after resizing and the width of the canvas.
        antialias: anti-alias the image when downsampling.
        height: int, the canvas height; `None` = `size` (a square).
    Returns:
        `(image, labels)`: float32 (height, S, 3) in [0, 1] and int32 (height, S).
    """
    height = size if height is None else height
    new_shape = _fitted_shape(tf.shape(labels), size)
    # Cast before resizing: TF's bilinear kernels are faster on float32 than on uint8 input.
    image = tf.image.resize(to_float(image), new_shape, method="bilinear", antialias=antialias)
    # Bilinear weights are convex, so only float rounding can step past 1.
    image = tf.minimum(image, 1.0)
    labels = tf.image.resize(labels[..., None], new_shape, method="nearest")
    image = tf.image.resize_with_crop_or_pad(image, height, size)
    labels = tf.image.resize_with_crop_or_pad(labels, height, size)[..., 0]
    return image, labels


def cached_side(size, options):
    """Longer side, in pixels, of the examples `make_dataset` caches for output side S = `size`.

    `CACHE_OVERSAMPLE`·S when random crops are on (a crop is later upsampled back to S), S
    otherwise (the per-epoch resize is then the identity).
    """
    return int(math.ceil(size * (CACHE_OVERSAMPLE if options.crop else 1.0)))


def shrink_to_fit(image, labels, max_side):
    """Downscales an example whose longer side exceeds `max_side` to exactly `max_side`.

    The image is resampled with anti-aliased bilinear interpolation (the expensive part of the
    seed's resize, done here once per example so that it can be cached) and rounded back to
    uint8; the labels by nearest neighbour. Smaller examples are returned unchanged.

    Args:
        image: uint8 (H, W, 3).
        labels: int32 (H, W).
        max_side: int.
    Returns:
        `(image, labels)`: uint8 (h, w, 3) and int32 (h, w) with max(h, w) <= max_side.
    """
    shape = tf.shape(labels)

    def shrink():
        new_shape = _fitted_shape(shape, max_side)
        resized = tf.image.resize(image, new_shape, method="bilinear", antialias=True)
        nearest = tf.image.resize(labels[..., None], new_shape, method="nearest")[..., 0]
        return tf.saturate_cast(tf.round(resized), tf.uint8), nearest

    return tf.cond(tf.reduce_max(shape) > max_side, shrink, lambda: (image, labels))


def to_float(image):
    """uint8 (or float) image → float32 in [0, 1]."""
    if image.dtype == tf.uint8:
        return tf.cast(image, tf.float32) / 255.0
    return tf.cast(image, tf.float32)


def _gaussian_kernel(sigma):
    """1-D normalised Gaussian kernel of radius ceil(3 sigma), float32 (2r+1,)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def _smooth_displacement(shape, alpha, sigma, seed):
    """A smooth random displacement field, float32 (H, W, 2) in pixels, for `shape` = (H, W).

    Gaussian white noise is drawn on a coarse grid (one node per `sigma / 2` pixels), blurred with
    a Gaussian of 2 grid cells (≈ `sigma` pixels), rescaled to standard deviation `alpha` and
    upsampled bilinearly to full size. This equals Simard et al.'s blurred-noise field up to the
    coarse sampling, at a fraction of the cost of blurring a full-size field.
    """
    step = max(sigma / 2.0, 1.0)
    grid = [max(2, int(math.ceil(side / step)) + 1) for side in shape]
    kernel = _gaussian_kernel(2.0)
    # Blurring unit-variance white noise with the separable kernel k⊗k leaves variance (Σk²)².
    noise_std = float(np.sum(kernel**2))
    noise = tf.random.stateless_normal([1, *grid, 2], seed)
    k = tf.constant(kernel)
    rows = tf.tile(tf.reshape(k, [-1, 1, 1, 1]), [1, 1, 2, 1])
    cols = tf.tile(tf.reshape(k, [1, -1, 1, 1]), [1, 1, 2, 1])
    field = tf.nn.depthwise_conv2d(noise, rows, [1, 1, 1, 1], "SAME")
    field = tf.nn.depthwise_conv2d(field, cols, [1, 1, 1, 1], "SAME")
    field = field * (alpha / noise_std)
    return tf.image.resize(field, shape, method="bilinear")[0]


def _sample_pair(image, labels, rows, cols):
    """Samples image (bilinear) and labels (nearest) at float coordinates; zero outside.

    Both are read in one pass: the labels ride along as a fourth float channel (ids below 2**24
    are exact in float32) of a copy framed by one pixel of zeros, so the four corner gathers of
    the bilinear interpolation also provide the nearest label, and coordinates outside the image
    are clamped onto the zero frame instead of being masked out.

    Args:
        image: float32 (H, W, 3).
        labels: int32 (H, W).
        rows, cols: float32 (H', W') sampling coordinates in pixels of the input.
    Returns:
        `(image, labels)`: float32 (H', W', 3) and int32 (H', W').
    """
    shape = tf.shape(labels)
    # Frame: one zero row/column before the image, two after (so that corner + 1 stays inside).
    height, width = shape[0] + 3, shape[1] + 3
    stacked = tf.concat([image, tf.cast(labels, tf.float32)[..., None]], axis=-1)
    flat = tf.reshape(tf.pad(stacked, [[1, 2], [1, 2], [0, 0]]), [height * width, 4])
    # +1: coordinates in the framed copy. Clamped ones land exactly on a zero frame row/column.
    rows = tf.clip_by_value(rows + 1.0, 0.0, tf.cast(height - 2, tf.float32))
    cols = tf.clip_by_value(cols + 1.0, 0.0, tf.cast(width - 2, tf.float32))
    r0, c0 = tf.floor(rows), tf.floor(cols)
    wr, wc = (rows - r0)[..., None], (cols - c0)[..., None]
    index = tf.cast(r0, tf.int32) * width + tf.cast(c0, tf.int32)
    top_left, top_right = tf.gather(flat, index), tf.gather(flat, index + 1)
    bottom_left, bottom_right = tf.gather(flat, index + width), tf.gather(flat, index + width + 1)
    top = top_left * (1 - wc) + top_right * wc
    bottom = bottom_left * (1 - wc) + bottom_right * wc
    sampled_image = (top * (1 - wr) + bottom * wr)[..., :3]
    right, lower = wc >= 0.5, wr >= 0.5
    nearest = tf.where(
        lower,
        tf.where(right, bottom_right, bottom_left),
        tf.where(right, top_right, top_left),
    )
    return sampled_image, tf.cast(nearest[..., 3], tf.int32)


def elastic_deform(image, labels, seed, alpha=4.0, sigma=32.0):
    """Elastic deformation: image and labels resampled along one smooth random displacement field.

    Args:
        image: float32 (H, W, 3), H and W static.
        labels: int32 (H, W).
        seed: (2,) int tensor.
        alpha: displacement standard deviation in pixels.
        sigma: correlation length of the field in pixels.
    Returns:
        `(image, labels)` with the same shapes and dtypes; pixels sampled from outside are 0.
    """
    shape = tuple(image.shape[:2])
    if None in shape:
        raise ValueError(f"elastic_deform needs a static image size, got shape {image.shape}")
    displacement = _smooth_displacement(shape, alpha, sigma, seed)
    rows = tf.cast(tf.range(shape[0]), tf.float32)[:, None] + displacement[..., 0]
    cols = tf.cast(tf.range(shape[1]), tf.float32)[None, :] + displacement[..., 1]
    return _sample_pair(image, labels, rows, cols)


def random_rotate_scale(image, labels, seed, max_degrees=15.0, scale_range=(0.9, 1.1)):
    """Rotates by U(-max_degrees, max_degrees) and scales by U(*scale_range) about the centre.

    Args:
        image: float32 (H, W, 3).
        labels: int32 (H, W).
        seed: (2,) int tensor.
    Returns:
        `(image, labels)` with the same shapes and dtypes; uncovered pixels are 0.
    """
    angle_seed, scale_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    limit = max_degrees * math.pi / 180.0
    angle = tf.random.stateless_uniform([], angle_seed, minval=-limit, maxval=limit)
    scale = tf.random.stateless_uniform(
        [], scale_seed, minval=scale_range[0], maxval=scale_range[1]
    )
    shape = tf.shape(labels)
    center_y = (tf.cast(shape[0], tf.float32) - 1) / 2
    center_x = (tf.cast(shape[1], tf.float32) - 1) / 2
    # The op maps each output pixel (x, y) to the input pixel it reads:
    # input = c + R(-a) / s · (out - c).
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    transform = tf.stack(
        [
            cos,
            sin,
            center_x - cos * center_x - sin * center_y,
            -sin,
            cos,
            center_y + sin * center_x - cos * center_y,
            0.0,
            0.0,
        ]
    )[None]

    def warp(values, interpolation):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=values[None],
            transforms=transform,
            output_shape=shape[:2],
            fill_value=0.0,
            interpolation=interpolation,
            fill_mode="CONSTANT",
        )[0]

    return warp(image, "BILINEAR"), warp(labels[..., None], "NEAREST")[..., 0]


def rgb_to_hed(image, clip=True):
    """RGB float32 (..., 3) in [0, 1] → haematoxylin-eosin-DAB stains, as `skimage.color.rgb2hed`.

    `clip=False` keeps the negative stain amounts of colours outside the H&E-DAB gamut, which
    makes `hed_to_rgb` its exact inverse (skimage clips them to 0).
    """
    log_rgb = tf.math.log(tf.maximum(image, 1e-6)) / _LOG_ADJUST
    stains = tf.tensordot(log_rgb, tf.constant(HED_FROM_RGB, tf.float32), axes=1)
    return tf.maximum(stains, 0.0) if clip else stains


def hed_to_rgb(stains):
    """Stains (..., 3) → RGB float32 in [0, 1], as `skimage.color.hed2rgb`."""
    log_rgb = tf.tensordot(stains * _LOG_ADJUST, tf.constant(RGB_FROM_HED, tf.float32), axes=1)
    return tf.clip_by_value(tf.exp(log_rgb), 0.0, 1.0)


def stain_jitter(image, seed, sigma=0.05, bias=0.05):
    """H&E stain jitter: each stain channel s becomes s·(1 + U(-sigma, sigma)) + U(-bias, bias).

    Args:
        image: float32 (H, W, 3) in [0, 1].
        seed: (2,) int tensor.
    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    scale_seed, bias_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    scale = 1.0 + tf.random.stateless_uniform([3], scale_seed, minval=-sigma, maxval=sigma)
    shift = tf.random.stateless_uniform([3], bias_seed, minval=-bias, maxval=bias)
    return hed_to_rgb(rgb_to_hed(image, clip=False) * scale + shift)


def augment_and_resize(image, labels, size, options, seed, height=None):
    """The per-epoch augmentation chain of `make_dataset` for one example.

    Order: crop and flips on the uint8 image (cropping first so that the flip copies fewer
    pixels), the aspect-kept resize to a longer side of S on the height×S canvas
    (`resize_with_pad`), then rotation/scale, elastic deformation and stain
    jitter at the fixed output size. The resize to S is plain bilinear, so the input must not be
    much larger than S: `make_dataset` shrinks every example to `cached_side(size, options)` with
    `shrink_to_fit` before its cache, which leaves at most a 1.25× shrink (uncropped) or a
    1/(1.25·min_crop_fraction) enlargement (smallest crop) for each epoch.

    Args:
        image: uint8 (H, W, 3), longer side at most `cached_side(size, options)`.
        labels: int32 (H, W).
        size: int S.
        options: `AugmentOptions`.
        seed: (2,) int tensor (ignored when no augmentation is on).
        height: int, the output height; `None` = S (a square).
    Returns:
        `(image, labels)`: float32 (height, S, 3) in [0, 1] and int32 (height, S).
    """
    height = size if height is None else height
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    if options.crop:
        image, labels = random_crop(
            image, labels, seeds[1], options.crop_probability, options.min_crop_fraction
        )
    if options.flip:
        image, labels = random_flip(image, labels, seeds[0])
    image, labels = resize_with_pad(image, labels, size, antialias=False, height=height)
    if options.rotate_scale:
        image, labels = random_rotate_scale(
            image, labels, seeds[3], options.max_rotation_degrees, options.scale_range
        )
    if options.elastic:
        image, labels = elastic_deform(
            image, labels, seeds[4], options.elastic_alpha, options.elastic_sigma
        )
    if options.stain_jitter:
        # Last, at the fixed output size; black padding stays black (its stain amounts are so
        # large that a few percent of change leaves it at ~1e-6).
        image = stain_jitter(image, seeds[2], options.stain_sigma, options.stain_bias)
    image = tf.ensure_shape(image, [height, size, 3])
    labels = tf.ensure_shape(labels, [height, size])
    return image, labels
