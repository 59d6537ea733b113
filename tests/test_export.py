"""SavedModel export: signatures, fidelity to the Keras model at the training scale,
self-containment, atomicity."""
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
# The four flips of test-time augmentation on (H, W[, C]) arrays; each is its own inverse.
FLIPS = (lambda a: a, lambda a: a[:, ::-1], lambda a: a[::-1], lambda a: a[::-1, ::-1])
IMAGE_SIZE = 300  # training scale of the module's export: 437×613 runs at 214×300
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


def tiny_unet(contour_head=True, blur=False):
    """A base-8, depth-2 U-Net with hand-set weights, so that its outputs are smooth and meaningful.

    The first encoder level computes the red channel r and ramps relu(r - t) for t = 0.29, 0.32,
    0.35 (deeper levels and transposed convolutions are zero, so the skip connection carries them
    to the decoder). Mask head: sigmoid(40 (r - 0.3)); contour head: sigmoid(300 (bump - 0.01))
    with bump = relu(r - 0.29) - 2 relu(r - 0.32) + relu(r - 0.35), a rim along each object's edge.
    On `blob_image` this gives a handful of glands, some touching, with contour rims.
    `blur=True` makes the four 3×3 convolutions box filters instead of centre taps: the mask
    then thresholds a 9×9-wide blur of r, which closes dark gaps narrower than ~4 pixels, so
    what it finds depends on the scale it sees.
    """
    model = build_unet(base_filters=8, depth=DEPTH, contour_head=contour_head)
    for layer in model.layers:
        layer.set_weights([np.zeros_like(weight) for weight in layer.get_weights()])

    def taps(inputs, pairs):
        kernel = np.zeros((3, 3, inputs, 8), np.float32)
        for source, target in pairs:
            if blur:
                kernel[:, :, source, target] = 1.0 / 9.0
            else:
                kernel[1, 1, source, target] = 1.0
        return kernel

    ramps = np.zeros(8, np.float32)
    ramps[1:4] = [-0.29, -0.32, -0.35]
    layers = {"encoder1_conv1": (taps(3, [(0, 0)]), np.zeros(8, np.float32)),
              "encoder1_conv2": (taps(8, [(0, 0), (0, 1), (0, 2), (0, 3)]), ramps),
              "decoder1_conv1": (taps(16, [(i, i) for i in range(4)]), np.zeros(8, np.float32)),
              "decoder1_conv2": (taps(8, [(i, i) for i in range(4)]), np.zeros(8, np.float32))}
    heads = {"mask": ([40.0, 0, 0, 0], -40.0 * 0.3),
             "contour": ([0, 300.0, -600.0, 300.0], -300.0 * 0.01)}
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
    for cy, cx, radius in zip(rng.uniform(0, height, 12), rng.uniform(0, width, 12),
                              rng.uniform(10, 40, 12), strict=True):
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    colour = np.stack([field, 1.5 - field, 0.5 * field], axis=-1)
    colour = (colour - colour.min(axis=(0, 1))) / np.ptp(colour, axis=(0, 1))
    return (255 * colour).astype(np.uint8)


def training_scale(height, width, image_size):
    """(h, w) of an H×W image whose longer side becomes `image_size` (0: unchanged)."""
    if not image_size:
        return height, width
    scale = image_size / max(height, width)
    return round(height * scale), round(width * scale)


def keras_reference(model, image, options, image_size=0):
    """What the SavedModel should serve, computed outside its graph: resize to the training
    scale (anti-aliased bilinear, as the pipeline), Keras forward pass on the zero-padded image,
    crop, resize back to H×W (bilinear), NumPy post-processing at H×W."""
    height, width = image.shape[:2]
    scaled = training_scale(height, width, image_size)
    inputs = tf.constant(image[None], tf.float32) / 255.0
    if image_size:
        inputs = tf.clip_by_value(tf.image.resize(inputs, scaled, "bilinear", antialias=True), 0, 1)
    multiple = 2**DEPTH
    padded = np.pad(inputs.numpy(),
                    [(0, 0), (0, -scaled[0] % multiple), (0, -scaled[1] % multiple), (0, 0)])
    outputs = model.predict(padded, verbose=0)

    def to_native(output):
        output = output[:, :scaled[0], :scaled[1], :]
        if image_size:
            output = tf.image.resize(output, (height, width), "bilinear").numpy()
        return output[0, :, :, 0]

    probability = to_native(outputs["mask"])
    contour = to_native(outputs["contour"]) if "contour" in outputs else None
    return probability, contour, postprocess_instances(probability, contour, options)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_unet()
    out_dir = tmp_path_factory.mktemp("export") / "saved_model"
    export.export_model(model, out_dir, OPTIONS, image_size=IMAGE_SIZE)
    return model, out_dir


