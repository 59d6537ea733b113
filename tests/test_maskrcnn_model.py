"""Mask R-CNN model: dtypes under mixed precision, graph inference, fit (distributed), config,
backbone weights. Tiny backbone and 64 px images keep it to CPU-friendly sizes."""
import socket

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_glas.models.maskrcnn import DEFAULT_OPTIONS, MaskRCNN, build_maskrcnn
from keras_glas.models.maskrcnn.backbone import (
    CAFFE_MEAN_BGR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_resnet,
    load_backbone_weights,
)
from keras_glas.models.maskrcnn.model import LOSS_NAMES
from keras_glas.testing import ellipse_glands

TINY = dict(fpn_channels=16, box_head_units=32, mask_head_channels=16, rpn_pre_nms_top_n_train=200,
            rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=64,
            rpn_batch_size_per_image=64, roi_batch_size_per_image=32, max_detections=20)
SIGNATURE = [tf.TensorSpec((None, None, None, 3), tf.float32)]


def glands(count, size, per_image=3, seed=0):
    """Synthetic pipeline batches: pink background with dark filled-ellipse glands, slightly
    noisy (`keras_glas.testing.ellipse_glands`, N = 8).

    Returns x float32 (count, size, size, 3) and y with pipeline-format boxes/classes/instances.
    """
    return ellipse_glands(np.random.default_rng(seed), count, size, objects=per_image,
                          max_instances=8, centre_range=(0.22, 0.78), radius_range=(0.09, 0.17),
                          background_range=(0.75, 0.9), gland_colour=(0.45, 0.15, 0.4),
                          noise=0.02)


@pytest.fixture(scope="module")
def model():
    return build_maskrcnn("resnet_tiny", **TINY)


def test_infer_in_a_tf_function_on_odd_sizes(model):
    infer = tf.function(lambda images: model.infer(images, score_threshold=0.0),
                        input_signature=SIGNATURE)
    images, _ = glands(2, 64)
    for batch in (tf.random.uniform((2, 97, 131, 3), seed=1), tf.constant(images[:1])):
        out = infer(batch)
        n, h, w = batch.shape[:3]
        assert out["instances"].dtype == tf.int32 and out["instances"].shape == (n, h, w)
        assert out["probabilities"].dtype == tf.float32 and out["probabilities"].shape == (n, h, w)
        d = out["scores"].shape[1]
        assert out["boxes"].shape == (n, d, 4) and 1 <= d <= TINY["max_detections"]
        scores, boxes = out["scores"].numpy(), out["boxes"].numpy()
        instances = out["instances"].numpy()
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        assert ((boxes[..., 0] >= 0).all() and (boxes[..., 2] <= h).all()
                and (boxes[..., 3] <= w).all())
        assert instances.min() >= 0 and instances.max() <= d
        # Every labelled pixel belongs to a detection with a score and a mask above threshold.
        for i in range(n):
            labelled = instances[i] > 0
            assert (scores[i][instances[i][labelled] - 1] > 0).all()
            assert (out["probabilities"].numpy()[i][labelled] > 0.5).all()


def test_infer_saves_as_a_saved_model_that_loads_without_keras(model, tmp_path):
    module = tf.Module()
    module.model = model
    module.infer = tf.function(lambda images: model.infer(images, score_threshold=0.0),
                               input_signature=SIGNATURE)
    images = tf.constant(glands(1, 64, seed=7)[0][:, :50])
    expected = module.infer(images)
    tf.saved_model.save(module, str(tmp_path / "saved"),
                        signatures={"serving_default": module.infer})
    serving = tf.saved_model.load(str(tmp_path / "saved")).signatures["serving_default"]
    loaded = serving(images=images)
    np.testing.assert_array_equal(loaded["instances"], expected["instances"])
    np.testing.assert_allclose(loaded["scores"], expected["scores"], atol=1e-6)


def test_mixed_bfloat16_runs_backbone_in_bfloat16_and_heads_losses_outputs_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_maskrcnn("resnet_tiny", **TINY)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    images, y = glands(1, 64)
    features = model.feature_model(tf.constant(images))
    assert all(level.dtype == tf.bfloat16 for level in features)
    for head in (model.rpn_head, model.box_head, model.mask_head):
        assert all(w.dtype == "float32" for w in head.weights)
        assert all(layer.compute_dtype == "float32" for layer in head.layers if layer.weights)
    pooled = tf.zeros((3, 7, 7, TINY["fpn_channels"]))
    assert all(out.dtype == tf.float32 for out in model.box_head(pooled))
    losses, recall = model.compute_losses(tf.constant(images), y, training=True)
    assert all(loss.dtype == tf.float32 and np.isfinite(loss.numpy()) for loss in losses.values())
    out = model.infer(images)
    assert out["instances"].dtype == tf.int32
    assert all(out[key].dtype == tf.float32 for key in ("probabilities", "boxes", "scores"))


def test_losses_on_images_without_objects(model):
    images, y = glands(2, 64)
    empty = {"boxes": -np.ones_like(y["boxes"]), "classes": -np.ones_like(y["classes"]),
             "instances": np.zeros_like(y["instances"])}
    losses, recall = model.compute_losses(tf.constant(images), empty, training=True)
    assert all(np.isfinite(loss.numpy()) for loss in losses.values())
    assert losses["rpn_class_loss"] > 0 and losses["class_loss"] > 0
    assert (float(losses["mask_loss"]) == float(losses["box_loss"])
            == float(losses["rpn_box_loss"]) == 0.0)
    assert float(recall) == 0.0


