"""Batch-norm folding (`keras_glas.models.fold_batch_norm`): same function, fewer layers."""
import keras
import numpy as np
import pytest

from keras_glas.models.fold_batch_norm import fold_batch_norms, foldable_pairs
from keras_glas.models.maskrcnn.backbone import build_feature_model, build_resnet
from keras_glas.models.unet import build_unet


def randomise_batch_norms(model, seed=0):
    """Give every batch norm statistics and affine parameters far from the identity."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.5, channels))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, channels))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2.0, channels))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.5, channels))


def batch_norm_count(model):
    return sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in model._flatten_layers(include_self=False, recursive=True))


def mixed_model():
    """Convs with and without bias before batch norms, and three batch norms that must stay:
    after a conv whose output has a second consumer, after a non-conv layer, and after a conv
    with its own activation."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="plain")(inputs)
    x = keras.layers.BatchNormalization(name="plain_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 1, use_bias=True, name="biased")(x)
    x = keras.layers.BatchNormalization(center=False, name="biased_bn")(x)
    shared = keras.layers.Conv2D(6, 3, padding="same", name="shared")(x)
    branch = keras.layers.BatchNormalization(name="shared_bn")(shared)
    x = keras.layers.Add()([branch, shared])
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.BatchNormalization(scale=False, name="after_pool_bn")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="activated")(x)
    x = keras.layers.BatchNormalization(name="activated_bn")(x)
    return keras.Model(inputs, x)


def test_folds_only_convs_whose_output_feeds_just_the_batch_norm():
    model = mixed_model()
    pairs = {(conv.name, norm.name) for conv, norm in foldable_pairs(model)}
    assert pairs == {("plain", "plain_bn"), ("biased", "biased_bn")}


def test_folded_model_computes_the_same_function_and_leaves_the_original_alone():
    model = mixed_model()
    randomise_batch_norms(model)
    images = np.random.default_rng(1).uniform(size=(2, 16, 12, 3)).astype(np.float32)
    expected = model(images, training=False).numpy()
    weights = [weight.copy() for weight in model.get_weights()]

    folded = fold_batch_norms(model)

    np.testing.assert_allclose(folded(images, training=False).numpy(), expected, rtol=1e-5,
                               atol=1e-5)
    assert batch_norm_count(folded) == batch_norm_count(model) - 2
    for before, after in zip(weights, model.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(model(images, training=False).numpy(), expected)
    # Untouched layers are shared, not copied: the folded model sees later weight changes.
    assert folded.get_layer("activated") is model.get_layer("activated")


@pytest.mark.parametrize("contour_head", [False, True])
def test_batch_norm_unet_folds_completely(contour_head):
    model = build_unet(base_filters=4, depth=2, batch_norm=True, contour_head=contour_head)
    randomise_batch_norms(model, seed=2)
    images = np.random.default_rng(3).uniform(size=(1, 32, 24, 3)).astype(np.float32)

    folded = fold_batch_norms(model)

    assert batch_norm_count(folded) == 0
    expected, result = model(images, training=False), folded(images, training=False)
    assert sorted(result) == sorted(expected)
    for key in expected:
        np.testing.assert_allclose(result[key].numpy(), expected[key].numpy(), atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet_tiny", "resnet18"])  # bottleneck and basic blocks
def test_nested_resnet_of_the_maskrcnn_feature_model_folds_completely(backbone):
    features = build_feature_model(build_resnet(backbone), 8)
    randomise_batch_norms(features, seed=4)
    images = np.random.default_rng(5).normal(size=(1, 64, 96, 3)).astype(np.float32)

    folded = fold_batch_norms(features)

    assert batch_norm_count(features) > 0 and batch_norm_count(folded) == 0
    for level, (result, expected) in enumerate(zip(folded(images),
                                                   features(images, training=False), strict=True)):
        scale = np.abs(expected.numpy()).max()
        np.testing.assert_allclose(result.numpy() / scale, expected.numpy() / scale, atol=1e-5,
                                   err_msg=f"P{level + 2}")


def test_model_without_foldable_pairs_is_returned_as_it_is():
    model = build_unet(base_filters=4, depth=2, batch_norm=False)
    assert fold_batch_norms(model) is model