def serve_in_fresh_process(saved_model_dir, image, tmp_path):
    """Runs FRESH_PROCESS_SCRIPT on `image` (as an array and as PNG bytes) in `python -I`,
    where keras_glas cannot be imported; returns its outputs (`np.load` of the .npz)."""
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "image.png").write_bytes(png_bytes(image))
    (tmp_path / "serve.py").write_text(FRESH_PROCESS_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "serve.py"), str(saved_model_dir),
         str(tmp_path / "image.npy"), str(tmp_path / "image.png"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "out.npz")


def test_fresh_process_without_keras_glas_matches_keras(exported, tmp_path):
    model, saved_model_dir = exported
    image = blob_image(437, 613)
    served = serve_in_fresh_process(saved_model_dir, image, tmp_path)

    probability, contour, instances = keras_reference(model, image, OPTIONS, IMAGE_SIZE)
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
    assert info["image_size"] == IMAGE_SIZE
    assert info["pad_multiple"] == 2**DEPTH
    assert info["outputs"] == ["contour", "instances", "probabilities"]
    assert PostprocessOptions(**info["postprocess"]) == OPTIONS
    assert info["versions"]["tensorflow"] == tf.__version__

    out_dir = tmp_path / "model"
    export.export_model(tiny_unet(contour_head=False), out_dir)
    with pytest.raises(FileExistsError, match="--overwrite"):
        export.export_model(model, out_dir)
    assert export.read_export_info(out_dir)["outputs"] == ["instances", "probabilities"]
    assert export.read_export_info(out_dir)["image_size"] == 0  # a bare model: native resolution
    assert export.read_export_info(out_dir)["weights"] is None  # a model passed in memory
    export.export_model(model, out_dir, overwrite=True)
    assert "contour" in export.read_export_info(out_dir)["outputs"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no temp dirs left


def test_watershed_and_contour_split_need_what_the_graph_has():
    with pytest.raises(ValueError, match="watershed"):
        export.make_serving_function(tiny_unet(), PostprocessOptions(split="watershed"))
    with pytest.raises(ValueError, match="contour head"):
        export.make_serving_function(tiny_unet(contour_head=False),
                                     PostprocessOptions(split="contour"))
    with pytest.raises(ValueError, match="image_size"):
        export.make_serving_function(tiny_unet(), image_size=-1)


def test_test_time_flips_average_the_four_flips_and_make_the_maps_flip_equivariant(tmp_path):
    # A random U-Net is not flip-equivariant; the flip average is, exactly, when no padding
    # breaks the symmetry (sides multiples of 2**DEPTH), and at other sizes it is the mean of
    # the four flipped passes, each padded at the bottom and right.
    keras.utils.set_random_seed(3)
    model = build_unet(base_filters=4, depth=DEPTH, contour_head=True)
    plain = tf.function(export.make_serving_function(model))
    averaged = tf.function(export.make_serving_function(model, test_time_flips=True))
    image = blob_image(36, 48, seed=4)[None]
    flipped = image[:, ::-1, ::-1]
    for key in ("probabilities", "contour"):
        served = averaged(tf.constant(image))[key].numpy()
        served_flipped = averaged(tf.constant(flipped))[key].numpy()
        np.testing.assert_allclose(served_flipped, served[:, ::-1, ::-1], atol=1e-6)
        plain_gap = np.abs(plain(tf.constant(flipped))[key].numpy()
                           - plain(tf.constant(image))[key].numpy()[:, ::-1, ::-1])
        assert plain_gap.max() > 1e-3

    odd = blob_image(37, 50, seed=5)
    passes = []
    for flip in FLIPS:
        probability, contour, _ = keras_reference(model, np.ascontiguousarray(flip(odd)), OPTIONS)
        passes.append((flip(probability), flip(contour)))
    served = averaged(tf.constant(odd[None]))
    np.testing.assert_allclose(served["probabilities"][0], np.mean([p for p, _ in passes], axis=0),
                               atol=1e-5)
    np.testing.assert_allclose(served["contour"][0], np.mean([c for _, c in passes], axis=0),
                               atol=1e-5)

    out_dir = export.export_model(model, tmp_path / "flips", test_time_flips=True)
    assert export.read_export_info(out_dir)["test_time_flips"] is True
    loaded = tf.saved_model.load(str(out_dir)).signatures["serving_default"]
    np.testing.assert_allclose(loaded(images=tf.constant(odd[None]))["probabilities"],
                               served["probabilities"], atol=1e-5)


def test_test_time_flips_are_refused_for_maskrcnn():
    class MaskRCNNLike:
        def infer(self, images, feature_model=None):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="test_time_flips is for U-Nets"):
        export.make_serving_function(MaskRCNNLike(), test_time_flips=True)


