"""Streaming `tf.data` input pipeline for GlaS: examples → augmented, batched model inputs.

`make_dataset` reads a TFDS dataset (`glas`, `glas/synthetic`, `glas/binary_masks`) or any
`tf.data.Dataset` of `{"image", "instances"[, "name"]}` examples and yields batches for the U-Net
(`model="unet"`), for Mask R-CNN (`model="maskrcnn"`) or for evaluation (`model="eval"`).
Everything after reading is graph ops run in parallel by tf.data, so memory stays flat however
large the dataset is (unless `cache=True` is asked for) and the accelerator is kept fed.
"""

import tensorflow as tf

from keras_glas.augment import (
    AugmentOptions,
    augment_and_resize,
    cached_side,
    shrink_to_fit,
)

MODELS = ("unet", "maskrcnn", "eval")
# Examples held by the shuffle buffer. GlaS has 85 training images, so it shuffles the whole split;
# for larger datasets it bounds memory (a decoded 775×522 example with int32 ids is ~2.8 MB).
SHUFFLE_BUFFER = 256
# Original U-Net border weights (Ronneberger et al. 2015): w0 and sigma in pixels of the network
# input; the distances d1, d2 are followed up to 4 sigma, beyond which the term is < w0 * e^-8.
BORDER_W0 = 10.0
BORDER_SIGMA = 5.0
BORDER_MAX_DISTANCE = 20
_INTEGER_DTYPES = (tf.uint8, tf.uint16, tf.int32, tf.int64)


class DatasetError(ValueError):
    """The records of a prepared dataset are missing or damaged; the message names the dataset,
    its files or data_dir, and the fix (rebuild or copy again)."""


def damaged_records_error(name, data_dir, error):
    """The `DatasetError` for a `tf.errors.DataLossError` met while reading `name`.

    A flipped byte keeps the file size that `make_dataset` checks, so TensorFlow finds it only
    when it reads the record, and its message names an offset, not the dataset.
    """
    return DatasetError(
        f"the records of {name!r} in data_dir {data_dir or '~/tensorflow_datasets'!r} are "
        f"damaged ({error.message.splitlines()[0]}); rebuild the dataset (tfds build {name} "
        "--imports tfds_glas) or copy its files again"
    )


