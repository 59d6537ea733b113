"""Losses: values on small cases computed by hand, per-pixel weights, serialization."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glas.losses import LOSSES, get_loss
from keras_glas.models.unet import build_unet

# One image of 1x2 pixels: targets (1, 0), probabilities (0.9, 0.2).
Y_PAIR = np.array([1.0, 0.0], np.float32).reshape(1, 1, 2, 1)
P_PAIR = np.array([0.9, 0.2], np.float32).reshape(1, 1, 2, 1)
BCE_PAIR = [-math.log(0.9), -math.log(0.8)]  # 0.10536, 0.22314


def test_bce_known_values():
    assert float(get_loss("bce")(Y_PAIR, P_PAIR)) == pytest.approx(sum(BCE_PAIR) / 2, rel=1e-5)
    # Saturated wrong predictions stay finite thanks to the clip.
    assert np.isfinite(float(get_loss("bce")(Y_PAIR, 1.0 - Y_PAIR)))


def test_weighted_bce_uses_per_pixel_weights():
    weights = np.array([2.0, 0.5], np.float32).reshape(1, 1, 2)  # (B, H, W) as the pipeline gives
    expected = (2.0 * BCE_PAIR[0] + 0.5 * BCE_PAIR[1]) / 2  # Keras divides by B*H*W
    loss = get_loss("weighted_bce")(Y_PAIR, P_PAIR, sample_weight=weights)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="border_weights=True"):
        get_loss("weighted_bce")(Y_PAIR, P_PAIR)


def test_dice_known_values():
    y = np.array([1, 1, 0, 0], np.float32).reshape(1, 2, 2, 1)
    p = np.array([1.0, 0.5, 0.5, 0.0], np.float32).reshape(1, 2, 2, 1)
    # intersection 1.5, |y| = 2, |p| = 2: 1 - (2 * 1.5 + 1) / (4 + 1) = 0.2
    assert float(get_loss("dice")(y, p)) == pytest.approx(0.2, rel=1e-5)
    # Two empty masks match perfectly; per-image losses are averaged over the batch.
    empty = np.zeros_like(y)
    both = get_loss("dice")(np.concatenate([y, empty]), np.concatenate([p, empty]))
    assert float(both) == pytest.approx(0.1, rel=1e-5)


def test_bce_dice_is_the_sum():
    # BCE mean 0.164252; Dice: intersection 0.9, |y| = 1, |p| = 1.1: 1 - 2.8 / 3.1
    expected = sum(BCE_PAIR) / 2 + 1.0 - 2.8 / 3.1
    assert float(get_loss("bce_dice")(Y_PAIR, P_PAIR)) == pytest.approx(expected, rel=1e-5)


def test_get_loss_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="bce, bce_dice, dice, weighted_bce"):
        get_loss("focal")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_serialize_round_trip(name):
    loss = get_loss(name)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss) and restored.name == name


def test_fit_honours_per_pixel_weight_map():
    """model.evaluate/fit with a dict sample_weight (B, H, W) gives mean(w * bce)."""
    keras.utils.set_random_seed(0)
    model = build_unet((8, 8, 3), base_filters=2, depth=1)
    model.compile(optimizer="sgd", loss={"mask": get_loss("weighted_bce")})
    rng = np.random.default_rng(0)
    images = rng.random((2, 8, 8, 3), dtype=np.float32)
    targets = (rng.random((2, 8, 8, 1)) > 0.5).astype(np.float32)
    weights = np.zeros((2, 8, 8), np.float32)
    weights[:, :4] = rng.random((2, 4, 8)) * 10  # the bottom half does not count at all

    probabilities = keras.ops.convert_to_numpy(model(images)["mask"]).astype(np.float64)
    probabilities = np.clip(probabilities, 1e-7, 1 - 1e-7)
    bce = -(targets * np.log(probabilities) + (1 - targets) * np.log(1 - probabilities))[..., 0]
    expected = float(np.mean(weights * bce))

    data = tf.data.Dataset.from_tensors((images, {"mask": targets}, {"mask": weights}))
    assert model.evaluate(data, verbose=0) == pytest.approx(expected, rel=1e-4)
    history = model.fit(data, epochs=1, verbose=0, shuffle=False)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-4)