def grid_image(cell, gap):
    """uint8 (2 cell + 3 gap, 3 cell + 4 gap, 3): 2×3 red squares of side `cell` on black,
    separated (and framed) by black gaps `gap` wide. `grid_image(2 c, 2 g)` is the same scene
    at twice the size."""
    image = np.zeros((2 * cell + 3 * gap, 3 * cell + 4 * gap, 3), np.uint8)
    for row in range(2):
        for col in range(3):
            top, left = gap + row * (cell + gap), gap + col * (cell + gap)
            image[top:top + cell, left:left + cell, 0] = 255
    return image


def test_network_runs_at_the_training_scale_whatever_the_image_size(tmp_path):
    # The blur closes gaps of 3 pixels but not of 6: at native resolution the half-size scene
    # merges, at the training scale (S = the full image's longer side) both sizes see 6 px gaps.
    model = tiny_unet(contour_head=False, blur=True)
    full, half = grid_image(cell=32, gap=6), grid_image(cell=16, gap=3)
    size = max(full.shape[:2])
    counts = {}
    for image_size in (size, 0):
        out_dir = export.export_model(model, tmp_path / f"size{image_size}", image_size=image_size)
        serve = tf.saved_model.load(str(out_dir)).signatures["serving_default"]
        for name, image in (("full", full), ("half", half)):
            served = serve(images=tf.constant(image[None]))
            assert served["instances"].shape == (1, *image.shape[:2])  # native pixels out
            counts[name, image_size] = int(served["instances"].numpy().max())
    assert counts["full", size] == counts["half", size] == counts["full", 0] == 6
    assert counts["half", 0] < 6


def test_postprocess_overrides_are_typed_and_validated():
    options = export.postprocess_options(OPTIONS,
                                         ["min_size=20", "fill_holes=false", "threshold=0.3"])
    assert (options.min_size, options.fill_holes, options.threshold) == (20, False, 0.3)
    assert options.split == "contour"
    with pytest.raises(ValueError, match="min_size"):
        export.postprocess_options(None, ["min_size=big"])
    with pytest.raises(ValueError, match="threshold, min_size"):
        export.postprocess_options(None, ["colour=red"])


def write_run_dir(run_dir, model, image_size, **train_options):
    """A minimal training run dir (contract 10) for `model`, a tiny U-Net without contour head,
    trained at `data.image_size` = `image_size` with `TrainConfig(**train_options)`, whose last
    checkpoint holds `model`'s weights."""
    from keras_glas.config import (
        Config,
        DataConfig,
        TrainConfig,
        UNetConfig,
        save_config,
    )

    config = Config(data=DataConfig(image_size=image_size),
                    model=UNetConfig(base_filters=8, depth=DEPTH),
                    train=TrainConfig(**train_options),
                    postprocess=PostprocessOptions(min_size=3))
    save_config(config, run_dir / "config.yaml")
    (run_dir / "checkpoints").mkdir(parents=True)
    model.save_weights(run_dir / "checkpoints" / "last.weights.h5")


def test_export_cli_from_run_dir_is_float32_at_the_run_scale_and_native_on_request(tmp_path):
    model = tiny_unet(contour_head=False)
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, model, image_size=64)
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
    native_dir = tmp_path / "native"
    export.main([str(run_dir), str(native_dir), "--checkpoint", "last", "--image-size", "0"])
    assert (out_dir / "assets.extra" / "config.yaml").is_file()
    info = json.loads((out_dir / "assets.extra" / "keras_glas_export.json").read_text())
    assert (info["postprocess"]["min_size"], info["image_size"]) == (3, 64)
    assert export.read_export_info(native_dir)["image_size"] == 0

    image = blob_image(45, 70)  # runs at 41×64 by default, 45×70 with --image-size 0
    for saved_model, image_size in ((out_dir, 64), (native_dir, 0)):
        probability, _, instances = keras_reference(model, image, PostprocessOptions(min_size=3),
                                                    image_size)
        served = tf.saved_model.load(str(saved_model)).signatures["serving_default"](
            images=tf.constant(image[None]))
        np.testing.assert_allclose(served["probabilities"][0], probability, atol=1e-5)
        np.testing.assert_array_equal(served["instances"][0], instances)
    with pytest.raises(SystemExit) as negative:
        export.main([str(run_dir), str(tmp_path / "bad"), "--checkpoint", "last",
                     "--image-size", "-5"])
    assert negative.value.code == 2 and not (tmp_path / "bad").exists()


