"""Post-processing: TF connected components == SciPy, TF == NumPy post-processing, each option."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from keras_glas.postprocess import (
    PostprocessOptions,
    connected_components,
    postprocess_instances,
    tf_postprocess_instances,
)

EIGHT = np.ones((3, 3))
UNKNOWN_MASKS = tf.TensorSpec([None, None, None], tf.bool)
UNKNOWN_MAPS = tf.TensorSpec([None, None, None], tf.float32)


def scipy_labels(masks):
    return np.stack([ndimage.label(mask, structure=EIGHT)[0] for mask in masks])


def spiral(size):
    """A one-pixel-wide square spiral (one long snake) in a (size, size) mask."""
    mask = np.zeros((size, size), bool)
    low, high = 0, size - 1
    while low + 2 <= high:
        mask[low, low : high + 1] = True
        mask[low : high + 1, high] = True
        mask[high, low : high + 1] = True
        mask[low + 2 : high + 1, low] = True
        mask[low + 2, low : low + 3] = True
        low, high = low + 4, high - 4
    return mask


def disc(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def smooth_field(rng, shape, sigma=2.0):
    """float32 values in [0, 1] with blob-like structure, like a network's probabilities."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma=(0, sigma, sigma))
    field -= field.min(axis=(1, 2), keepdims=True)
    return (field / field.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def random_mask_batches():
    rng = np.random.default_rng(0)
    batches = [
        np.zeros((1, 1, 1), bool),
        np.ones((1, 1, 1), bool),
        rng.random((4, 1, 9)) < 0.5,
        rng.random((4, 9, 1)) < 0.5,
        np.zeros((2, 6, 5), bool),
        np.ones((2, 6, 5), bool),
        # A snake, its complement and a checkerboard (diagonal-only connections).
        np.stack([spiral(37), ~spiral(37), np.indices((37, 37)).sum(0) % 2 == 0]),
        np.stack([np.eye(23, 29, k, bool) | np.eye(23, 29, -k, bool)[:, ::-1] for k in range(5)]),
    ]
    for density in (0.1, 0.3, 0.45, 0.6, 0.9):
        batches.append(rng.random((6, 31, 47)) < density)
    batches.append(smooth_field(rng, (4, 64, 96)) > 0.5)
    return batches


def test_options_are_validated():
    for bad in ({"threshold": 1.0}, {"threshold": 0}, {"contour_threshold": -0.1}):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            PostprocessOptions(**bad)
    with pytest.raises(ValueError, match="min_size must be an integer >= 0"):
        PostprocessOptions(min_size=-1)
    with pytest.raises(ValueError, match="min_seed_size must be an integer >= 0"):
        PostprocessOptions(min_seed_size=2.5)
    with pytest.raises(ValueError, match="none, contour, watershed"):
        PostprocessOptions(split="edges")


def test_connected_components_equals_scipy():
    for masks in random_mask_batches():
        expected = scipy_labels(masks)
        labels = connected_components(masks).numpy()
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(labels, expected, err_msg=f"masks {masks.shape}")


def test_connected_components_in_tf_function_with_unknown_shape():
    traced = tf.function(connected_components, input_signature=[UNKNOWN_MASKS])
    compiled = tf.function(connected_components, input_signature=[UNKNOWN_MASKS], jit_compile=True)
    rng = np.random.default_rng(1)
    for masks in (rng.random((3, 40, 27)) < 0.55, np.stack([spiral(45), spiral(45).T])):
        expected = scipy_labels(masks)
        assert expected.max() >= 1
        np.testing.assert_array_equal(traced(masks).numpy(), expected)
    np.testing.assert_array_equal(compiled(masks).numpy(), expected)


OPTIONS = [
    PostprocessOptions(),
    PostprocessOptions(threshold=0.35, fill_holes=True),
    PostprocessOptions(threshold=0.6, min_size=12),
    PostprocessOptions(fill_holes=True, min_size=30),
    PostprocessOptions(split="contour"),
    PostprocessOptions(split="contour", contour_threshold=0.4, fill_holes=True, min_size=8),
    PostprocessOptions(threshold=0.4, split="contour", contour_threshold=0.7, fill_holes=True),
    PostprocessOptions(split="contour", min_seed_size=20, fill_holes=True, min_size=8),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda options: repr(options))
def test_tf_postprocess_equals_numpy(options):
    rng = np.random.default_rng(2)
    probability = smooth_field(rng, (5, 45, 62), sigma=2.5)
    contour = smooth_field(rng, (5, 45, 62), sigma=1.5)
    expected = [postprocess_instances(p, c, options)
                for p, c in zip(probability, contour, strict=True)]
    expected = np.stack(expected)
    assert expected.max() > 1  # non-trivial instance maps

    traced = tf.function(
        lambda p, c: tf_postprocess_instances(p, c, options), input_signature=[UNKNOWN_MAPS] * 2
    )
    labels = traced(probability, contour).numpy()
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)


