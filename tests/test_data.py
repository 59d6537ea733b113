"""Tests of keras_glas.data.make_dataset on in-memory datasets and on `glas/synthetic`."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf

from keras_glas.augment import AugmentOptions
from keras_glas.data import border_weight_map, contour_map, gland_gap_widths, make_dataset


def example_labels(index, height=40, width=56):
    """Instances that differ per example: 2 + index % 3 rectangles, one touching the image edge."""
    labels = np.zeros((height, width), np.int32)
    for k in range(2 + index % 3):
        top, left = 3 + 11 * k, 2 + (5 * k + 3 * index) % 20
        labels[top : top + 8, left : left + 14 + k] = 10 + 3 * k  # sparse, non-consecutive ids
    labels[height - 5 :, width - 9 :] = 7
    return labels


def in_memory(count=8, height=40, width=56, named=True, instances_dtype=np.uint16):
    """`count` examples whose uniform image colour encodes their index (red = 10 * index + 5)."""
    images = np.zeros((count, height, width, 3), np.uint8)
    images[..., 0] = (10 * np.arange(count) + 5)[:, None, None]
    images[..., 1] = 128
    labels = np.stack([example_labels(i, height, width) for i in range(count)]).astype(
        instances_dtype
    )
    data = {"image": images, "instances": labels}
    if named:
        data["name"] = np.array([f"img_{i}" for i in range(count)])
    return tf.data.Dataset.from_tensor_slices(data)


def centre_index(images):
    """Example index encoded in the image colour, read at the centre pixel of each image."""
    images = np.asarray(images)
    centre = images[:, images.shape[1] // 2, images.shape[2] // 2, 0] * 255.0
    return np.round((centre - 5) / 10).astype(int).tolist()


def test_unet_batches_shapes_dtypes_and_mask():
    dataset = make_dataset(in_memory(), batch_size=4, image_size=32, seed=0)
    batches = list(dataset)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.dtype == tf.float32 and x.shape == (4, 32, 32, 3)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    assert (
        set(y) == {"mask"} and y["mask"].dtype == tf.float32 and y["mask"].shape == (4, 32, 32, 1)
    )
    assert set(np.unique(y["mask"].numpy())) == {0.0, 1.0}


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_input_height_gives_lower_batches_at_the_same_scale(model):
    # The 40×56 examples at S = 32 are 23×32: a 24-row canvas holds them whole.
    square, lower = (
        next(iter(make_dataset(in_memory(), model=model, batch_size=2, image_size=32,
                               input_height=height, augment=False)))
        for height in (None, 24)
    )
    assert square[0].shape == (2, 32, 32, 3) and lower[0].shape == (2, 24, 32, 3)
    np.testing.assert_array_equal(lower[0].numpy(), square[0].numpy()[:, 4:28])
    if model == "maskrcnn":
        assert lower[1]["instances"].shape == (2, 24, 32)
        # Real boxes move up by the 4 cropped rows; padding boxes stay -1; columns are unchanged.
        row_shift = np.where(lower[1]["classes"].numpy() >= 0, 4.0, 0.0)[..., None]
        lower_boxes, square_boxes = lower[1]["boxes"].numpy(), square[1]["boxes"].numpy()
        np.testing.assert_array_equal(lower_boxes[..., ::2] + row_shift, square_boxes[..., ::2])
        np.testing.assert_array_equal(lower_boxes[..., 1::2], square_boxes[..., 1::2])
    else:
        assert lower[1]["mask"].shape == (2, 24, 32, 1)


def test_unet_contour_and_border_weights():
    dataset = make_dataset(
        in_memory(), batch_size=2, image_size=32, augment=False, contour=True, border_weights=True
    )
    x, y, weights = next(iter(dataset))
    assert set(y) == {"mask", "contour"} and y["contour"].shape == (2, 32, 32, 1)
    assert set(weights) == {"mask", "contour"}
    assert weights["mask"].shape == (2, 32, 32) and weights["mask"].dtype == tf.float32
    np.testing.assert_array_equal(weights["contour"].numpy(), 1.0)
    # Contours lie on or next to glands, and every gland has some.
    contour, mask = y["contour"].numpy()[..., 0], y["mask"].numpy()[..., 0]
    assert contour.sum() > 0 and np.all(
        ndi.binary_dilation(mask > 0, np.ones((1, 3, 3)))[contour > 0]
    )


def test_contour_marks_boundaries_and_separates_touching_glands():
    labels = np.zeros((20, 30), np.int32)
    labels[4:16, 3:14] = 1
    labels[4:16, 14:26] = 2  # touches gland 1
    contour = contour_map(tf.constant(labels)).numpy()
    assert contour[10, 13] == 1 and contour[10, 14] == 1  # the shared border
    assert contour[4, 8] == 1 and contour[10, 3] == 1  # outer borders
    assert contour[10, 8] == 0 and contour[10, 20] == 0  # gland interiors
    assert contour[0, 0] == 0 and contour[19, 29] == 0  # far background


def test_the_image_edge_is_not_a_contour():
    labels = np.zeros((12, 16), np.int32)
    labels[:, :6] = 1  # fills the left, top and bottom edges
    contour = contour_map(tf.constant(labels)).numpy()
    np.testing.assert_array_equal(contour[:, :4], 0)  # along the image edges
    np.testing.assert_array_equal(contour[:, 4:7], 1)  # its one real boundary, 3 px wide
    np.testing.assert_array_equal(contour[:, 7:], 0)


def two_glands_and_a_far_one(gap):
    """Glands 1 and 2 side by side with `gap` background columns between them; gland 3 far off."""
    labels = np.zeros((40, 60), np.int32)
    labels[6:30, 4:20] = 1
    labels[6:30, 20 + gap : 36 + gap] = 2
    labels[6:30, 56:] = 3
    return labels


def test_gap_widths_across_a_straight_gap_are_its_width_plus_one():
    labels = two_glands_and_a_far_one(gap=4)
    gaps = gland_gap_widths(tf.constant(labels)).numpy()
    np.testing.assert_array_equal(gaps[6:30, 20:24], 5.0)  # d1 + d2 = 1 + 4, 2 + 3, ...
    # A gland pixel: 0 + the distance to the nearest other gland.
    assert gaps[15, 19] == 5.0 and gaps[15, 10] == 14.0
    assert np.isinf(gaps[39, 0])  # gland 1 is 10 px away, every other one over 20
    # Beyond max_distance no second gland is found.
    assert np.isinf(gland_gap_widths(tf.constant(labels), max_distance=2).numpy()[15, 21])  # d2 = 3


@pytest.mark.parametrize("gap", [2, 4, 7])
def test_contour_with_max_gap_covers_narrow_gaps_whole_and_leaves_wide_ones(gap):
    labels = two_glands_and_a_far_one(gap)
    gaps = gland_gap_widths(tf.constant(labels))
    boundaries = contour_map(tf.constant(labels)).numpy()
    covered = contour_map(tf.constant(labels), gaps, max_gap=6).numpy()
    between = covered[6:30, 20 : 20 + gap]
    assert set(np.unique(covered)) == {0.0, 1.0}
    if gap + 1 <= 6:
        np.testing.assert_array_equal(between, 1.0)  # the whole strip, boundaries or not
    else:
        assert between.min() == 0.0  # the middle of a wider gap stays background
    # Everything the boundaries mark stays marked; nothing is added inside glands or far away.
    assert np.all(covered >= boundaries)
    np.testing.assert_array_equal(covered[labels > 0], boundaries[labels > 0])
    np.testing.assert_array_equal(covered[:, 40 + gap : 50], 0.0)  # 20 px from glands 2 and 3
    np.testing.assert_array_equal(covered[34:, :], boundaries[34:, :])


def test_contour_max_gap_needs_the_gap_widths():
    with pytest.raises(ValueError, match="gland_gap_widths"):
        contour_map(tf.constant(two_glands_and_a_far_one(4)), max_gap=6)


def test_unet_contour_gap_widens_the_contour_target():
    def contour_targets(contour_gap):
        dataset = make_dataset(in_memory(), batch_size=8, image_size=56, augment=False,
                               contour=True, contour_gap=contour_gap, border_weights=True)
        _, y, _ = next(iter(dataset))
        return y["contour"].numpy(), y["mask"].numpy()

    (boundaries, mask), (widened, same_mask) = contour_targets(0), contour_targets(8)
    np.testing.assert_array_equal(mask, same_mask)
    assert widened.sum() > boundaries.sum()
    assert np.all(widened >= boundaries)
    assert np.all(mask[widened > boundaries] == 0)  # added pixels are background


@pytest.mark.parametrize(
    "options, message",
    [
        ({"contour": True, "contour_gap": 21}, "contour_gap must be an int in 0..20"),
        ({"contour": True, "contour_gap": 2.5}, "contour_gap must be an int"),
        ({"contour_gap": 4}, "set contour"),
    ],
)
def test_bad_contour_gap_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        make_dataset(in_memory(), batch_size=2, image_size=32, **options)


def reference_border_weights(labels, w0=10.0, sigma=5.0):
    """The U-Net weight map with exact Euclidean distances (SciPy), border term on background."""
    ids = [i for i in np.unique(labels) if i > 0]
    distances = np.sort(np.stack([ndi.distance_transform_edt(labels != i) for i in ids]), axis=0)
    border = w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2))
    foreground = labels > 0
    w_c = np.where(
        foreground, labels.size / (2 * foreground.sum()), labels.size / (2 * (~foreground).sum())
    )
    return np.where(foreground, w_c, w_c + border)


def test_border_weights_approximate_the_unet_formula():
    labels = np.zeros((48, 48), np.int32)
    labels[8:40, 4:20] = 1
    labels[8:40, 24:44] = 2  # a 4-pixel gap between glands 1 and 2
    labels[42:47, 10:30] = 3
    weights = border_weight_map(tf.constant(labels)).numpy()
    reference = reference_border_weights(labels)
    assert np.abs(weights - reference).max() < 1.5
    assert np.abs(weights - reference).mean() < 0.1
    assert weights[20, 22] > weights[2, 2] + 5  # inside the gap vs far background


def test_maskrcnn_boxes_bound_their_instances_exactly():
    dataset = make_dataset(
        in_memory(),
        model="maskrcnn",
        batch_size=4,
        image_size=48,
        max_instances=6,
        seed=3,
        augment=AugmentOptions(crop_probability=1.0, min_crop_fraction=0.5),
    )
    for _, y in dataset:
        assert y["boxes"].shape == (4, 6, 4) and y["boxes"].dtype == tf.float32
        assert y["classes"].shape == (4, 6) and y["instances"].shape == (4, 48, 48)
        assert y["instances"].dtype == tf.int32
        for boxes, classes, instances in zip(
            y["boxes"].numpy(), y["classes"].numpy(), y["instances"].numpy(), strict=True
        ):
            count = int((classes == 0).sum())
            assert count > 0
            np.testing.assert_array_equal(classes[count:], -1)
            np.testing.assert_array_equal(boxes[count:], -1)
            np.testing.assert_array_equal(np.unique(instances), np.arange(count + 1))  # ids 1..K
            for k in range(count):
                rows, cols = np.nonzero(instances == k + 1)
                expected = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
                np.testing.assert_array_equal(boxes[k], expected)


def test_maskrcnn_too_many_instances_names_the_image():
    dataset = make_dataset(
        in_memory(), model="maskrcnn", batch_size=2, image_size=32, max_instances=2, augment=False
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="img_0.*max_instances"):
        list(dataset)


def test_eval_batches_are_full_size_unaugmented_and_named():
    dataset = make_dataset(in_memory(count=3, instances_dtype=np.int32), model="eval", batch_size=6)
    batches = list(dataset)
    assert len(batches) == 3
    for i, batch in enumerate(batches):
        assert batch["image"].dtype == tf.uint8 and batch["image"].shape == (1, 40, 56, 3)
        assert batch["instances"].dtype == tf.int32
        np.testing.assert_array_equal(batch["instances"][0].numpy(), example_labels(i))
        assert batch["name"].numpy().tolist() == [f"img_{i}".encode()]


def test_unnamed_examples_get_names():
    batch = next(iter(make_dataset(in_memory(named=False), model="eval")))
    assert batch["name"].numpy().tolist() == [b"example_0"]


def collect(dataset):
    return [tf.nest.map_structure(lambda t: t.numpy(), batch) for batch in dataset]


def test_same_seed_same_batches_and_epochs_differ():
    options = AugmentOptions(rotate_scale=True, stain_jitter=True)

    def build(seed):
        return make_dataset(
            in_memory(), model="maskrcnn", batch_size=2, image_size=32, seed=seed, augment=options
        )

    first, second = build(5), build(5)
    epochs_first = [collect(first), collect(first)]
    epochs_second = [collect(second), collect(second)]
    for a, b in zip(tf.nest.flatten(epochs_first), tf.nest.flatten(epochs_second), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        epochs_first[0][0][0], epochs_first[1][0][0]
    )  # new epoch, new batches
    other = collect(build(6))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(tf.nest.flatten(other), tf.nest.flatten(epochs_first[0]), strict=True)
    )


def test_shuffle_drop_remainder_defaults():
    augmented = [
        centre_index(x)
        for x, _ in make_dataset(in_memory(count=7), batch_size=3, image_size=16, seed=1)
    ]
    assert [len(b) for b in augmented] == [3, 3]  # training: last partial batch dropped
    plain = [
        centre_index(x)
        for x, _ in make_dataset(in_memory(count=7), batch_size=3, image_size=16, augment=False)
    ]
    assert plain == [[0, 1, 2], [3, 4, 5], [6]]  # no augmentation: in order, nothing dropped


def test_order_is_deterministic_unless_shuffling_without_a_seed():
    def deterministic(**kwargs):
        return make_dataset(in_memory(), image_size=16, **kwargs).options().deterministic

    assert deterministic(seed=3) and deterministic(augment=False)
    assert not deterministic()  # shuffled with no seed: parallel maps may reorder


def test_cache_gives_the_same_batches():
    plain = collect(make_dataset(in_memory(), batch_size=4, image_size=24, seed=2))
    cached = make_dataset(in_memory(), batch_size=4, image_size=24, seed=2, cache=True)
    for a, b in zip(tf.nest.flatten(plain), tf.nest.flatten(collect(cached)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_mirrored_strategy_sees_every_example_exactly_once(two_cpu_strategy):
    strategy = two_cpu_strategy
    dataset = make_dataset(in_memory(count=8), batch_size=4, image_size=16, seed=4)
    assert (
        dataset.options().experimental_distribute.auto_shard_policy
        == tf.data.experimental.AutoShardPolicy.DATA
    )
    seen = []
    for x, _ in strategy.experimental_distribute_dataset(dataset):
        for local in strategy.experimental_local_results(x):
            assert local.shape[0] == 2  # the global batch of 4 split over 2 replicas
            seen += centre_index(local)
    assert sorted(seen) == list(range(8))


def test_bad_arguments_and_sources_are_clear_errors():
    with pytest.raises(ValueError, match="model"):
        make_dataset(in_memory(), model="yolo")
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(in_memory(), image_size=0)
    with pytest.raises(ValueError, match="input_height"):
        make_dataset(in_memory(), input_height=0)
    with pytest.raises(ValueError, match="contour"):
        make_dataset(in_memory(), model="maskrcnn", contour=True)
    with pytest.raises(ValueError, match="source"):
        make_dataset(42)
    with pytest.raises(ValueError, match="'image' and 'instances'"):
        make_dataset(
            tf.data.Dataset.from_tensor_slices({"pixels": np.zeros((2, 4, 4, 3), np.uint8)})
        )
    with pytest.raises(ValueError, match="uint8"):
        make_dataset(
            tf.data.Dataset.from_tensor_slices(
                {"image": np.zeros((2, 4, 4, 3)), "instances": np.zeros((2, 4, 4), np.int32)}
            )
        )


def test_corrupt_example_names_it():
    good = in_memory(count=2)
    bad = tf.data.Dataset.from_tensors(
        {
            "image": np.zeros((40, 56, 3), np.uint8),
            "instances": np.zeros((40, 50), np.uint16),
            "name": "broken_3",
        }
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="broken_3"):
        list(make_dataset(good.concatenate(bad), batch_size=1, image_size=16, augment=False))


def test_synthetic_tfds_dataset(synthetic_data_dir):
    x, y = next(
        iter(
            make_dataset(
                "glas/synthetic",
                split="train[:4]",
                model="maskrcnn",
                batch_size=2,
                image_size=64,
                seed=0,
                data_dir=synthetic_data_dir,
            )
        )
    )
    assert x.shape == (2, 64, 64, 3) and y["boxes"].shape == (2, 100, 4)
    assert int((y["classes"].numpy() == 0).sum()) > 0
    names = [
        b["name"][0].numpy().decode()
        for b in make_dataset(
            "glas/synthetic", split="test_b", model="eval", data_dir=synthetic_data_dir
        )
    ]
    assert len(names) == 8 and all(name.startswith("testB_") for name in names)


def test_synthetic_missing_split_unknown_dataset_and_truncated_file(synthetic_data_dir, tmp_path):
    with pytest.raises(ValueError, match="split 'validation'.*test_a"):
        make_dataset("glas/synthetic", split="validation", data_dir=synthetic_data_dir)
    with pytest.raises(ValueError, match="glas/nonexistent"):
        make_dataset("glas/nonexistent", data_dir=synthetic_data_dir)
    with pytest.raises(ValueError, match="not prepared"):
        make_dataset("glas/synthetic", data_dir=str(tmp_path / "empty"))
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_data_dir, copy)
    (record,) = Path(copy).glob("glas/synthetic/*/glas-test_b.tfrecord-*")
    record.write_bytes(record.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupt records.*test_b"):
        make_dataset("glas/synthetic", split="test_b", data_dir=str(copy))
