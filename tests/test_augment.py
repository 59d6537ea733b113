"""Tests of keras_glas.augment: identical geometry for image and labels, ids never interpolated."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import tensorflow as tf
from skimage import color

from keras_glas import augment
from keras_glas.augment import AugmentOptions

# One well-separated colour per label id (0 = black, like the zero padding and fill).
PALETTE = np.array(
    [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255]], np.uint8
)
GEOMETRIC = {
    "flip": AugmentOptions(flip=True, crop=False),
    "crop": AugmentOptions(flip=False, crop=True, crop_probability=1.0),
    "rotate_scale": AugmentOptions(
        flip=False, crop=False, rotate_scale=True, max_rotation_degrees=30
    ),
    "elastic": AugmentOptions(
        flip=False, crop=False, elastic=True, elastic_alpha=3.0, elastic_sigma=8.0
    ),
    "all": AugmentOptions(
        crop_probability=1.0, rotate_scale=True, elastic=True, elastic_alpha=3.0, elastic_sigma=8.0
    ),
}


def asymmetric_labels(height=48, width=72):
    """An instance map with no symmetry: an L shape, a bar, a small square, a disc."""
    labels = np.zeros((height, width), np.int32)
    labels[4:30, 4:12] = 1
    labels[22:30, 4:28] = 1
    labels[6:12, 30:66] = 2
    labels[36:44, 58:66] = 3
    yy, xx = np.mgrid[:height, :width]
    labels[(yy - 34) ** 2 + (xx - 40) ** 2 < 64] = 4
    labels[14:20, 40:46] = 5
    return labels


def assert_aligned(image, labels):
    """Every pixel whose 5×5 neighbourhood holds one label has that label's colour."""
    image, labels = np.asarray(image), np.asarray(labels)
    interior = ndi.minimum_filter(labels, 5) == ndi.maximum_filter(labels, 5)
    distances = np.linalg.norm(
        image[..., None, :] * 255.0 - PALETTE[None, None].astype(float), axis=-1
    )
    colour_label = distances.argmin(-1)
    assert interior.sum() > 0.3 * labels.size
    mismatched = interior & (colour_label != labels)
    assert mismatched.sum() == 0, f"{mismatched.sum()} interior pixels lost alignment"


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_image_and_labels_stay_aligned(name):
    labels = asymmetric_labels()
    image = PALETTE[labels]
    outputs = []
    for seed in range(6):
        out_image, out_labels = augment.augment_and_resize(
            tf.constant(image), tf.constant(labels), 64, GEOMETRIC[name], tf.constant([seed, 7])
        )
        assert out_image.dtype == tf.float32 and out_image.shape == (64, 64, 3)
        assert out_labels.dtype == tf.int32 and out_labels.shape == (64, 64)
        assert_aligned(out_image, out_labels)
        outputs.append(out_labels.numpy())
    # The augmentation did something: not every seed gives the same labels.
    assert any(not np.array_equal(outputs[0], other) for other in outputs[1:])


def test_flip_gives_one_of_the_four_flips():
    labels = asymmetric_labels()
    candidates = [labels, labels[::-1], labels[:, ::-1], labels[::-1, ::-1]]
    seen = set()
    for seed in range(12):
        _, flipped = augment.random_flip(
            tf.constant(PALETTE[labels]), tf.constant(labels), tf.constant([seed, 0])
        )
        matches = [i for i, c in enumerate(candidates) if np.array_equal(flipped.numpy(), c)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) >= 3


def test_crop_is_a_window_of_the_input_keeping_the_aspect():
    labels = np.arange(40 * 60, dtype=np.int32).reshape(40, 60)
    for seed in range(5):
        _, crop = augment.random_crop(
            tf.constant(PALETTE[labels % 6]), tf.constant(labels), tf.constant([seed, 1]), 1.0, 0.5
        )
        crop = crop.numpy()
        top, left = divmod(int(crop[0, 0]), 60)
        np.testing.assert_array_equal(
            crop, labels[top : top + crop.shape[0], left : left + crop.shape[1]]
        )
        assert 20 <= crop.shape[0] <= 40 and abs(crop.shape[1] / crop.shape[0] - 1.5) < 0.1


@pytest.mark.parametrize("size", [16, 50, 200])
def test_resize_keeps_aspect_pads_and_never_creates_ids(size):
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 3, 7, 250, 1000], np.int32), size=(30, 90))
    image, resized = augment.resize_with_pad(
        tf.constant(PALETTE[labels % 6]), tf.constant(labels), size
    )
    assert image.shape == (size, size, 3) and resized.shape == (size, size)
    assert set(np.unique(resized.numpy())) <= set(np.unique(labels))
    # 30×90 → content height size/3, centred; the rest is zero padding.
    content_rows = np.flatnonzero(image.numpy().max(axis=(1, 2)) > 0)
    assert abs(len(content_rows) - size / 3) <= 1.5
    assert abs(content_rows.mean() - (size - 1) / 2) <= 1.0