def make_dataset(
    source,
    split="train",
    model="unet",
    batch_size=6,
    image_size=512,
    input_height=None,
    augment=True,
    seed=None,
    data_dir=None,
    cache=False,
    contour=False,
    contour_gap=0,
    border_weights=False,
    max_instances=100,
    shuffle=None,
    drop_remainder=None,
):
    """Builds the input pipeline for one split.

    Args:
        source: a TFDS name (`"glas"`, `"glas/synthetic"`, `"glas/binary_masks"`), already
            prepared in `data_dir`, or a `tf.data.Dataset` of examples `{"image": uint8 (H, W, 3),
            "instances": uint8/uint16/int32/int64 (H, W)[, "name": string]}` (0 = background).
        split: TFDS split, slicing included (`"train[:10%]"`); ignored for a `tf.data.Dataset`.
        model: `"unet"`, `"maskrcnn"` or `"eval"` (see Returns).
        batch_size: examples per batch (eval always uses 1).
        image_size: the training scale S: images are resized keeping their aspect ratio so that
            their longer side is S, and centred on an H×S canvas (zero-padded, or cropped where
            taller than H) for unet and maskrcnn; eval keeps the full size.
        input_height: H, the height of the network input; `None` = S (a square). A lower canvas
            suits landscape images: GlaS's are 384×259 at S = 384, so H = 272 holds them whole
            with 29% fewer pixels than 384×384 (epochs 22% shorter on an AVX2 CPU).
        augment: `True` (the seed study's flips + crop), `False`, or an `AugmentOptions`.
            Ignored for eval.
        seed: int. Given a seed, the batches (order and augmentation) are the same on every run,
            and differ from epoch to epoch in a reproducible way.
        data_dir: TFDS data directory.
        cache: `True` caches the decoded examples in memory (before augmentation, so every epoch
            is still augmented afresh); a string caches them to files with that path prefix.
            Except for eval, examples are cached already shrunk (anti-aliased) to a longer side
            of `augment.cached_side(image_size, options)` (1.25·S with crops, S without), so
            that an epoch only crops, flips and resizes by a small factor: use a cache for speed.
        contour: unet only: add the gland-boundary target `"contour"`.
        contour_gap: unet with `contour` only: the contour target also covers the background
            between two glands where the gap is at most this many pixels of the network input
            (d1 + d2, see `contour_map`), 0..`BORDER_MAX_DISTANCE`; 0 = boundaries only.
        border_weights: unet only: also yield the original U-Net border weight map as
            `sample_weight`.
        max_instances: maskrcnn only: N, the padded number of boxes; an image with more
            instances after augmentation stops the pipeline with an error naming it.
        shuffle: shuffle the examples each epoch; default: on when augmenting, off otherwise.
        drop_remainder: drop the last incomplete batch so that every batch has the static shape
            (B, H, S, ...) XLA and `tf.distribute` want; default: on when augmenting.

    Returns:
        A `tf.data.Dataset` of
        - unet: `(x, y)` or, with `border_weights`, `(x, y, sample_weight)`: x float32
          (B, H, S, 3) in [0, 1]; y `{"mask": float32 (B, H, S, 1)[, "contour": float32
          (B, H, S, 1)]}`; sample_weight `{"mask": float32 (B, H, S)[, "contour": ones]}`.
        - maskrcnn: `(x, y)`, y `{"boxes": float32 (B, N, 4)` pixel yxyx (max edges exclusive:
          a box covers rows ymin..ymax-1) padded with -1, `"classes": float32 (B, N)` 0 = gland,
          -1 = padding, `"instances": int32 (B, H, S)` with id k+1 the object of `boxes[:, k]`}.
        - eval: `{"image": uint8 (1, H, W, 3), "instances": int32 (1, H, W), "name": (1,)}`,
          unaugmented and full size.

    Distribution: the dataset carries `AutoShardPolicy.DATA`. GlaS is written as a single
    TFRecord file, so the default FILE policy would hand the whole dataset to one worker and
    nothing to the others (tf.data then errors); DATA makes each worker read everything and keep
    every n-th element. Within a worker, `strategy.experimental_distribute_dataset` splits each
    global batch across the replicas (use `drop_remainder` so all replicas get equal shares).

    Raises:
        ValueError: unknown model, bad sizes, an unknown dataset or split, a dataset not prepared
            in `data_dir`, or a `tf.data.Dataset` whose elements do not look like examples.
        DatasetError (a ValueError): TFRecord files of the split that are missing or truncated.
        tf.errors.InvalidArgumentError (when iterating): an example whose image and instance map
            disagree in size, or with more than `max_instances` instances; the message names it.
        tf.errors.DataLossError (when iterating): a damaged record inside a file of the right
            size (TensorFlow's own error, "corrupted record at <offset>"; training and
            evaluation turn it into `damaged_records_error`'s `DatasetError`).
    """
    if model not in MODELS:
        raise ValueError(f"make_dataset: model must be one of {MODELS}, got {model!r}")
    for arg, value in (
        ("batch_size", batch_size),
        ("image_size", image_size),
        ("input_height", image_size if input_height is None else input_height),
        ("max_instances", max_instances),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"make_dataset: {arg} must be a positive int, got {value!r}")
    if model != "unet" and (contour or border_weights):
        raise ValueError(
            "make_dataset: contour and border_weights are targets of model='unet' only"
        )
    if not isinstance(contour_gap, int) or not 0 <= contour_gap <= BORDER_MAX_DISTANCE:
        raise ValueError(
            f"make_dataset: contour_gap must be an int in 0..{BORDER_MAX_DISTANCE}, "
            f"got {contour_gap!r}"
        )
    if contour_gap and not contour:
        raise ValueError("make_dataset: contour_gap > 0 shapes the contour target: set contour")
    options = AugmentOptions.resolve(augment)
    if model == "eval":
        options, shuffle = AugmentOptions.resolve(False), False
    if shuffle is None:
        shuffle = options.any

    examples = load_examples(source, split, data_dir)
    if model != "eval":
        # The anti-aliased shrink of full-resolution images is the costliest step; done here,
        # before the cache, it runs once instead of every epoch (see augment.CACHE_OVERSAMPLE).
        examples = examples.map(
            _shrink_example_fn(cached_side(image_size, options)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    if cache:
        examples = examples.cache(cache if isinstance(cache, str) else "")
    if shuffle:
        examples = examples.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)

    if model == "eval":
        dataset = examples.batch(1)
    else:
        # One (2,) seed per example from a seeded random stream: reproducible, and new each epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        prepare = _training_example_fn(
            model, image_size, input_height, options, contour, contour_gap, border_weights,
            max_instances,
        )
        dataset = tf.data.Dataset.zip(examples, seeds).map(
            prepare, num_parallel_calls=tf.data.AUTOTUNE
        )
        if drop_remainder is None:
            drop_remainder = options.any
        dataset = dataset.batch(
            batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE
        )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    dataset_options = tf.data.Options()
    # Without a seed a shuffled order is arbitrary anyway: let parallel maps hand out elements
    # as soon as they are ready. Otherwise (a seed, or an unshuffled order) keep the order.
    dataset_options.deterministic = seed is not None or not shuffle
    dataset_options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return dataset.with_options(dataset_options)


