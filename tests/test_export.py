"""SavedModel export: signatures, fidelity to the Keras model, self-containment, atomicity."""
import io
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_glas import export
from keras_glas.models.unet import build_unet
from keras_glas.postprocess import PostprocessOptions, postprocess_instances

DEPTH = 2
OPTIONS = PostprocessOptions(threshold=0.5, min_size=6, fill_holes=True, split="contour",
                             contour_threshold=0.6)

# Run with `python -I` (no PYTHONPATH, no user site, no cwd): a meta-path finder in front of
# the editable install's makes `keras_glas` unimportable, as on a serving host.
FRESH_PROCESS_SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("keras_glas", "tfds_glas"):
                raise ImportError(f"{name} is not installed on this serving host")

    sys.meta_path.insert(0, Block())
    try:
        import keras_glas
        raise SystemExit("keras_glas should not be importable here")
    except ImportError:
        pass

    import numpy as np
    import tensorflow as tf

    saved_model_dir, image_npy, png_path, out_npz = sys.argv[1:]
    loaded = tf.saved_model.load(saved_model_dir)
    image = np.load(image_npy)
    images = loaded.signatures["serving_default"](images=tf.constant(image[None]))
    png = open(png_path, "rb").read()
    decoded = loaded.signatures["serve_bytes"](images=tf.constant([png]))
    assert not any(name.startswith("keras_glas") for name in sys.modules)
    np.savez(out_npz, **{f"images_{k}": v.numpy() for k, v in images.items()},
             **{f"bytes_{k}": v.numpy() for k, v in decoded.items()})
""")


def tiny_unet(contour_head=True):
    """A base-8, depth-2 U-Net with hand-set weights, so that its outputs are smooth and meaningful.

    The first encoder level computes the red channel r and ramps relu(r - t) for t = 0.29, 0.32,
    0.35 (deeper levels and transposed convolutions are zero, so the skip connection carries them
    to the decoder). Mask head: sigmoid(40 (r - 0.3)); contour head: sigmoid(300 (bump - 0.01))
    with bump = relu(r - 0.29) - 2 relu(r - 0.32) + relu(r - 0.35), a rim along each object's edge.
    On `blob_image` this gives a handful of glands, some touching, with contour rims.
    """
    model = build_unet(base_filters=8, depth=DEPTH, contour_head=contour_head)
    for layer in model.layers:
        layer.set_weights([np.zeros_like(weight) for weight in layer.get_weights()])

    def centre(inputs, pairs):
        kernel = np.zeros((3, 3, inputs, 8), np.float32)
        for source, target in pairs:
            kernel[1, 1, source, target] = 1.0
        return kernel

    ramps = np.zeros(8, np.float32)
    ramps[1:4] = [-0.29, -0.32, -0.35]
    layers = {"encoder1_conv1": (centre(3, [(0, 0)]), np.zeros(8, np.float32)),
              "encoder1_conv2": (centre(8, [(0, 0), (0, 1), (0, 2), (0, 3)]), ramps),
              "decoder1_conv1": (centre(16, [(i, i) for i in range(4)]), np.zeros(8, np.float32)),
              "decoder1_conv2": (centre(8, [(i, i) for i in range(4)]), np.zeros(8, np.float32))}
    heads = {"mask": ([40.0, 0, 0, 0], -40.0 * 0.3), "contour": ([0, 300.0, -600.0, 300.0], -300.0 * 0.01)}
    for head, (weights, bias) in heads.items():
        if head in model.output:
            kernel = np.zeros((1, 1, 8, 1), np.float32)
            kernel[0, 0, :4, 0] = weights
            layers[f"{head}_logits"] = (kernel, np.array([bias], np.float32))
    for name, weights in layers.items():
        model.get_layer(name).set_weights(list(weights))
    return model


def blob_image(height, width, seed=0):
    """uint8 (H, W, 3): smooth random blobs (red channel = blob field, normalised to [0, 1])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    field = np.zeros((height, width))
    for cy, cx, radius in zip(rng.uniform(0, height, 12), rng.uniform(0, width, 12), rng.uniform(10, 40, 12)):
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    colour = np.stack([field, 1.5 - field, 0.5 * field], axis=-1)
    colour = (colour - colour.min(axis=(0, 1))) / np.ptp(colour, axis=(0, 1))
    return (255 * colour).astype(np.uint8)


def keras_reference(model, image, options):
    """Keras forward pass on the zero-padded image, cropped, then NumPy post-processing."""
    height, width = image.shape[:2]
    multiple = 2**DEPTH
    padded = np.pad(image.astype(np.float32) / 255.0,
                    [(0, -height % multiple), (0, -width % multiple), (0, 0)])
    outputs = model.predict(padded[None], verbose=0)
    probability = outputs["mask"][0, :height, :width, 0]
    contour = outputs["contour"][0, :height, :width, 0] if "contour" in outputs else None
    return probability, contour, postprocess_instances(probability, contour, options)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_unet()
    out_dir = tmp_path_factory.mktemp("export") / "saved_model"
    export.export_model(model, out_dir, OPTIONS)
    return model, out_dir