@pytest.mark.parametrize("height", [40, 20])
def test_resize_onto_a_lower_canvas_keeps_the_scale_pads_or_crops_the_rows(height):
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 3, 7, 250], np.int32), size=(60, 90))
    image = tf.constant(PALETTE[labels % 6])
    square_image, square = augment.resize_with_pad(image, tf.constant(labels), 45)
    # 60×90 → 30×45: a 40-row canvas pads 5 rows above and below, a 20-row one crops 5 each.
    out_image, out = augment.resize_with_pad(image, tf.constant(labels), 45, height=height)
    assert out_image.shape == (height, 45, 3) and out.shape == (height, 45)
    content = square.numpy()[(45 - 30) // 2 : (45 + 30) // 2]
    if height >= 30:
        pad = (height - 30) // 2
        np.testing.assert_array_equal(out.numpy()[pad : pad + 30], content)
        assert not out_image.numpy()[:pad].any() and not out_image.numpy()[pad + 30 :].any()
    else:
        crop = (30 - height) // 2
        np.testing.assert_array_equal(out.numpy(), content[crop : crop + height])
    np.testing.assert_allclose(
        out_image.numpy(), tf.image.resize_with_crop_or_pad(square_image, height, 45).numpy()
    )


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_augment_onto_a_lower_canvas_gives_its_shape_and_no_new_ids(name):
    labels = asymmetric_labels()
    out_image, out_labels = augment.augment_and_resize(
        tf.constant(PALETTE[labels]), tf.constant(labels), 40, GEOMETRIC[name],
        tf.constant([1, 2]), height=24,
    )
    assert out_image.shape == (24, 40, 3) and out_labels.shape == (24, 40)
    assert set(np.unique(out_labels.numpy())) <= set(np.unique(labels))
    assert out_labels.numpy().any()


def test_rotation_and_elastic_never_create_ids():
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array([0, 5, 9, 300], np.int32), size=(32, 32))
    image = tf.zeros([32, 32, 3])
    for seed in range(3):
        for fn in (augment.random_rotate_scale, augment.elastic_deform):
            _, out = fn(image, tf.constant(labels), tf.constant([seed, 2]))
            assert set(np.unique(out.numpy())) <= set(np.unique(labels))


def test_zero_rotation_and_unit_scale_is_identity():
    labels = asymmetric_labels(32, 32)
    image = tf.constant(PALETTE[labels] / 255.0, tf.float32)
    out_image, out_labels = augment.random_rotate_scale(
        image, tf.constant(labels), tf.constant([0, 0]), 0.0, (1.0, 1.0)
    )
    np.testing.assert_array_equal(out_labels.numpy(), labels)
    np.testing.assert_allclose(out_image.numpy(), image.numpy(), atol=1e-5)


def test_same_seed_same_result():
    labels = tf.constant(asymmetric_labels())
    image = tf.constant(PALETTE[asymmetric_labels()])
    options = AugmentOptions(rotate_scale=True, elastic=True, stain_jitter=True)
    first = augment.augment_and_resize(image, labels, 40, options, tf.constant([3, 4]))
    again = augment.augment_and_resize(image, labels, 40, options, tf.constant([3, 4]))
    other = augment.augment_and_resize(image, labels, 40, options, tf.constant([5, 4]))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_hed_transforms_match_skimage():
    rng = np.random.default_rng(2)
    rgb = rng.uniform(0.05, 1.0, size=(8, 8, 3))
    hed = augment.rgb_to_hed(tf.constant(rgb, tf.float32)).numpy()
    np.testing.assert_allclose(hed, color.rgb2hed(rgb), atol=1e-4)
    np.testing.assert_allclose(
        augment.hed_to_rgb(tf.constant(hed)).numpy(), color.hed2rgb(hed), atol=1e-4
    )


def test_stain_jitter_changes_colours_only_within_its_range():
    rng = np.random.default_rng(3)
    image = tf.constant(rng.uniform(0.3, 0.95, size=(16, 16, 3)), tf.float32)
    unchanged = augment.stain_jitter(image, tf.constant([1, 1]), sigma=0.0, bias=0.0)
    np.testing.assert_allclose(unchanged.numpy(), image.numpy(), atol=2e-3)
    jittered = augment.stain_jitter(image, tf.constant([1, 1]), sigma=0.2, bias=0.05).numpy()
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert 1e-3 < np.abs(jittered - image.numpy()).mean() < 0.2