def load_examples(source, split="train", data_dir=None):
    """Reads examples as `{"image": uint8 (H, W, 3), "instances": int32 (H, W), "name": string}`.

    Args:
        source: TFDS name or `tf.data.Dataset` (see `make_dataset`).
        split: TFDS split string (ignored for a `tf.data.Dataset`).
        data_dir: TFDS data directory.
    Returns:
        An unbatched `tf.data.Dataset`. Each example is checked when read: an image and instance
        map of different sizes is an `InvalidArgumentError` naming the example.
    """
    if isinstance(source, tf.data.Dataset):
        examples = _from_dataset(source)
    elif isinstance(source, str):
        examples = _from_tfds(source, split, data_dir)
    else:
        raise ValueError(
            "make_dataset: source must be a TFDS name such as 'glas/synthetic' or a "
            f"tf.data.Dataset, got {source!r}"
        )
    return examples.map(_checked_example, num_parallel_calls=tf.data.AUTOTUNE)


def _from_dataset(dataset):
    """Validates the element spec of a user dataset and names its examples if they have no name."""
    spec = dataset.element_spec
    if not isinstance(spec, dict) or "image" not in spec or "instances" not in spec:
        raise ValueError(
            "make_dataset: a tf.data.Dataset source must yield dicts with keys 'image' and "
            f"'instances', got element_spec {spec!r}"
        )
    image, instances = spec["image"], spec["instances"]
    if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] not in (3, None):
        raise ValueError(f"make_dataset: source 'image' must be uint8 (H, W, 3), got {image!r}")
    if instances.dtype not in _INTEGER_DTYPES or instances.shape.rank != 2:
        raise ValueError(
            f"make_dataset: source 'instances' must be an integer (H, W) map, got {instances!r}"
        )
    if "name" in spec:
        return dataset.map(lambda ex: {k: ex[k] for k in ("image", "instances", "name")})
    return dataset.enumerate().map(
        lambda index, ex: {
            "image": ex["image"],
            "instances": ex["instances"],
            "name": tf.strings.format("example_{}", index),
        }
    )


def _from_tfds(name, split, data_dir):
    """Loads a prepared TFDS split, with errors that name the dataset, split and data_dir."""
    import tensorflow_datasets as tfds

    import tfds_glas  # noqa: F401  (registers the `glas` builder)

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # TFDS raises several types (DatasetNotFoundError, ValueError...).
        raise ValueError(f"make_dataset: unknown TFDS dataset {name!r} ({error})") from error
    if not builder.is_prepared():
        raise ValueError(
            f"make_dataset: TFDS dataset {name!r} is not prepared in data_dir "
            f"{str(builder.data_dir_root)!r}; build it first, e.g. `tfds build "
            f"glas/{builder.builder_config.name} --imports tfds_glas "
            f"--data_dir {builder.data_dir_root}` (or pass the right data_dir)"
        )
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(
            f"make_dataset: split {split!r} does not exist in {name!r}; available splits: "
            f"{sorted(builder.info.splits)} (slicing such as 'train[:10%]' is allowed) ({error})"
        ) from error
    _check_record_files(builder, split, name)
    return dataset.map(lambda ex: {k: ex[k] for k in ("image", "instances", "name")})