def test_fresh_process_without_keras_glas_matches_keras(exported, tmp_path):
    model, saved_model_dir = exported
    image = blob_image(437, 613)
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "image.png").write_bytes(png_bytes(image))
    (tmp_path / "serve.py").write_text(FRESH_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "serve.py"), str(saved_model_dir),
         str(tmp_path / "image.npy"), str(tmp_path / "image.png"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")

    probability, contour, instances = keras_reference(model, image, OPTIONS)
    assert instances.max() >= 3  # the comparison is about real objects, not an empty map
    for prefix in ("images", "bytes"):
        assert served[f"{prefix}_instances"].dtype == np.int32
        assert served[f"{prefix}_instances"].shape == (1, 437, 613)
        np.testing.assert_allclose(served[f"{prefix}_probabilities"][0], probability, atol=1e-5)
        np.testing.assert_allclose(served[f"{prefix}_contour"][0], contour, atol=1e-5)
        np.testing.assert_array_equal(served[f"{prefix}_instances"][0], instances)


def test_serve_bytes_decodes_bmp_and_jpeg_and_rejects_mixed_sizes(exported):
    _, saved_model_dir = exported
    serve_bytes = tf.saved_model.load(str(saved_model_dir)).signatures["serve_bytes"]
    image = blob_image(40, 52)
    bmp = io.BytesIO()
    Image.fromarray(image).save(bmp, format="BMP")
    jpeg = tf.io.encode_jpeg(image).numpy()
    outputs = serve_bytes(images=tf.constant([bmp.getvalue(), jpeg]))
    assert outputs["instances"].shape == (2, 40, 52)
    assert outputs["probabilities"].dtype == tf.float32

    with pytest.raises(tf.errors.InvalidArgumentError, match="share a size"):
        serve_bytes(images=tf.constant([png_bytes(image), png_bytes(blob_image(40, 56))]))
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve_bytes(images=tf.constant([b"not an image"]))


def test_export_info_and_atomic_overwrite(exported, tmp_path):
    model, saved_model_dir = exported
    info = export.read_export_info(saved_model_dir)
    assert info["model_kind"] == "unet"
    assert info["pad_multiple"] == 2**DEPTH
    assert info["outputs"] == ["contour", "instances", "probabilities"]
    assert PostprocessOptions(**info["postprocess"]) == OPTIONS
    assert info["versions"]["tensorflow"] == tf.__version__

    out_dir = tmp_path / "model"
    export.export_model(tiny_unet(contour_head=False), out_dir)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_model(model, out_dir)
    assert export.read_export_info(out_dir)["outputs"] == ["instances", "probabilities"]
    export.export_model(model, out_dir, overwrite=True)
    assert "contour" in export.read_export_info(out_dir)["outputs"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no temp dirs left


def test_watershed_and_contour_split_need_what_the_graph_has():
    with pytest.raises(ValueError, match="watershed"):
        export.make_serving_function(tiny_unet(), PostprocessOptions(split="watershed"))
    with pytest.raises(ValueError, match="contour head"):
        export.make_serving_function(tiny_unet(contour_head=False), PostprocessOptions(split="contour"))


def test_postprocess_overrides_are_typed_and_validated():
    options = export.postprocess_options(OPTIONS, ["min_size=20", "fill_holes=false", "threshold=0.3"])
    assert (options.min_size, options.fill_holes, options.threshold) == (20, False, 0.3)
    assert options.split == "contour"
    with pytest.raises(ValueError, match="min_size"):
        export.postprocess_options(None, ["min_size=big"])
    with pytest.raises(ValueError, match="threshold, min_size"):
        export.postprocess_options(None, ["colour=red"])


def write_run_dir(run_dir, model):
    """A minimal training run dir (contract 10) for `model`, a tiny U-Net without contour head."""
    from keras_glas.config import Config, UNetConfig, save_config

    config = Config(model=UNetConfig(base_filters=8, depth=DEPTH),
                    postprocess=PostprocessOptions(min_size=3))
    save_config(config, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir(parents=True)
    model.save_weights(run_dir / "checkpoints" / "last.weights.h5")


def test_export_cli_from_run_dir_is_float32_under_mixed_policy(tmp_path):
    model = tiny_unet(contour_head=False)
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, model)
    out_dir = tmp_path / "exported"
    with pytest.raises(SystemExit) as missing:
        export.main([str(run_dir), str(out_dir)])
    assert missing.value.code == 2 and not out_dir.exists()

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        export.main([str(run_dir), str(out_dir), "--checkpoint", "last"])
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")
    assert (out_dir / "assets.extra" / "config.yaml").is_file()
    info = json.loads((out_dir / "assets.extra" / "keras_glas_export.json").read_text())
    assert info["postprocess"]["min_size"] == 3

    image = blob_image(45, 70)
    probability, _, instances = keras_reference(model, image, PostprocessOptions(min_size=3))
    served = tf.saved_model.load(str(out_dir)).signatures["serving_default"](images=tf.constant(image[None]))
    np.testing.assert_allclose(served["probabilities"][0], probability, atol=1e-5)
    np.testing.assert_array_equal(served["instances"][0], instances)


def test_maskrcnn_round_trip_in_fresh_process(tmp_path):
    from keras_glas.models.maskrcnn import build_maskrcnn

    keras.utils.set_random_seed(0)
    model = build_maskrcnn("resnet_tiny", fpn_channels=16, box_head_units=32, mask_head_channels=16,
                           rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, max_detections=10,
                           score_threshold=0.0)
    saved_model_dir = export.export_model(model, tmp_path / "maskrcnn")
    assert export.read_export_info(saved_model_dir)["model_kind"] == "maskrcnn"
    image = blob_image(77, 101)
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "image.png").write_bytes(png_bytes(image))
    (tmp_path / "serve.py").write_text(FRESH_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "serve.py"), str(saved_model_dir),
         str(tmp_path / "image.npy"), str(tmp_path / "image.png"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")

    expected = model.infer(tf.constant(image[None], tf.float32) / 255.0)
    assert expected["instances"].numpy().max() > 0  # score_threshold 0: random heads detect
    for prefix in ("images", "bytes"):
        np.testing.assert_array_equal(served[f"{prefix}_instances"], expected["instances"])
        for key in ("probabilities", "boxes", "scores"):
            np.testing.assert_allclose(served[f"{prefix}_{key}"], expected[key], atol=1e-4)
