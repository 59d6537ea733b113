"""Post-processing of U-Net probabilities into gland instance maps, in NumPy/SciPy and in TF ops.

Pipeline (the same rules in both implementations, so that they agree pixel for pixel):

1. threshold: `mask = probability > threshold` (compared in float32);
2. instances: 8-connected components of `mask`, or
   - `split="contour"`: components of `mask & ~(contour > contour_threshold)` with at least
     `min_seed_size` pixels are seeds, grown back into `mask` by iterative label dilation: each
     step, every unlabelled mask pixel with a labelled 8-neighbour takes the largest
     neighbouring label (labels being the raster index of each seed's first pixel, so the tie
     rule is "the seed that starts last wins"), until stable.
     Mask components that contain no seed (e.g. all contour) are kept as their own instances.
     Dropping small seeds keeps a noisy contour map from cutting slivers off a gland: their
     pixels go to the neighbouring seed instead;
   - `split="watershed"` (NumPy only): watershed of the negated Euclidean distance transform
     from its h-maxima (`watershed_h` pixels deep) inside `mask`;
3. `fill_holes`: holes are the 4-connected background regions (the dual of 8-connected
   objects) not touching the image border; each takes, whole, the largest label among the object
   pixels 8-adjacent to it: the enclosing gland's label, or for a hole enclosed by several glands
   the one whose first pixel comes last in raster order;
4. `min_size`: objects with fewer pixels are removed;
5. objects are numbered 1..K in raster order of their first pixel (as `scipy.ndimage.label`).

Internally labels are "first-pixel labels": 0 for background, otherwise 1 + the flat raster index
of a pixel of the object (its first pixel for connected components). They are unique per object,
bounded by H*W, and ordered like SciPy's labels, which is what makes the two implementations
agree, tie rule included.

TensorFlow core has no connected-components op; `connected_components` is min-label propagation
with hooking and pointer jumping in a `tf.while_loop` (6-8 iterations on GlaS masks and on
spirals), traceable with unknown shapes and XLA-compilable.
"""
import dataclasses

import numpy as np
import tensorflow as tf
from scipy import ndimage