# TFRecord framing: every record is stored with a uint64 length and two uint32 CRCs.
_TFRECORD_OVERHEAD_BYTES = 16


def _check_record_files(builder, split, name):
    """Raises a clear error when a TFRecord file of `split` is missing or truncated.

    TFDS records the payload size of each split; a copy whose files do not add up to it (an
    interrupted download or copy) would otherwise fail mid-epoch with a bare `DataLossError`.
    A byte flipped inside a file keeps its size: that still surfaces, when the record is read,
    as TensorFlow's `DataLossError: corrupted record at <offset>`.
    """
    if str(builder.info.file_format).split(".")[-1].lower() != "tfrecord":
        return
    needed = {file.filename for file in builder.info.splits[split].file_instructions}
    for split_info in builder.info.splits.values():
        paths = [f"{builder.data_dir}/{filename}" for filename in split_info.filenames]
        if not needed.intersection(paths):
            continue
        missing = [path for path in paths if not tf.io.gfile.exists(path)]
        if missing:
            raise DatasetError(
                f"make_dataset: {name!r} is missing record files {missing}; rebuild it (tfds build)"
            )
        size = sum(tf.io.gfile.stat(path).length for path in paths)
        expected = int(split_info.num_bytes) + _TFRECORD_OVERHEAD_BYTES * split_info.num_examples
        if size != expected:
            raise DatasetError(
                f"make_dataset: corrupt records in {name!r} split {split_info.name!r}: its files "
                f"{paths} hold {size} bytes, {expected} were written (truncated or damaged copy); "
                "rebuild it (tfds build) or copy the files again"
            )


def _checked_example(example):
    """Casts instances to int32 and asserts that image and instance map have the same size."""
    image, instances, name = (
        example["image"],
        tf.cast(example["instances"], tf.int32),
        example["name"],
    )
    image_shape, instances_shape = tf.shape(image), tf.shape(instances)
    valid = tf.reduce_all(tf.equal(image_shape[:2], instances_shape)) & tf.equal(image_shape[2], 3)
    valid = valid & tf.reduce_all(image_shape[:2] > 0) & (tf.reduce_min(instances) >= 0)
    with tf.control_dependencies(
        [
            tf.debugging.Assert(
                valid,
                [
                    "make_dataset: corrupt example",
                    name,
                    ": image shape",
                    image_shape,
                    "and instances shape",
                    instances_shape,
                    "must be (H, W, 3) and (H, W) with H, W > 0 and ids >= 0",
                ],
            )
        ]
    ):
        return {"image": tf.identity(image), "instances": tf.identity(instances), "name": name}


def _shrink_example_fn(side):
    """Returns the `map` function that applies `shrink_to_fit(..., side)` to an example."""

    def shrink(example):
        image, instances = shrink_to_fit(example["image"], example["instances"], side)
        return {"image": image, "instances": instances, "name": example["name"]}

    return shrink


def _training_example_fn(
    model, image_size, input_height, options, contour, contour_gap, border_weights, max_instances
):
    """Returns the `map` function: (example, seed) → augmented model input and targets."""

    def prepare(example, seed):
        image, labels = augment_and_resize(
            example["image"], example["instances"], image_size, options, seed, input_height
        )
        if model == "maskrcnn":
            return image, maskrcnn_targets(labels, max_instances, example["name"])
        targets = {"mask": tf.cast(labels > 0, tf.float32)[..., None]}
        # One wavefront serves both the border weights and the gap-covering contour target.
        gaps = gland_gap_widths(labels) if border_weights or contour_gap else None
        if contour:
            targets["contour"] = contour_map(labels, gaps, contour_gap)[..., None]
        if not border_weights:
            return image, targets
        weights = {"mask": border_weight_map(labels, gaps=gaps)}
        if contour:
            weights["contour"] = tf.ones_like(weights["mask"])
        return image, targets, weights

    return prepare


def _neighbour_max_1d(values, axis):
    """Maximum of each pixel and its two neighbours along `axis` of a float32 (H, W) map.

    Shifted slices instead of `tf.nn.max_pool2d`, whose CPU kernel is ~15× slower on a
    single-channel map; `-inf` padding keeps the image edges from counting as neighbours.
    """
    pad = [[1, 1], [0, 0]] if axis == 0 else [[0, 0], [1, 1]]
    padded = tf.pad(values, pad, constant_values=float("-inf"))
    if axis == 0:
        return tf.maximum(tf.maximum(padded[:-2], padded[1:-1]), padded[2:])
    return tf.maximum(tf.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])