def test_fit_under_mirrored_strategy_logs_every_loss(two_cpu_strategy):
    strategy = two_cpu_strategy
    with strategy.scope():
        model = build_maskrcnn("resnet_tiny", **TINY)
        model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    images, y = glands(4, 64)
    data = tf.data.Dataset.from_tensor_slices((images, y)).batch(2)
    history = model.fit(data, validation_data=data.take(1), epochs=1, verbose=0).history
    for key in ("loss",) + LOSS_NAMES:
        assert np.isfinite(history[key][0]), key
        assert np.isfinite(history[f"val_{key}"][0]), key
    assert history["loss"][0] > 0 and "val_mask_loss" in history


def test_fit_on_the_pipelines_batches(model):
    from keras_glas.data import make_dataset

    images, y = glands(4, 80, seed=4)
    examples = tf.data.Dataset.from_tensor_slices(
        {"image": (images * 255).astype(np.uint8), "instances": y["instances"]})
    data = make_dataset(examples, model="maskrcnn", batch_size=2, image_size=64, augment=True,
                        seed=0, max_instances=8)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    history = model.fit(data, epochs=1, verbose=0).history
    assert all(np.isfinite(history[key][0]) for key in ("loss",) + LOSS_NAMES)
    assert history["proposal_recall"][0] >= 0.0


def test_config_rebuilds_the_model_and_weights_round_trip(model, tmp_path):
    config = model.get_config()
    clone = MaskRCNN.from_config(config)
    assert clone.get_config() == config
    assert [w.shape for w in clone.weights] == [w.shape for w in model.weights]
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    clone.load_weights(path)
    images, _ = glands(1, 64, seed=3)
    first = model.infer(images, score_threshold=0.0)
    second = clone.infer(images, score_threshold=0.0)
    np.testing.assert_allclose(first["scores"], second["scores"], atol=1e-5)
    np.testing.assert_array_equal(first["instances"], second["instances"])


def test_bad_arguments_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown Mask R-CNN options.*fpn_chanels"):
        build_maskrcnn("resnet_tiny", fpn_chanels=8)
    with pytest.raises(ValueError, match="resnet_tiny"):
        build_maskrcnn("resnet7")
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        build_maskrcnn("resnet_tiny", backbone_weights=str(tmp_path / "missing.weights.h5"))
    assert set(DEFAULT_OPTIONS) >= set(TINY)


def test_a_preset_name_offline_fails_with_the_local_file_alternatives(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    # Offline whatever the machine: no socket connects, and no earlier download is cached.
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    with pytest.raises(RuntimeError, match=r"resnet50_imagenet.*fail offline.*local \.weights\.h5"):
        load_backbone_weights(build_resnet("resnet_tiny"), "resnet50_imagenet")


def test_backbone_weights_from_a_keras_weights_file(tmp_path):
    source = build_resnet("resnet_tiny")
    path = str(tmp_path / "tiny.weights.h5")
    source.save_weights(path)
    target = build_resnet("resnet_tiny")
    load_backbone_weights(target, path)
    for expected, loaded in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(expected.numpy(), loaded.numpy())


def test_backbone_weights_from_keras_applications_resnet50_h5(tmp_path):
    applications = keras.applications.ResNet50(weights=None, include_top=False,
                                               input_shape=(64, 64, 3))
    rng = np.random.default_rng(0)
    path = str(tmp_path / "resnet50_notop.h5")
    # The layout of Keras-applications' resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5.
    with h5py.File(path, "w") as file:
        layers = [layer for layer in applications.layers if layer.weights]
        file.attrs["layer_names"] = [layer.name.encode() for layer in layers]
        for layer in layers:
            group = file.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = [name.encode() for name in names]
            for name, weight in zip(names, layer.weights, strict=True):
                group[name] = rng.normal(size=weight.shape).astype(np.float32)
    resnet = build_resnet("resnet50")
    load_backbone_weights(resnet, path)
    with h5py.File(path, "r") as file:
        stored = lambda layer, w: file[layer][f"{layer}/{w}:0"][()]  # noqa: E731
        ours = resnet.get_layer("v2_stack_2_block4_2_conv")
        np.testing.assert_array_equal(ours.kernel.numpy(), stored("conv4_block4_2_conv", "kernel"))
        bn = resnet.get_layer("v2_stack_2_block4_2_bn")
        np.testing.assert_allclose(bn.moving_mean.numpy(),
                                   stored("conv4_block4_2_bn", "moving_mean")
                                   - stored("conv4_block4_2_conv", "bias"), rtol=1e-6)
        np.testing.assert_array_equal(bn.gamma.numpy(), stored("conv4_block4_2_bn", "gamma"))
        # The stem sees RGB ImageNet-normalised images where applications saw BGR "caffe" ones:
        # conv1 + folded bias must give the same responses (VALID conv: no padding border).
        x = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
        caffe = 255.0 * x[..., ::-1] - np.array(CAFFE_MEAN_BGR, np.float32)
        normalised = (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        expected = (tf.nn.conv2d(caffe, stored("conv1_conv", "kernel"), 1, "VALID")
                    + stored("conv1_conv", "bias"))
        folded_bias = (stored("conv1_bn", "moving_mean")
                       - resnet.get_layer("conv1_bn").moving_mean.numpy())
        ours = (tf.nn.conv2d(normalised, resnet.get_layer("conv1_conv").kernel, 1, "VALID")
                + folded_bias)
        np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-2)
