"""Export a trained model as a self-contained TensorFlow SavedModel.

`python -m keras_glas.export RUN_DIR OUT_DIR [--checkpoint best|last|PATH] [--image-size S]
[--postprocess KEY=VALUE ...] [--test-time-flips] [--overwrite]`
rebuilds the model of a training run (contract 10) from its `config.yaml`, loads a checkpoint
and writes a SavedModel (contract 11) whose graph does everything a client needs:

- `serving_default(images: uint8 (N, H, W, 3))`, any H×W: scale to [0, 1], resize to the
  training scale (below), pad to a multiple of the network's stride, run (for a U-Net
  exported with `--test-time-flips`: on the four flips of the image, averaging the maps flipped
  back), crop back, resize the maps back to H×W, post-process in graph at H×W (threshold,
  connected components, optional small-object removal, hole filling and contour split;
  `min_size` counts native pixels) → `instances` int32 (N, H, W), `probabilities` float32
  (N, H, W), plus `contour` float32 (N, H, W) for a U-Net with a contour head, or `boxes`
  float32 (N, D, 4) (yxyx pixels of the original H×W image) and `scores` float32 (N, D) for
  Mask R-CNN.
- `serve_bytes(images: string (N,))`: PNG / BMP / JPEG bytes (TF Serving's REST `{"b64": ..}`)
  decoded in graph, then the same outputs. All images of one request must share a size.

Inference scale: training (`keras_glas.data`) resizes every image so that its longer side is
`data.image_size` S, so the network has only seen glands at that scale. The SavedModel does
the same: an H×W request runs the network at (round(H·s), round(W·s)), s = S / max(H, W),
resized like the pipeline (anti-aliased bilinear, `keras_glas.augment.resize_with_pad`); the
U-Net's `probabilities` / `contour` come back to H×W bilinearly, Mask R-CNN's `instances` by
nearest neighbour, its `probabilities` bilinearly and its `boxes` divided by the scale of each
axis. S defaults to the run's `data.image_size`; `--image-size S` overrides it and
`--image-size 0` runs the network at the native resolution (for models trained on native-scale
crops). `export_model` on a bare Keras model (and a `.keras` file) defaults to native
resolution: nothing records its training scale.

Nothing from `keras_glas` (or Keras) is needed to load or run it:
`tf.saved_model.load(path).signatures["serving_default"](images=...)`. The resolved run config
and `keras_glas_export.json` (model kind, the weights file, inference `image_size` (0 =
native), post-processing options, versions) are stored in the SavedModel's `assets.extra/`.
The graph is always float32: a run trained under a mixed-precision policy is rebuilt under
float32 for export (its variables are float32 either way), so neither the exporting nor the
loading process's global policy matters. The exported network is a copy with its batch norms
folded into the convolutions in front of them (`keras_glas.models.fold_batch_norm`): the same
function with fewer passes over the activations.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_glas
from keras_glas.augment import to_float
from keras_glas.models import fold_batch_norm
from keras_glas.postprocess import PostprocessOptions, tf_postprocess_instances

EXPORT_INFO_FILE = "keras_glas_export.json"
CONFIG_FILE = "config.yaml"
ASSETS_EXTRA_DIR = "assets.extra"
MASKRCNN_PAD_MULTIPLE = 32
IMAGE_SIGNATURE = tf.TensorSpec((None, None, None, 3), tf.uint8, name="images")
BYTES_SIGNATURE = tf.TensorSpec((None,), tf.string, name="images")


def model_kind(model):
    """`"maskrcnn"` for a model with the Mask R-CNN `infer` method (contract 8), else `"unet"`."""
    return "maskrcnn" if callable(getattr(model, "infer", None)) else "unet"


def unet_pad_multiple(model):
    """Input side multiple a U-Net needs: 2 ** (number of 2×2 max-pooling layers)."""
    pools = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.MaxPooling2D)]
    return 2 ** len(pools)


def pad_to_multiple(images, multiple):
    """Zero-pad float images (N, H, W, C) at the bottom and right to multiples of `multiple`.

    The training pipeline pads with zeros too, so padded borders look like what the model saw.
    """
    shape = tf.shape(images)
    pad_height = (-shape[1]) % multiple
    pad_width = (-shape[2]) % multiple
    return tf.pad(images, [[0, 0], [0, pad_height], [0, pad_width], [0, 0]])


def decode_images(encoded):
    """Decode a batch of PNG / BMP / JPEG / GIF bytes, string (N,) → uint8 (N, H, W, 3).

    Every image of one request must have the same size (they form one tensor); otherwise, or
    for an empty request, the call fails with an `InvalidArgumentError` saying so.
    """
    def decode_one(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image.set_shape((None, None, 3))
        return image

    non_empty = tf.debugging.assert_positive(
        tf.size(encoded), message="serve_bytes: the request holds no image")
    with tf.control_dependencies([non_empty]):
        first_shape = tf.shape(decode_one(encoded[0]))

    def decode_same_size(data):
        image = decode_one(data)
        same_size = tf.debugging.assert_equal(
            tf.shape(image), first_shape,
            message="serve_bytes: all images of one request must share a size (height, width); "
                    "send images of different sizes in separate requests")
        with tf.control_dependencies([same_size]):
            return tf.identity(image)

    return tf.map_fn(decode_same_size, encoded,
                     fn_output_signature=tf.TensorSpec((None, None, 3), tf.uint8))


def training_scale_shape(height, width, image_size):
    """(h, w) int32 scalars: H×W resized so that its longer side is `image_size`, aspect kept.

    The same rounding as `keras_glas.augment.resize_with_pad` (the training pipeline).
    """
    shape = tf.cast(tf.stack([height, width]), tf.float32)
    scale = image_size / tf.reduce_max(shape)
    new_shape = tf.clip_by_value(tf.cast(tf.round(shape * scale), tf.int32), 1, image_size)
    return new_shape[0], new_shape[1]


def resize_to_training_scale(images, image_size):
    """float32 (N, H, W, 3) in [0, 1] → float32 (N, h, w, 3), the longer side `image_size`.

    Anti-aliased bilinear and clipped to [0, 1], as the pipeline's `resize_with_pad` (which
    works on single images and pads to a square; the network needs neither).
    """
    shape = tf.shape(images)
    new_shape = training_scale_shape(shape[1], shape[2], image_size)
    resized = tf.image.resize(images, new_shape, method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 1.0)


def resize_maps(maps, height, width, method="bilinear"):
    """Resize (N, h, w) maps to (N, height, width): `bilinear` (float32) or `nearest` (ids)."""
    return tf.image.resize(maps[..., None], (height, width), method=method)[..., 0]


def run_cropped(network, inputs, multiple):
    """One U-Net pass on images of any size: pad, run, crop back, float32.

    Args:
        network: a U-Net (contract 4): float32 (N, H', W', 3) → dict of (N, H', W', 1) maps.
        inputs: float32 (N, h, w, 3) in [0, 1], any h×w.
        multiple: the network's input side multiple (`unet_pad_multiple`); the padding goes
            at the bottom and right, where the training pipeline puts it.
    Returns:
        dict of float32 (N, h, w, 1) maps.
    """
    height, width = tf.shape(inputs)[1], tf.shape(inputs)[2]
    outputs = network(pad_to_multiple(inputs, multiple), training=False)
    return {key: tf.cast(value[:, :height, :width], tf.float32) for key, value in outputs.items()}


def flip_averaged(network, inputs, multiple):
    """U-Net outputs averaged over the four flips of `inputs` (test-time augmentation).

    Args: as `run_cropped`, whose bottom-right padding each flip gets after flipping, so every
        pass sees the padding where training put it.
    Returns:
        dict of float32 (N, h, w, 1): the mean over identity, left-right, up-down and both
        flips of each output, each flipped back first.
    """
    totals = None
    for axes in ((), (2,), (1,), (1, 2)):
        maps = run_cropped(network, tf.reverse(inputs, axes) if axes else inputs, multiple)
        if axes:
            maps = {key: tf.reverse(value, axes) for key, value in maps.items()}
        totals = maps if totals is None else {key: totals[key] + maps[key] for key in maps}
    return {key: total / 4.0 for key, total in totals.items()}


def make_serving_function(model, postprocess=PostprocessOptions(), image_size=0,
                          fold_batch_norms=False, test_time_flips=False):
    """The graph behind both signatures: uint8 (N, H, W, 3) → dict of outputs (contract 11).

    Args:
        model: a U-Net (contract 4, dict output `mask` [+ `contour`]) or a Mask R-CNN
            (contract 8, with `infer`).
        postprocess: `PostprocessOptions` applied in graph to U-Net probabilities at H×W (Mask
            R-CNN builds its instance map itself). `split="watershed"` is NumPy-only: ValueError.
        image_size: the training scale S: the network sees each image resized so that its
            longer side is S (see the module docstring); 0 = native resolution.
        fold_batch_norms: run a copy of the network with its batch norms folded into the
            convolutions (`keras_glas.models.fold_batch_norm`): the same function, faster, but
            a snapshot of the current weights, so only for a model that is done training.
        test_time_flips: U-Net only: average the network's maps over the four flips of each
            image (`flip_averaged`), 4x the inference cost.
    Returns:
        A plain Python function of a uint8 tensor; wrap it in `tf.function` to trace it.
    """
    if image_size < 0:
        raise ValueError(f"image_size must be a positive side in pixels or 0 (native "
                         f"resolution), got {image_size}")

    def network_input(images):
        """uint8 (N, H, W, 3) → float32 at the network's scale (contract 2), H, W."""
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        inputs = to_float(images)
        if image_size:
            inputs = resize_to_training_scale(inputs, image_size)
        return inputs, height, width

    if model_kind(model) == "maskrcnn":
        if test_time_flips:
            raise ValueError("test_time_flips is for U-Nets: averaging Mask R-CNN's instances "
                             "over flips needs instance matching, which the export does not do")
        feature_model = (fold_batch_norm.fold_batch_norms(model.feature_model)
                         if fold_batch_norms else None)

        def serve_maskrcnn(images):
            inputs, height, width = network_input(images)
            outputs = model.infer(inputs, feature_model=feature_model)
            if not image_size:
                return {key: outputs[key]
                        for key in ("instances", "probabilities", "boxes", "scores")}
            # Per-axis scale: rounding makes h / H and w / W differ slightly from S / max(H, W).
            scale = (tf.cast(tf.shape(inputs)[1:3], tf.float32)
                     / tf.cast(tf.stack([height, width]), tf.float32))
            return {"instances": resize_maps(outputs["instances"], height, width, "nearest"),
                    "probabilities": resize_maps(outputs["probabilities"], height, width),
                    "boxes": outputs["boxes"] / tf.tile(scale, [2]),
                    "scores": outputs["scores"]}
        return serve_maskrcnn

    if postprocess.split == "watershed":
        raise ValueError(
            "postprocess split='watershed' runs in NumPy only and cannot be exported in graph; "
            "export with split 'none' or 'contour' (e.g. `--postprocess split=none`) and use "
            "`python -m keras_glas.evaluate MODEL --postprocess split=watershed` to score it")
    has_contour = "contour" in model.output
    if postprocess.split == "contour" and not has_contour:
        raise ValueError("postprocess split='contour' needs a U-Net with a contour head "
                         "(model.contour_head: true); use split 'none' for this model")
    multiple = unet_pad_multiple(model)
    network = fold_batch_norm.fold_batch_norms(model) if fold_batch_norms else model

    def serve_unet(images):
        inputs, height, width = network_input(images)
        outputs = (flip_averaged if test_time_flips else run_cropped)(network, inputs, multiple)

        def to_native(output):
            return resize_maps(output[..., 0], height, width) if image_size else output[..., 0]

        served = {"probabilities": to_native(outputs["mask"])}
        contour = to_native(outputs["contour"]) if has_contour else None
        if has_contour:
            served["contour"] = contour
        served["instances"] = tf_postprocess_instances(served["probabilities"], contour,
                                                       postprocess)
        return served
    return serve_unet