def test_contour_split_separates_touching_glands_and_grows_them_back():
    probability = np.zeros((20, 30), np.float32)
    probability[4:16, 3:27] = 0.9  # one blob ...
    contour = np.zeros_like(probability)
    contour[4:16, 14:16] = 0.9  # ... crossed by a predicted contour
    contour[4, 3:27] = 0.9  # and a contour on its top edge, grown back too
    options = PostprocessOptions(split="contour")
    labels = postprocess_instances(probability, contour, options)
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, probability > 0.5)
    assert set(np.unique(labels[4:16, 3:14])) == {1} and set(np.unique(labels[4:16, 16:27])) == {2}
    assert postprocess_instances(probability).max() == 1
    tf_labels = tf_postprocess_instances(probability[None], contour[None], options).numpy()[0]
    np.testing.assert_array_equal(tf_labels, labels)
    with pytest.raises(ValueError, match="needs the contour"):
        postprocess_instances(probability, None, options)


def test_min_seed_size_gives_a_sliver_cut_off_by_a_contour_to_its_gland():
    probability = np.zeros((20, 30), np.float32)
    probability[4:16, 3:27] = 0.9
    contour = np.zeros_like(probability)
    contour[4:16, 24] = 0.9  # a spurious contour cuts a 12x2 sliver off the gland's right end
    split = postprocess_instances(probability, contour, PostprocessOptions(split="contour"))
    # Without a minimum, the sliver is a gland of its own (its contour column grown into it).
    assert split.max() == 2 and (split == 2).sum() == 12 * 3
    options = PostprocessOptions(split="contour", min_seed_size=25)
    labels = postprocess_instances(probability, contour, options)
    np.testing.assert_array_equal(labels, (probability > 0.5).astype(np.int32))
    tf_labels = tf_postprocess_instances(probability[None], contour[None], options).numpy()[0]
    np.testing.assert_array_equal(tf_labels, labels)


def test_watershed_splits_two_touching_discs():
    shape = (40, 60)
    probability = (disc(shape, (20, 19), 11) | disc(shape, (20, 39), 11)).astype(np.float32)
    assert postprocess_instances(probability).max() == 1
    labels = postprocess_instances(probability, options=PostprocessOptions(split="watershed"))
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, probability > 0.5)
    assert labels[20, 12] != labels[20, 46]
    with pytest.raises(ValueError, match="NumPy"):
        tf_postprocess_instances(probability[None], options=PostprocessOptions(split="watershed"))


def test_fill_holes_fills_a_ring_but_not_an_open_bay():
    shape = (30, 50)
    ring = disc(shape, (15, 14), 10) & ~disc(shape, (15, 14), 5)
    bay = disc(shape, (15, 38), 8) & ~disc(shape, (15, 44), 4)  # notch open to the outside
    probability = (ring | bay).astype(np.float32)
    options = PostprocessOptions(fill_holes=True)
    labels = postprocess_instances(probability, options=options)
    np.testing.assert_array_equal(labels > 0, disc(shape, (15, 14), 10) | bay)
    assert labels.max() == 2 and labels[15, 14] == labels[15, 5]
    assert postprocess_instances(probability)[15, 14] == 0
    tf_labels = tf_postprocess_instances(probability[None], options=options).numpy()[0]
    np.testing.assert_array_equal(tf_labels, labels)


def test_min_size_removes_specks_and_renumbers():
    probability = np.zeros((20, 20), np.float32)
    probability[0, 0] = 1.0  # 1-pixel speck, first in raster order
    probability[5:7, 5:7] = 1.0  # 4 pixels
    probability[10:15, 10:15] = 1.0  # 25 pixels
    assert postprocess_instances(probability).max() == 3
    labels = postprocess_instances(probability, options=PostprocessOptions(min_size=5))
    assert labels.max() == 1 and labels[12, 12] == 1 and labels[0, 0] == 0 and labels[5, 5] == 0