def _max_pool(values):
    """3×3 maximum of a float32 (H, W) map (image edges do not count as neighbours)."""
    return _neighbour_max_1d(_neighbour_max_1d(values, 0), 1)


def contour_map(labels, gaps=None, max_gap=0):
    """Gland boundary pixels of an instance map, float32 (H, W) in {0, 1}.

    A pixel is on a boundary when it belongs to a gland and its 3×3 neighbourhood holds another
    id (background or a touching gland); the boundary is then dilated by one pixel (3 px wide),
    which separates touching glands. The image edge is not a boundary. With `max_gap` > 0 the
    map also covers the background pixels whose d1 + d2 (`gaps`) is at most `max_gap`: the
    narrow strips of stroma between close glands, whole. A contour head trained on that learns
    to cut a mask that bridges such a strip, where the boundaries alone leave a path between
    the two glands' seeds (`postprocess`'s contour split seeds on mask and not contour).

    Args:
        labels: int32 (H, W) instance map.
        gaps: float32 (H, W) `gland_gap_widths(labels)`; needed when `max_gap` > 0.
        max_gap: widest gap, in pixels, that the map covers; 0 = boundaries only.
    """
    ids = tf.cast(labels, tf.float32)
    neighbour_max = _max_pool(ids)
    neighbour_min = -_max_pool(-ids)
    boundary = (ids > 0) & ((neighbour_max != ids) | (neighbour_min != ids))
    contour = _max_pool(tf.cast(boundary, tf.float32))
    if max_gap <= 0:
        return contour
    if gaps is None:
        raise ValueError("contour_map: max_gap > 0 needs gaps = gland_gap_widths(labels)")
    narrow_gap = (ids == 0) & (gaps <= float(max_gap))
    return tf.maximum(contour, tf.cast(narrow_gap, tf.float32))


def _dilate(values, step):
    """Neighbourhood maximum of a float32 (H, W) map: a cross on odd steps, a square on even.

    Alternating the two gives octagonal distances, a closer approximation of the Euclidean
    distance than either alone (chessboard or city-block).
    """
    if step % 2 == 0:
        return _max_pool(values)
    return tf.maximum(_neighbour_max_1d(values, 0), _neighbour_max_1d(values, 1))


def gland_gap_widths(labels, max_distance=BORDER_MAX_DISTANCE):
    """d1 + d2 of every pixel, float32 (H, W): its distances to the nearest and the
    second-nearest gland (0 + the distance to another gland on a gland pixel; for a background
    pixel between two glands, about the width of the gap it lies in).

    The distances are found by a wavefront of `max_distance` iterative dilations that carries the
    nearest and second-nearest gland ids (octagonal distance, see `_dilate`; a wavefront keeps
    only two ids per pixel, so a third gland that is closer through a neighbour is missed).
    Pixels with no second gland within `max_distance` get `inf`.

    Args:
        labels: int32 (H, W) instance map.
    """
    ids = tf.cast(labels, tf.float32)
    # Ids live in [1, big); big - id > 0 lets a max-pool find the smallest neighbouring id.
    big = tf.reduce_max(ids) + 1.0
    infinity = tf.fill(tf.shape(ids), float("inf"))
    nearest, second = ids, tf.zeros_like(ids)
    d1, d2 = tf.where(ids > 0, 0.0, infinity), infinity

    for step in range(1, max_distance + 1):
        neighbour_max = tf.maximum(_dilate(nearest, step), _dilate(second, step))
        inverted_min = tf.maximum(
            _dilate(tf.where(nearest > 0, big - nearest, 0.0), step),
            _dilate(tf.where(second > 0, big - second, 0.0), step),
        )
        neighbour_min = tf.where(inverted_min > 0, big - inverted_min, 0.0)
        reached = (nearest == 0) & (neighbour_max > 0)
        nearest = tf.where(reached, neighbour_max, nearest)
        d1 = tf.where(reached, float(step), d1)
        # Any neighbouring id other than this pixel's nearest one is its second-nearest gland.
        other = tf.where(
            neighbour_max != nearest,
            neighbour_max,
            tf.where(neighbour_min != nearest, neighbour_min, 0.0),
        )
        reached = (second == 0) & (other > 0)
        second = tf.where(reached, other, second)
        d2 = tf.where(reached, float(step), d2)
    return d1 + d2