SPLIT_METHODS = ("none", "contour", "watershed")
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class PostprocessOptions:
    """How probabilities become instances.

    Attributes:
        threshold: foreground if `probability > threshold`, in (0, 1).
        min_size: objects with fewer pixels are removed (0 keeps everything).
        fill_holes: fill background regions enclosed by objects.
        split: `"none"`, `"contour"` (needs the contour head's probabilities) or `"watershed"`
            (NumPy only).
        contour_threshold: contour pixels are `contour > contour_threshold`, in (0, 1).
        min_seed_size: `split="contour"` only: seed components with fewer pixels are dropped
            (0 keeps every seed).
        watershed_h: depth in pixels of the distance-transform maxima that seed the watershed;
            larger values split less.
    """

    threshold: float = 0.5
    min_size: int = 0
    fill_holes: bool = False
    split: str = "none"
    contour_threshold: float = 0.5
    min_seed_size: int = 0
    watershed_h: float = 3.0

    def __post_init__(self):
        for name in ("threshold", "contour_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"PostprocessOptions.{name} must be in (0, 1), got {value!r}")
        for name in ("min_size", "min_seed_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"PostprocessOptions.{name} must be an integer >= 0, got {value!r}"
                )
        if not isinstance(self.fill_holes, bool):
            raise ValueError(
                f"PostprocessOptions.fill_holes must be true or false, got {self.fill_holes!r}"
            )
        if self.split not in SPLIT_METHODS:
            raise ValueError(
                f"PostprocessOptions.split must be one of {', '.join(SPLIT_METHODS)}, "
                f"got {self.split!r}"
            )
        if not isinstance(self.watershed_h, (int, float)) or self.watershed_h <= 0:
            raise ValueError(
                f"PostprocessOptions.watershed_h must be > 0, got {self.watershed_h!r}"
            )


# --------------------------------------------------------------------------------------------
# NumPy / SciPy
# --------------------------------------------------------------------------------------------


def _np_first_pixel_labels(labels):
    """int (H, W) object ids -> int32 (H, W) first-pixel labels (0 stays background)."""
    values, first = np.unique(labels.ravel(), return_index=True)
    lookup = np.zeros(int(values.max(initial=0)) + 1, np.int32)
    lookup[values] = first + 1
    lookup[0] = 0
    return lookup[labels]


def _np_components(mask, structure=_EIGHT_CONNECTED):
    """bool (H, W) -> int32 (H, W) first-pixel labels of the connected components."""
    labels, _ = ndimage.label(mask, structure=structure)
    return _np_first_pixel_labels(labels)


def _np_grow_labels(labels, region):
    """Dilates labels into the unlabelled pixels of `region`, largest neighbour label first."""
    while True:
        neighbour_max = ndimage.maximum_filter(labels, size=3, mode="constant", cval=0)
        grown = np.where(region & (labels == 0), neighbour_max, labels)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _np_add_unlabelled_components(labels, mask):
    """Gives the mask pixels that no seed reached first-pixel labels of their own components."""
    leftover = mask & (labels == 0)
    return np.where(leftover, _np_components(leftover), labels)


def _np_watershed_labels(mask, h):
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(mask)
    markers, _ = ndimage.label(h_maxima(distance, h), structure=_EIGHT_CONNECTED)
    labels = watershed(-distance, markers, mask=mask, connectivity=2)
    return _np_add_unlabelled_components(_np_first_pixel_labels(labels), mask)


def _np_fill_holes(labels):
    background = np.pad(labels == 0, 1, constant_values=True)
    # The padded frame is background, so the outside is the region of pixel (0, 0): label 1.
    regions = _np_components(background, _FOUR_CONNECTED)[1:-1, 1:-1]
    holes = (labels == 0) & (regions != 1)
    surrounding = ndimage.maximum_filter(labels, size=3, mode="constant", cval=0)
    fill = np.zeros(regions.max(initial=0) + 1, labels.dtype)
    np.maximum.at(fill, regions[holes], surrounding[holes])
    return np.where(holes, fill[regions], labels)


def _np_remove_small(labels, min_size):
    sizes = np.bincount(labels.ravel())
    return np.where(sizes[labels] >= min_size, labels, 0)


def _np_relabel_in_raster_order(labels):
    """Object ids -> int32 1..K numbered in raster order of each object's first pixel."""
    first_pixel = _np_first_pixel_labels(labels)
    starts = np.unique(first_pixel[first_pixel > 0])  # sorted, i.e. in raster order
    lookup = np.zeros(first_pixel.size + 1, np.int32)
    lookup[starts] = np.arange(1, starts.size + 1)
    return lookup[first_pixel]


def _check_probability_map(name, array, shape=None):
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(
            f"postprocess_instances: {name} must be a 2-D (H, W) map, got shape {array.shape}"
        )
    if shape is not None and array.shape != shape:
        raise ValueError(
            f"postprocess_instances: {name} has shape {array.shape}, probability has {shape}"
        )
    return array.astype(np.float32, copy=False)


def postprocess_instances(probability, contour=None, options=PostprocessOptions()):
    """Turns a foreground probability map into an instance map (NumPy/SciPy).

    Args:
        probability: float `(H, W)` foreground probabilities.
        contour: float `(H, W)` contour probabilities; required for `split="contour"`.
        options: `PostprocessOptions`.

    Returns:
        int32 `(H, W)`: 0 background, 1..K objects in raster order of their first pixel.
    """
    probability = _check_probability_map("probability", probability)
    mask = probability > np.float32(options.threshold)
    if options.split == "contour":
        if contour is None:
            raise ValueError(
                "postprocess_instances: split='contour' needs the contour probability map"
            )
        contour = _check_probability_map("contour", contour, probability.shape)
        seeds = _np_components(mask & ~(contour > np.float32(options.contour_threshold)))
        if options.min_seed_size > 0:
            seeds = _np_remove_small(seeds, options.min_seed_size)
        labels = _np_grow_labels(seeds, mask)
        labels = _np_add_unlabelled_components(labels, mask)
    elif options.split == "watershed":
        labels = _np_watershed_labels(mask, options.watershed_h)
    else:
        labels = _np_components(mask)
    if options.fill_holes:
        labels = _np_fill_holes(labels)
    if options.min_size > 0:
        labels = _np_remove_small(labels, options.min_size)
    return _np_relabel_in_raster_order(labels)


# --------------------------------------------------------------------------------------------
# TensorFlow (graph-friendly: unknown N, H, W; used inside the exported SavedModel)
# --------------------------------------------------------------------------------------------


def _neighbourhood_extreme(labels, extreme, padding, connectivity=8):
    """Max (or min) over each pixel's 3x3 (8) or cross (4) neighbourhood, itself included.

    Args:
        labels: int32 `(N, H, W)`.
        extreme: `tf.maximum` or `tf.minimum`.
        padding: value outside the image; must never win `extreme`.
        connectivity: 8 or 4.

    Shifted slices rather than `tf.nn.max_pool2d`, whose int32 CPU kernel is ~25x slower.
    """
    padded = tf.pad(labels, [[0, 0], [1, 1], [1, 1]], constant_values=padding)
    rows = extreme(extreme(padded[:, :, :-2], padded[:, :, 1:-1]), padded[:, :, 2:])
    if connectivity == 8:
        return extreme(extreme(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
    columns = extreme(padded[:, :-2, 1:-1], padded[:, 2:, 1:-1])
    return extreme(rows[:, 1:-1], columns)


def _iterate_until_stable(step, labels):
    """Applies `step` to int32 labels until they stop changing."""

    def body(labels, _):
        updated = step(labels)
        return updated, tf.reduce_any(tf.not_equal(updated, labels))

    labels, _ = tf.while_loop(lambda _, changed: changed, body, (labels, tf.constant(True)))
    return labels


def _component_first_pixel_labels(mask, connectivity=8):
    """bool (N, H, W) -> int32 (N, H, W): 1 + flat index of each component's first pixel, else 0.

    Each pixel holds a label naming a pixel of its component ("parent" = label - 1) whose label is
    no larger; it starts as its own index + 1. Every step (i) takes the neighbourhood minimum,
    (ii) hooks: hands that minimum on to the parent too, so a whole tree learns of a smaller
    neighbour at once, and (iii) pointer-jumps twice (label <- parent's label). Without (ii) and
    (iii) a long snake or spiral would need one step per pixel of its length. The fixed point is the
    component minimum, i.e. its first pixel's index + 1.
    """
    shape = tf.shape(mask)
    batch, size = shape[0], shape[1] * shape[2]
    total = batch * size
    outside = size + 1  # larger than any label: never wins a minimum
    index = tf.reshape(tf.range(1, size + 1, dtype=tf.int32), shape[1:])
    labels = tf.where(mask, tf.broadcast_to(index, shape), outside)
    on_mask = tf.reshape(mask, [-1])
    offsets = tf.range(batch)[:, tf.newaxis, tf.newaxis] * size  # images side by side in `flat`
    offsets = tf.reshape(tf.broadcast_to(offsets, shape), [-1])

    def parents(flat, background):
        """Global flat position of each pixel's parent; `background` for background pixels."""
        return tf.where(on_mask, offsets + flat - 1, background)

    def step(labels):
        neighbour_min = _neighbourhood_extreme(labels, tf.minimum, outside, connectivity)
        neighbour_min = tf.reshape(tf.where(mask, neighbour_min, outside), [-1])
        flat = tf.reshape(labels, [-1])
        hooked = tf.math.unsorted_segment_min(neighbour_min, parents(flat, total), total + 1)
        hooked = hooked[:total]
        flat = tf.minimum(neighbour_min, hooked)
        for _ in range(2):
            flat = tf.where(on_mask, tf.gather(flat, parents(flat, 0)), flat)
        return tf.reshape(flat, shape)

    labels = _iterate_until_stable(step, labels)
    return tf.where(mask, labels, 0)


def _segment_ids(labels, max_label=None):
    """int32 (N, H, W) labels in [0, max_label] (default H*W) -> flat (N, H*W) labels, segment ids
    unique per image and label, and the number of segments."""
    shape = tf.shape(labels)
    batch, size = shape[0], shape[1] * shape[2]
    max_label = size if max_label is None else max_label
    flat = tf.reshape(labels, [batch, size])
    ids = flat + tf.range(batch)[:, tf.newaxis] * (max_label + 1)
    return flat, ids, batch * (max_label + 1)


def _first_pixel_labels(labels):
    """int32 (N, H, W) object ids in [0, H*W] -> first-pixel labels."""
    shape = tf.shape(labels)
    flat, ids, count = _segment_ids(labels)
    index = tf.broadcast_to(tf.range(shape[1] * shape[2]), tf.shape(flat))
    first = tf.math.unsorted_segment_min(index, ids, count)
    return tf.reshape(tf.where(flat > 0, tf.gather(first, ids) + 1, 0), shape)


def _consecutive_labels(first_pixel_labels):
    """First-pixel labels -> 1..K per image, in raster order of the first pixels."""
    shape = tf.shape(first_pixel_labels)
    flat, ids, count = _segment_ids(first_pixel_labels)
    present = tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, count) > 0
    present = tf.reshape(tf.cast(present, tf.int32), [shape[0], -1])
    rank = tf.cumsum(present[:, 1:], axis=1)  # rank[:, i] = objects starting at or before i + 1
    rank = tf.pad(rank, [[0, 0], [1, 0]])  # background (label 0) stays 0
    return tf.reshape(tf.gather(rank, flat, batch_dims=1), shape)


def _batch_of_maps(function, name, value, dtype):
    value = tf.convert_to_tensor(value, dtype)
    if value.shape.rank not in (None, 3):
        raise ValueError(f"{function}: {name} must be a batch (N, H, W), got shape {value.shape}")
    return value


def connected_components(mask):
    """8-connected components of a batch of masks, in TF ops.

    Args:
        mask: bool `(N, H, W)`.

    Returns:
        int32 `(N, H, W)`: 0 background, 1..K per image in raster order of each component's first
        pixel, identical to `scipy.ndimage.label(mask[n], structure=np.ones((3, 3)))[0]`.
    """
    mask = _batch_of_maps("connected_components", "mask", mask, tf.bool)
    return _consecutive_labels(_component_first_pixel_labels(mask))


def _grow_labels(labels, region):
    """Dilates labels into the unlabelled pixels of `region`, largest neighbour label first."""

    def step(labels):
        neighbour_max = _neighbourhood_extreme(labels, tf.maximum, 0)
        return tf.where(region & (labels == 0), neighbour_max, labels)

    return _iterate_until_stable(step, labels)


def _add_unlabelled_components(labels, mask):
    leftover = mask & (labels == 0)
    return tf.where(leftover, _component_first_pixel_labels(leftover), labels)


def _fill_holes(labels):
    background = tf.pad(labels == 0, [[0, 0], [1, 1], [1, 1]], constant_values=True)
    # The padded frame is background, so the outside is the region of pixel (0, 0): label 1.
    regions = _component_first_pixel_labels(background, connectivity=4)[:, 1:-1, 1:-1]
    holes = (labels == 0) & (regions != 1)
    surrounding = tf.where(holes, _neighbourhood_extreme(labels, tf.maximum, 0), 0)
    padded_size = (tf.shape(labels)[1] + 2) * (tf.shape(labels)[2] + 2)
    _, ids, count = _segment_ids(regions, padded_size)
    fill = tf.math.unsorted_segment_max(tf.reshape(surrounding, tf.shape(ids)), ids, count)
    fill = tf.gather(fill, ids)
    return tf.where(holes, tf.reshape(fill, tf.shape(labels)), labels)


def _remove_small(labels, min_size):
    shape = tf.shape(labels)
    _, ids, count = _segment_ids(labels)
    sizes = tf.gather(tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, count), ids)
    return tf.where(tf.reshape(sizes, shape) >= min_size, labels, 0)


def tf_postprocess_instances(probability, contour=None, options=PostprocessOptions()):
    """TF version of `postprocess_instances` for a batch (split "none" or "contour").

    Runs inside a `tf.function` with unknown `(None, None, None)` shapes.

    Args:
        probability: float32 `(N, H, W)` foreground probabilities.
        contour: float32 `(N, H, W)` contour probabilities, required for `split="contour"`.
        options: `PostprocessOptions` (static).

    Returns:
        int32 `(N, H, W)`, equal to `postprocess_instances` applied to each image.
    """
    if options.split == "watershed":
        raise ValueError(
            "tf_postprocess_instances: split='watershed' exists only in NumPy "
            "(keras_glas.postprocess.postprocess_instances); use split='none' or 'contour'"
        )
    probability = _batch_of_maps("tf_postprocess_instances", "probability", probability, tf.float32)
    mask = probability > options.threshold
    if options.split == "contour":
        if contour is None:
            raise ValueError(
                "tf_postprocess_instances: split='contour' needs the contour probabilities"
            )
        contour = _batch_of_maps("tf_postprocess_instances", "contour", contour, tf.float32)
        seeds = _component_first_pixel_labels(mask & ~(contour > options.contour_threshold))
        if options.min_seed_size > 0:
            seeds = _remove_small(seeds, options.min_seed_size)
        labels = _grow_labels(seeds, mask)
        labels = _add_unlabelled_components(labels, mask)
    else:
        labels = _component_first_pixel_labels(mask)
    if options.fill_holes:
        labels = _fill_holes(labels)
    if options.min_size > 0:
        labels = _remove_small(labels, options.min_size)
    return _consecutive_labels(_first_pixel_labels(labels))