def export_info(model, postprocess, image_size=0, weights=None, test_time_flips=False):
    """The `keras_glas_export.json` record: model kind, the weights file it was exported from
    (None for a model passed in memory), inference image size (0 = native), whether the maps
    are averaged over flips, post-processing options, versions."""
    kind = model_kind(model)
    return {
        "model_kind": kind,
        "weights": None if weights is None else str(Path(weights).resolve()),
        "image_size": image_size,
        "test_time_flips": test_time_flips,
        "outputs": sorted(make_output_names(model)),
        "postprocess": dataclasses.asdict(postprocess) if kind == "unet" else None,
        "pad_multiple": unet_pad_multiple(model) if kind == "unet" else MASKRCNN_PAD_MULTIPLE,
        "versions": {"keras_glas": keras_glas.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
    }


def make_output_names(model):
    """Names of the SavedModel's outputs for this model (contract 11)."""
    if model_kind(model) == "maskrcnn":
        return {"instances", "probabilities", "boxes", "scores"}
    return {"instances", "probabilities"} | ({"contour"} if "contour" in model.output else set())


def export_model(model, out_dir, postprocess=PostprocessOptions(), config_path=None,
                 overwrite=False, image_size=0, weights=None, test_time_flips=False):
    """Write `model` as a SavedModel (contract 11) at `out_dir`, atomically.

    Args:
        model: a built U-Net or Mask R-CNN with its weights loaded.
        out_dir: destination directory; an existing one is an error unless `overwrite`.
        postprocess: in-graph post-processing options (U-Net).
        config_path: optional resolved `config.yaml` copied to `assets.extra/`.
        overwrite: replace an existing `out_dir`.
        image_size: the training scale S the network runs at (longer side, see the module
            docstring); 0 = native resolution.
        weights: the checkpoint or `.keras` file `model`'s weights came from, recorded in
            `keras_glas_export.json` so that a SavedModel says which weights it serves.
        test_time_flips: average a U-Net's maps over the four flips of each image.
    Returns:
        `Path` of the SavedModel directory.
    """
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)
    serve = tf.function(make_serving_function(model, postprocess, image_size, fold_batch_norms=True,
                                              test_time_flips=test_time_flips),
                        input_signature=[IMAGE_SIGNATURE])
    serve_bytes = tf.function(lambda images: serve(decode_images(images)),
                              input_signature=[BYTES_SIGNATURE])
    # The archive saves the variables the traced functions use. `archive.track(model)` is not
    # called: it only matters for lookup tables, and its walk fails on models holding dicts with
    # int keys (KerasCV's feature pyramid). Traced here with autograph on; ExportArchive takes
    # already-traced tf.functions as they are.
    archive = keras.export.ExportArchive()
    for name, function in (("serving_default", serve), ("serve_bytes", serve_bytes)):
        function.get_concrete_function()
        archive.add_endpoint(name, function)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        archive.write_out(str(staging / "saved_model"), verbose=False)
        extra = staging / "saved_model" / ASSETS_EXTRA_DIR
        extra.mkdir(exist_ok=True)
        info = export_info(model, postprocess, image_size, weights, test_time_flips)
        (extra / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
        if config_path is not None:
            shutil.copyfile(config_path, extra / CONFIG_FILE)
        _replace_directory(staging / "saved_model", out_dir, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _check_destination(out_dir, overwrite):
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to "
                              "replace it or choose another OUT_DIR")


def _replace_directory(source, destination, overwrite):
    """Move `source` to `destination`; an existing destination is swapped out, then deleted."""
    _check_destination(destination, overwrite)
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.rename(destination, old)
        os.rename(source, destination)
        shutil.rmtree(old)
    else:
        os.rename(source, destination)


@contextlib.contextmanager
def float32_policy():
    """Build models under the float32 policy, restoring the caller's global policy after."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def checkpoint_path(run_dir, checkpoint="best"):
    """`best` / `last` → `RUN_DIR/checkpoints/<name>.weights.h5`; anything else is a path."""
    path = (Path(run_dir) / "checkpoints" / f"{checkpoint}.weights.h5"
            if checkpoint in ("best", "last") else Path(checkpoint))
    if not path.is_file():
        hint = (" (the run has no best checkpoint yet: try --checkpoint last)"
                if checkpoint == "best" else "")
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    return path


def postprocess_options(section, overrides=()):
    """`PostprocessOptions` from a config section (dataclass, mapping or None) + `key=value`s.

    Values are converted to the type of the option's default; an unknown key or a bad value is
    a ValueError naming it and the valid keys.
    """
    if section is None:
        values = {}
    elif dataclasses.is_dataclass(section):
        values = dataclasses.asdict(section)
    else:
        values = dict(section)
    fields = {field.name: field for field in dataclasses.fields(PostprocessOptions)}
    for override in overrides:
        key, sep, text = override.partition("=")
        key = key.strip().removeprefix("postprocess.")
        if not sep or key not in fields:
            raise ValueError(f"bad post-processing option {override!r}: expected key=value with "
                             f"key in {', '.join(fields)}")
        values[key] = _parse_value(key, text.strip(), type(fields[key].default))
    return PostprocessOptions(**{key: value for key, value in values.items() if key in fields})


def _parse_value(key, text, kind):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"post-processing option {key} needs true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"post-processing option {key} needs a {kind.__name__}, "
                         f"got {text!r}") from None


def load_run_model(run_dir, checkpoint=None):
    """Rebuild a training run's model under float32 and load a checkpoint.

    `checkpoint`: `best`, `last` or a path; None takes the run's `train.export_checkpoint`.

    Returns:
        `(model, config, weights)`: the keras model with weights loaded, the run's `Config` and
        the `Path` of the weights file loaded.
    """
    from keras_glas.config import load_config
    from keras_glas.models import build_model

    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: RUN_DIR must be a directory written "
                                "by `python -m keras_glas.train`")
    config = load_config(config_file)
    weights = checkpoint_path(run_dir, checkpoint or config.train.export_checkpoint)
    with float32_policy():
        model = build_model(config.model)
    model.load_weights(weights)
    return model, config, weights


def export_run(run_dir, out_dir, checkpoint=None, overwrite=False, postprocess_overrides=(),
               image_size=None, test_time_flips=None):
    """Export a training run (contract 10) as a SavedModel; see `export_model`.

    `image_size` None runs the network at the run's training scale `data.image_size`; an int
    overrides it (0 = native resolution). `test_time_flips` None takes the run's
    `train.export_test_time_flips`.
    """
    _check_destination(Path(out_dir), overwrite)
    model, config, weights = load_run_model(run_dir, checkpoint)
    options = postprocess_options(getattr(config, "postprocess", None), postprocess_overrides)
    if image_size is None:
        image_size = config.data.image_size
    if test_time_flips is None:
        test_time_flips = config.train.export_test_time_flips
    return export_model(model, out_dir, options, Path(run_dir) / CONFIG_FILE, overwrite, image_size,
                        weights, test_time_flips)


def export_keras_file(path, out_dir, overwrite=False, postprocess_overrides=()):
    """Export a whole-model `.keras` file (default post-processing options + overrides) at
    native resolution: a `.keras` file does not record its training scale."""
    import keras_glas.models  # noqa: F401  (registers the project's serialisable classes)

    model = keras.models.load_model(path, compile=False)
    return export_model(model, out_dir, postprocess_options(None, postprocess_overrides),
                        overwrite=overwrite, weights=path)


def is_saved_model(path):
    """True for a directory holding a SavedModel."""
    path = Path(path)
    return path.is_dir() and (path / "saved_model.pb").is_file()


def ensure_saved_model(model_path, work_dir):
    """A SavedModel for `model_path`: itself, or a run dir / `.keras` file exported into `work_dir`.

    Evaluation and prediction go through this so that their numbers always come from the
    artefact users deploy.
    """
    path = Path(model_path)
    if is_saved_model(path):
        return path
    out_dir = Path(work_dir) / "saved_model"
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return export_run(path, out_dir)
    if path.is_file() and path.suffix == ".keras":
        return export_keras_file(path, out_dir)
    raise ValueError(f"{model_path} is neither a SavedModel directory (with saved_model.pb), a "
                     "training run directory (with config.yaml) nor a .keras file")


def read_export_info(saved_model_dir):
    """`assets.extra/keras_glas_export.json` of a SavedModel, or {} for a foreign SavedModel."""
    path = Path(saved_model_dir) / ASSETS_EXTRA_DIR / EXPORT_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m keras_glas.export",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="training run directory (config.yaml, checkpoints/)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="SavedModel directory to write")
    parser.add_argument("--checkpoint", default=None,
                        help="best, last, or a path to a .weights.h5 file (default: the "
                             "run's train.export_checkpoint, best unless configured)")
    parser.add_argument("--image-size", type=int, default=None, metavar="S",
                        help="run the network with the image's longer side resized to S, the "
                             "training scale (default: the run's data.image_size); 0 = native "
                             "resolution, for models trained on native-scale crops")
    parser.add_argument("--postprocess", nargs="*", default=(), metavar="KEY=VALUE",
                        help="override the run's post-processing options, e.g. min_size=50")
    parser.add_argument("--test-time-flips", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="U-Net: average the maps over the four flips of each image (4x the "
                             "inference time); default: the run's train.export_test_time_flips")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out_dir = export_run(args.run_dir, args.out_dir, args.checkpoint, args.overwrite,
                             args.postprocess, args.image_size, args.test_time_flips)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"SavedModel written to {out_dir} from {read_export_info(out_dir)['weights']} "
          "(signatures: serving_default, serve_bytes)")


if __name__ == "__main__":
    sys.exit(main())