def border_weight_map(labels, w0=BORDER_W0, sigma=BORDER_SIGMA, gaps=None):
    """The original U-Net weight map w = w_c + w0·exp(-(d1 + d2)² / (2σ²)), float32 (H, W).

    d1 and d2 are the distances of a background pixel to the nearest and the second-nearest
    gland (`gland_gap_widths`, followed up to `BORDER_MAX_DISTANCE`, beyond which the term is
    below w0·exp(-BORDER_MAX_DISTANCE²/(2σ²))). The term applies to background pixels only
    (the gaps between glands). w_c balances the classes per image: N / (2 N_c) for each class c
    present in both; 1 everywhere when the image has a single class.

    Args:
        labels: int32 (H, W) instance map.
        gaps: `gland_gap_widths(labels)` when the caller has it already; computed otherwise.
    """
    gaps = gland_gap_widths(labels) if gaps is None else gaps
    border = w0 * tf.exp(-tf.square(gaps) / (2.0 * sigma**2))
    foreground = labels > 0
    total = tf.cast(tf.size(labels), tf.float32)
    n_foreground = tf.reduce_sum(tf.cast(foreground, tf.float32))
    n_background = total - n_foreground
    both = (n_foreground > 0) & (n_background > 0)
    w_foreground = tf.where(both, total / (2.0 * tf.maximum(n_foreground, 1.0)), 1.0)
    w_background = tf.where(both, total / (2.0 * tf.maximum(n_background, 1.0)), 1.0)
    return tf.where(foreground, w_foreground, w_background + border)


def maskrcnn_targets(labels, max_instances, name):
    """Boxes, classes and relabelled instance map of an augmented instance map.

    Boxes are recomputed from the labels (instances cropped away are gone), in increasing order
    of the original ids, and the ids are renumbered 1..K in that order.

    Args:
        labels: int32 (H, S) instance map.
        max_instances: N.
        name: string scalar, the example's name (for the error message).
    Returns:
        `{"boxes": float32 (N, 4) yxyx pixels (ymax, xmax exclusive) padded with -1,
        "classes": float32 (N,) 0 or -1 for padding, "instances": int32 (H, S)}`.
    """
    shape = tf.shape(labels)
    flat = tf.reshape(labels, [-1])
    num_ids = tf.reduce_max(flat) + 1
    positions = tf.range(tf.size(flat))
    rows, cols = positions // shape[1], positions % shape[1]
    counts = tf.math.unsorted_segment_sum(tf.ones_like(flat), flat, num_ids)
    present = (counts > 0) & (tf.range(num_ids) > 0)
    ids = tf.boolean_mask(tf.range(num_ids), present)
    count = tf.size(ids)
    assert_fits = tf.debugging.Assert(
        count <= max_instances,
        [
            "make_dataset: image",
            name,
            "has",
            count,
            f"instances, more than max_instances={max_instances}; raise max_instances",
        ],
    )
    with tf.control_dependencies([assert_fits]):
        corners = [
            tf.math.unsorted_segment_min(rows, flat, num_ids),
            tf.math.unsorted_segment_min(cols, flat, num_ids),
            tf.math.unsorted_segment_max(rows, flat, num_ids) + 1,
            tf.math.unsorted_segment_max(cols, flat, num_ids) + 1,
        ]
        boxes = tf.cast(tf.gather(tf.stack(corners, axis=-1), ids), tf.float32)
        padding = max_instances - count
        boxes = tf.pad(boxes, [[0, padding], [0, 0]], constant_values=-1.0)
        classes = tf.pad(tf.zeros([count]), [[0, padding]], constant_values=-1.0)
        new_ids = tf.scatter_nd(ids[:, None], tf.range(1, count + 1), [num_ids])
        instances = tf.gather(new_ids, labels)
    return {
        "boxes": tf.ensure_shape(boxes, [max_instances, 4]),
        "classes": tf.ensure_shape(classes, [max_instances]),
        "instances": instances,
    }