def test_options_resolve_and_validate():
    assert AugmentOptions.resolve(True) == AugmentOptions()
    assert not AugmentOptions.resolve(False).any
    custom = AugmentOptions(elastic=True)
    assert AugmentOptions.resolve(custom) is custom
    with pytest.raises(TypeError, match="augment"):
        AugmentOptions.resolve("yes")
    with pytest.raises(ValueError, match="crop_probability"):
        AugmentOptions(crop_probability=2.0)
    with pytest.raises(ValueError, match="scale_range"):
        AugmentOptions(scale_range=(1.2, 0.8))


def test_sampler_interpolates_image_takes_nearest_label_and_zeros_outside():
    labels = asymmetric_labels(16, 20)
    image = tf.constant(PALETTE[labels] / 255.0, tf.float32)
    rows, cols = np.mgrid[:16, :20].astype(np.float32)

    def sample(dr, dc):
        out_image, out_labels = augment._sample_pair(
            image, tf.constant(labels), rows + dr, cols + dc
        )
        return out_image.numpy(), out_labels.numpy()

    same_image, same_labels = sample(0.0, 0.0)
    np.testing.assert_allclose(same_image, image.numpy(), atol=1e-6)
    np.testing.assert_array_equal(same_labels, labels)
    half_image, near_labels = sample(0.0, 0.4)
    np.testing.assert_allclose(
        half_image[:, :-1], 0.6 * image[:, :-1] + 0.4 * image[:, 1:], atol=1e-5
    )
    np.testing.assert_array_equal(near_labels, labels)
    for dr, dc in ((100.0, 0.0), (-100.0, 0.0), (0.0, 50.0), (0.0, -50.0)):
        outside_image, outside_labels = sample(dr, dc)
        assert outside_image.max() == 0 and outside_labels.max() == 0


def smooth_example(height=150, width=220):
    """A smooth uint8 colour image and a label map of three discs with sparse ids."""
    yy, xx = np.mgrid[:height, :width].astype(float)
    image = np.stack(
        [127 + 100 * np.sin(xx / 9), 127 + 100 * np.cos(yy / 11), 255 * xx / width], axis=-1
    )
    labels = np.zeros((height, width), np.int32)
    for label, (y, x) in ((3, (40, 50)), (8, (100, 120)), (12, (60, 180))):
        labels[(yy - y) ** 2 + (xx - x) ** 2 < 20**2] = label
    return np.round(image).astype(np.uint8), labels


def test_shrink_to_fit_downscales_large_examples_only():
    image, labels = smooth_example()
    small_image, small_labels = augment.shrink_to_fit(tf.constant(image), tf.constant(labels), 80)
    assert small_image.dtype == tf.uint8 and small_labels.dtype == tf.int32
    assert small_labels.shape[1] == 80 and abs(small_labels.shape[0] - 150 * 80 / 220) <= 0.5
    assert small_image.shape[:2] == small_labels.shape
    assert set(np.unique(small_labels.numpy())) == {0, 3, 8, 12}
    same_image, same_labels = augment.shrink_to_fit(tf.constant(image), tf.constant(labels), 220)
    np.testing.assert_array_equal(same_image.numpy(), image)
    np.testing.assert_array_equal(same_labels.numpy(), labels)


@pytest.mark.parametrize("crop", [False, True])
def test_shrink_then_resize_matches_the_direct_anti_aliased_resize(crop):
    # crop=True: cached at 1.25·S, then plain bilinear down to S; crop=False: cached at S.
    image, labels = smooth_example()
    options = AugmentOptions(flip=False, crop=crop, crop_probability=0.0)
    assert augment.cached_side(64, options) == (80 if crop else 64)
    cached = augment.shrink_to_fit(
        tf.constant(image), tf.constant(labels), augment.cached_side(64, options)
    )
    out_image, out_labels = augment.augment_and_resize(*cached, 64, options, tf.constant([0, 0]))
    direct_image, direct_labels = augment.resize_with_pad(
        tf.constant(image), tf.constant(labels), 64
    )
    difference = np.abs(out_image.numpy() - direct_image.numpy())
    agreement = np.mean(out_labels.numpy() == direct_labels.numpy())
    if crop:
        assert difference.mean() < 0.01 and agreement > 0.97
    else:  # the per-epoch resize is the identity: only the uint8 rounding of the cache remains
        assert difference.max() <= 0.5 / 255 + 1e-6
        np.testing.assert_array_equal(out_labels.numpy(), direct_labels.numpy())