def test_export_takes_the_checkpoint_the_run_configures_unless_told_otherwise(tmp_path):
    last, best = tiny_unet(contour_head=False), tiny_unet(contour_head=False, blur=True)
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, last, image_size=64, export_checkpoint="last")
    best.save_weights(run_dir / "checkpoints" / "best.weights.h5")

    image = blob_image(40, 64)
    expected = {name: keras_reference(model, image, PostprocessOptions(min_size=3), 64)[0]
                for name, model in (("last", last), ("best", best))}
    assert np.abs(expected["last"] - expected["best"]).max() > 1e-2
    for argv, name in (([], "last"), (["--checkpoint", "best"], "best")):
        out_dir = tmp_path / f"exported_{name}"
        export.main([str(run_dir), str(out_dir), *argv])
        served = tf.saved_model.load(str(out_dir)).signatures["serving_default"](
            images=tf.constant(image[None]))
        np.testing.assert_allclose(served["probabilities"][0], expected[name], atol=1e-5)
        weights = run_dir.resolve() / "checkpoints" / f"{name}.weights.h5"
        assert export.read_export_info(out_dir)["weights"] == str(weights)


def test_export_averages_flips_when_the_run_configures_it_unless_told_otherwise(tmp_path):
    keras.utils.set_random_seed(3)  # random weights: not flip-equivariant, unlike tiny_unet's
    model = build_unet(base_filters=8, depth=DEPTH)
    run_dir = tmp_path / "run"
    write_run_dir(run_dir, model, image_size=64, export_checkpoint="last",
                  export_test_time_flips=True)
    image = blob_image(40, 64)
    averaged = np.mean([flip(keras_reference(model, np.ascontiguousarray(flip(image)),
                                             PostprocessOptions(min_size=3), 64)[0])
                        for flip in FLIPS], axis=0)
    plain = keras_reference(model, image, PostprocessOptions(min_size=3), 64)[0]
    assert np.abs(averaged - plain).max() > 1e-3
    for argv, flipped, expected in (([], True, averaged), (["--no-test-time-flips"], False, plain)):
        out_dir = tmp_path / f"exported_{flipped}"
        export.main([str(run_dir), str(out_dir), *argv])
        assert export.read_export_info(out_dir)["test_time_flips"] is flipped
        serve = tf.saved_model.load(str(out_dir)).signatures["serving_default"]
        served = serve(images=tf.constant(image[None]))
        np.testing.assert_allclose(served["probabilities"][0], expected, atol=1e-5)


def test_maskrcnn_round_trip_in_fresh_process_boxes_in_original_pixels(tmp_path):
    from keras_glas.models.maskrcnn import build_maskrcnn

    keras.utils.set_random_seed(0)
    model = build_maskrcnn("resnet_tiny", fpn_channels=16, box_head_units=32, mask_head_channels=16,
                           rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, max_detections=10,
                           score_threshold=0.0)
    saved_model_dir = export.export_model(model, tmp_path / "maskrcnn", image_size=64)
    assert export.read_export_info(saved_model_dir)["model_kind"] == "maskrcnn"
    image = blob_image(77, 101)  # runs at 49×64
    served = serve_in_fresh_process(saved_model_dir, image, tmp_path)

    scaled = training_scale(77, 101, 64)
    inputs = tf.image.resize(tf.constant(image[None], tf.float32) / 255.0, scaled, "bilinear",
                             antialias=True)
    output = model.infer(tf.clip_by_value(inputs, 0, 1))
    assert output["instances"].numpy().max() > 0  # score_threshold 0: random heads detect
    scale = np.array([scaled[0] / 77, scaled[1] / 101] * 2, np.float32)
    expected = {"instances": tf.image.resize(output["instances"][..., None], (77, 101),
                                             "nearest")[..., 0],
                "probabilities": tf.image.resize(output["probabilities"][..., None],
                                                 (77, 101))[..., 0],
                "boxes": output["boxes"] / scale, "scores": output["scores"]}
    for prefix in ("images", "bytes"):
        np.testing.assert_array_equal(served[f"{prefix}_instances"], expected["instances"])
        for key in ("probabilities", "boxes", "scores"):
            np.testing.assert_allclose(served[f"{prefix}_{key}"], expected[key], atol=1e-4)
    # Each instance lies inside its box, both in the original image's pixels.
    instances, boxes = served["images_instances"][0], served["images_boxes"][0]
    for label in np.unique(instances[instances > 0]):
        rows, cols = np.nonzero(instances == label)
        ymin, xmin, ymax, xmax = boxes[label - 1]
        assert ymin - 2 <= rows.min() and rows.max() <= ymax + 2, (
            label, rows.min(), rows.max(), boxes[label - 1])
        assert xmin - 2 <= cols.min() and cols.max() <= xmax + 2, (
            label, cols.min(), cols.max(), boxes[label - 1])
